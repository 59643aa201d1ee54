"""The package's shape: no import cycle, nothing imports upward, and a lazy public API.

``data/`` and ``models/`` are the bottom layers: they never import
``training/`` or the command-line layer (``cli``, ``app``, ``inference``,
``export``). ``import dist_rnn`` and the CLI's ``--help`` and config errors do
not import TensorFlow (it takes seconds to import).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_rnn"
UPPER_LAYERS = ("dist_rnn.training", "dist_rnn.cli", "dist_rnn.app", "dist_rnn.inference", "dist_rnn.export")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, module_level_only: bool) -> set[str]:
    """The dist_rnn modules a file imports (module level only, or anywhere, e.g. inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # also imports under a top-level if/try
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from dist_rnn import runtime`` imports the module dist_rnn.runtime.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {name for name in found if name == "dist_rnn" or name.startswith("dist_rnn.")}


def _resolve(name: str) -> str:
    """The module file that an imported dotted name refers to (its longest known prefix)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def test_the_scan_sees_the_package():
    assert {"dist_rnn.cli", "dist_rnn.data.vocab", "dist_rnn.models.model", "dist_rnn.training.trainer",
            "dist_rnn.inference"} <= set(MODULES)
    assert "dist_rnn.inference" in imports_of(MODULES["dist_rnn.export"], module_level_only=False)


# ``dist_rnn.__main__`` is the ``python -m dist_rnn`` script: importing it runs the CLI.
@pytest.mark.parametrize("name", sorted(set(MODULES) - {"dist_rnn.__main__"}))
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("layer", ["dist_rnn.data", "dist_rnn.models"])
def test_bottom_layers_never_import_upward(layer):
    for name, path in MODULES.items():
        if name == layer or name.startswith(layer + "."):
            upward = {i for i in imports_of(path, module_level_only=False) if i.startswith(UPPER_LAYERS)}
            assert not upward, f"{name} imports {sorted(upward)}"


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module_level", "also_in_functions"])
def test_no_import_cycle(module_level_only):
    graph = {name: {_resolve(i) for i in imports_of(path, module_level_only)} - {name}
             for name, path in MODULES.items()}
    # A package's __init__ may import its own submodules (a re-export): the
    # implicit parent import of a submodule is not counted as an edge.
    done, active = set(), []

    def visit(node):
        if node in active:
            cycle = active[active.index(node):] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        active.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        active.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_export_and_app_do_not_import_each_other():
    assert "dist_rnn.app" not in imports_of(MODULES["dist_rnn.export"], module_level_only=False)


# ---------------------------------------------------------------- public API

DRIVER = """
import json, sys
from dist_rnn.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}),
      file=sys.stderr)
"""


def _cli_in_fresh_process(args: list[str], cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return {**json.loads(proc.stderr.strip().splitlines()[-1]), "stdout": proc.stdout, "stderr": proc.stderr}


def test_help_does_not_import_tensorflow(tmp_path):
    result = _cli_in_fresh_process(["--help"], tmp_path)
    assert result["code"] == 0 and "usage: dist-rnn" in result["stdout"]
    assert not result["tensorflow"] and not result["keras"]


def test_bad_config_error_does_not_import_tensorflow(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  hiden_size: 16\n", encoding="utf-8")
    result = _cli_in_fresh_process(["train", "bad.yaml"], tmp_path)
    assert result["code"] == 2
    assert result["stderr"].startswith("error: ") and "hiden_size" in result["stderr"].splitlines()[0]
    assert not result["tensorflow"] and not result["keras"]
    assert not (tmp_path / "runs").exists()


def test_import_dist_rnn_is_lazy():
    probe = ("import sys, dist_rnn; names = dist_rnn.__all__; "
             "print('tensorflow' in sys.modules, len(names), set(dir(dist_rnn)) >= set(names))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert len(out) == 3, out
    assert out[0] == "False" and int(out[1]) >= 10 and out[2] == "True"


def test_every_public_name_resolves_to_its_declared_module():
    import dist_rnn

    missing = []
    for name in dist_rnn.__all__:
        if name == "__version__":
            continue
        module = dist_rnn.PUBLIC_API[name]
        if importlib.util.find_spec(module) is None:
            missing.append(f"{name} ({module})")  # declared for a module another branch adds
            continue
        value = getattr(dist_rnn, name)
        assert value is getattr(importlib.import_module(module), name)
        assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    # Only the trainer factory may be absent before the 'training' branch is merged.
    assert all(m.startswith("build_trainer ") for m in missing), missing


def test_unknown_attribute_is_an_attribute_error():
    import dist_rnn

    with pytest.raises(AttributeError, match="no_such_name"):
        dist_rnn.no_such_name
