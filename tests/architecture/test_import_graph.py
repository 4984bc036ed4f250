"""The engine's import graph: no cycles (imports inside functions count), and the modules that
the TUI's start, the catalog, recipes and plan checks need import no torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ENGINE.rglob("*.py")}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> engine modules it imports anywhere in its body (a package import also
    imports the package's ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_engine_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_inits_hold_only_a_docstring():
    """Importing ``engine.merge.events`` must not drag in the whole merge (and torch)."""
    for path in ENGINE.rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        assert len(body) <= 1 and all(isinstance(s, ast.Expr) for s in body), path


_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:3]))
"""


@pytest.mark.parametrize(
    "module",
    [
        "engine.hashes.catalog",
        "engine.hashes.relations",
        "engine.recipe.toml_file",
        "engine.recipe.notation",
        "engine.plan.checks",
        "engine.plan.planner",
        "engine.library.scan",
        "engine.jobs.launch",
        "astolfo_tui.app",
        "astolfo_tui.cli",
    ],
)
def test_importing_imports_no_torch(module):
    done = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f"{module} imports torch"


_MATPLOTLIB_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib")[:3])
"""


@pytest.mark.parametrize("module", ["astolfo_tui.app", "astolfo_tui.commands.compare", "astolfo_tui.screens.compare",
                                    "astolfo_tui.compare_png"])
def test_matplotlib_waits_for_a_picture(module):
    """Only drawing ``--png`` loads matplotlib: not the app, the command, its screen or the
    drawing module itself."""
    done = subprocess.run([sys.executable, "-c", _MATPLOTLIB_PROBE, module], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", f"{module} imports matplotlib"


def test_checking_a_cpu_recipe_imports_no_torch(tmp_path):
    """Plan checks import torch only for the ``device = "cuda"`` probe."""
    models = tmp_path / "m"
    models.mkdir()
    make = (
        "import sys\nfrom pathlib import Path\nfrom engine.synth.checkpoints import SynthSpec, write_checkpoint\n"
        "for i in range(2):\n"
        "    write_checkpoint(Path(sys.argv[1]) / f'm{i}.safetensors', SynthSpec(seed=i, scale=64))\n"
    )
    subprocess.run([sys.executable, "-c", make, str(models)], check=True, timeout=120)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "t"\ndevice = "cpu"\n[models]\na = "{models}/m0.safetensors"\n'
        f'b = "{models}/m1.safetensors"\n[select]\nunet = ["a", "b"]\n'
        f'[[output]]\npath = "{tmp_path}/out.safetensors"\nunet = "unet"\n'
    )
    check = (
        "import json, sys\nfrom engine.recipe.toml_file import load_recipe\n"
        "from engine.plan.planner import check_recipe\n"
        "problems = check_recipe(load_recipe(sys.argv[1]))\n"
        "print(json.dumps([sorted(m for m in sys.modules if m == 'torch'), [p.message for p in problems]]))\n"
    )
    env = {**os.environ, "ASTOLFO_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", check, str(recipe)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    torch_loaded, _messages = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch_loaded == []
