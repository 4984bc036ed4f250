"""The engine never imports the UI: any script can use it without Textual or Rich."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import engine

FORBIDDEN = ("textual", "rich", "astolfo_tui")

_PROBE = """
import importlib, json, pkgutil, sys
import engine
names = sorted(m.name for m in pkgutil.walk_packages(engine.__path__, "engine.") if "._" not in m.name)
for name in names:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {%s})
print(json.dumps({"modules": names, "forbidden": loaded}))
"""


def test_engine_modules_import_no_ui():
    probe = _PROBE % ", ".join(repr(f) for f in FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {m.name for m in pkgutil.walk_packages(engine.__path__, "engine.") if "._" not in m.name}
    assert set(result["modules"]) == expected
    assert {"engine.library.diagnose", "engine.library.scan", "engine.synth.demo", "engine.checkpoint.format",
            "engine.merge.run", "engine.merge.backends.cpu"} <= expected
    assert result["forbidden"] == [], f"engine imported {result['forbidden']}"
