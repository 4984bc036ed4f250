"""The ``astolfo`` process freezes its imported modules for the garbage collector
(``engine.long_lived``); a caller of ``main`` such as this test suite is left alone."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import gc, sys
from astolfo_tui.cli import main
code = main(["jobs"], process=sys.argv[1] == "process")
print(code, gc.get_freeze_count())
"""


def _run(tmp_path: Path, mode: str) -> tuple[int, int]:
    env = dict(os.environ, ASTOLFO_STATE_DIR=str(tmp_path / "state"), ASTOLFO_CACHE_DIR=str(tmp_path / "cache"),
               ASTOLFO_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    code, frozen = done.stdout.splitlines()[-1].split()  # (after what the command printed)
    return int(code), int(frozen)


def test_the_astolfo_process_freezes_what_it_imported(tmp_path):
    code, frozen = _run(tmp_path, "process")
    assert code == 0
    assert frozen > 10_000  # the command's modules (argparse, rich, the engine's) and their objects


def test_a_caller_of_main_is_not_frozen(tmp_path):
    code, frozen = _run(tmp_path, "caller")
    assert code == 0
    assert frozen == 0
