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
names = sorted("engine." + m.name for m in pkgutil.walk_packages(engine.__path__) if not m.name.startswith("_"))
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
    expected = {"engine." + m.name for m in pkgutil.walk_packages(engine.__path__) if not m.name.startswith("_")}
    assert set(result["modules"]) == expected
    assert {"engine.inspect", "engine.scan", "engine.demo", "engine.safetensors_io"} <= expected
    assert result["forbidden"] == [], f"engine imported {result['forbidden']}"
