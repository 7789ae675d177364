"""The package's layering: no import cycle, no internal import hidden in a function, every module imports alone.

The import graph is read from the source (every `import` / `from ... import` of a vbshare module, at any depth
of the file) and must be acyclic; then each module is imported in a fresh interpreter of its own, so a module
that only works when something else happened to be imported first fails here.
"""
from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import vbshare

PACKAGE_DIR = Path(vbshare.__file__).parent
ROOT = "vbshare"


def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package (a package by its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = [ROOT, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported vbshare module, whether the import sits inside a function) for every import in `name`'s file."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                # `from pkg import name` imports the submodule pkg.name when there is one
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in child.names]
            for target in targets:
                if target == ROOT or target.startswith(ROOT + "."):
                    found.append((target, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the vbshare modules it needs: the imported module and every package on the way to it that is not
    one of the importer's own parents (Python runs `vbshare.adapters/__init__.py` before `vbshare.adapters.base`)."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        needs: set[str] = set()
        for target, _ in imports_of(name):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and step not in parents and step != name:
                    needs.add(step)
        graph[name] = needs
    return graph


def test_module_list_is_what_python_finds():
    """The graph's module list, read from the files, is the set of modules Python's own walk of the package finds
    (a module the list missed would escape every check below)."""
    found = {ROOT} | {info.name for info in pkgutil.walk_packages(vbshare.__path__, prefix=ROOT + ".")}
    assert set(MODULES) == found


def test_import_graph_has_no_cycle():
    graph = import_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    # the layering, spot-checked: the contract below every method, the registry above them, core above it
    position = {name: i for i, name in enumerate(order)}
    assert position["vbshare.adapters.base"] < position["vbshare.adapters.vblora"] < position["vbshare.registry"]
    assert position["vbshare.registry"] < position["vbshare.core"] < position["vbshare.checkpoint"]
    method_modules = [n for n in MODULES if n.startswith("vbshare.adapters.") and n != "vbshare.adapters.base"]
    above_methods = ("vbshare.registry", "vbshare.core", "vbshare.checkpoint", "vbshare.accounting", "vbshare.peft",
                     "vbshare.train", "vbshare.plan", "vbshare.export", "vbshare.evaluate", "vbshare.compare",
                     "vbshare.report", "vbshare.rundir", "vbshare.analysis", "vbshare.models", "vbshare.data")
    for method in method_modules:
        above = {n for n in graph[method] if n == "vbshare" or n.startswith(above_methods)}  # packages and their modules
        assert not above, f"{method} imports from above the registry: {above}"


def test_accounting_does_not_need_the_serialiser():
    graph = import_graph()
    reachable, todo = set(), ["vbshare.accounting"]
    while todo:
        for needed in graph[todo.pop()] - reachable:
            reachable.add(needed)
            todo.append(needed)
    assert "vbshare.checkpoint" not in reachable and "vbshare.peft" not in reachable
    tree = ast.parse(MODULES["vbshare.accounting"].read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert "serialise" not in names and not any(n.startswith("safetensors") for n in names)


def reachable_from(name: str, graph: dict[str, set[str]]) -> set[str]:
    reachable, todo = set(), [name]
    while todo:
        for needed in graph[todo.pop()] - reachable:
            reachable.add(needed)
            todo.append(needed)
    return reachable


def test_reading_finished_runs_needs_no_training_code():
    """The run folder's owner sits below the training app; the report, the comparison's statistics and the
    metrics read runs through it without the app (which pulls in Accelerate)."""
    graph = import_graph()
    for reader in ("vbshare.rundir", "vbshare.metrics", "vbshare.report", "vbshare.report.table",
                   "vbshare.report.plots", "vbshare.report.runs"):
        training = sorted(n for n in reachable_from(reader, graph) if n == "vbshare.train" or n.startswith("vbshare.train."))
        assert not training, f"{reader} needs the training app: {training}"
    app = reachable_from("vbshare.train.app", graph)
    assert "vbshare.rundir" in app  # the app writes through the run folder's owner
    assert "vbshare.report" not in app and "vbshare.compare" not in app


def test_no_internal_import_is_deferred_into_a_function():
    deferred = [f"{name} imports {target}" for name in MODULES for target, inside in imports_of(name) if inside]
    assert not deferred, deferred


def test_the_graph_reader_sees_a_cycle_and_a_deferred_import(tmp_path, monkeypatch):
    """The checks above can fail: two modules that import each other, one of them inside a function."""
    monkeypatch.setitem(MODULES, "vbshare.fake_a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "vbshare.fake_b", tmp_path / "b.py")
    (tmp_path / "a.py").write_text("from .fake_b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    from .fake_a import y\n")
    assert imports_of("vbshare.fake_b") == [("vbshare.fake_a", True)]
    with pytest.raises(CycleError):
        list(TopologicalSorter(import_graph()).static_order())


# Run in a new interpreter: load the heavy third-party packages once, then fork one child per module; each child
# starts with no vbshare module loaded and imports only its own (the fork saves ~1.5 s of torch import per module).
FORK_EACH = r"""
import importlib, os, sys
for heavy in ("torch", "safetensors.torch", "einops", "numpy", "pandas", "omegaconf", "hydra", "transformers"):
    importlib.import_module(heavy)
assert not [m for m in sys.modules if m.split(".")[0] == "vbshare"], "a third-party import loaded vbshare"
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as err:
            print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


def import_each_alone(names: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", FORK_EACH, *names], capture_output=True, text=True, env=env,
                          cwd=PACKAGE_DIR.parent)


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_process():
    done = import_each_alone(list(MODULES))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_module_that_needs_an_earlier_import_fails_alone(tmp_path):
    """The check above can fail: a module using a sibling it never imported works only after that sibling."""
    package = tmp_path / "vbshare_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("VALUE = 1\n")
    (package / "user.py").write_text("import vbshare_probe\nVALUE = vbshare_probe.helper.VALUE\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    together = subprocess.run([sys.executable, "-c", "import vbshare_probe.helper, vbshare_probe.user"], env=env)
    assert together.returncode == 0
    alone = subprocess.run([sys.executable, "-c", FORK_EACH.replace("vbshare", "vbshare_probe"), "vbshare_probe.user"],
                           capture_output=True, text=True, env=env)
    assert alone.returncode != 0 and "vbshare_probe.user" in alone.stderr
