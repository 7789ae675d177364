"""Every notebook in notebooks/ runs top to bottom in a `python3` Jupyter kernel (nbclient) against a small run
it makes itself (its parameter cell left at None), and the VB-LoRA one against a run directory given to it."""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

import ipykernel  # noqa: F401  (the python3 kernel the notebooks run in; a missing dev extra fails, not skips)
import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_DOC = NOTEBOOKS.parent / "docs" / "notebooks.md"
CELL_TIMEOUT_S = 300


def execute(path: Path, cwd: Path, parameters: dict[str, object] | None = None):
    """Run the notebook in a fresh kernel; `parameters` replace the assignments of its `parameters` cell."""
    nb = nbformat.read(path, as_version=4)
    if parameters:
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(cwd)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb, time.perf_counter() - started


def parameter_names(path: Path) -> list[str]:
    """The names the notebook's `parameters` cell assigns at top level, in order."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = []
    for node in ast.parse(cell.source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def readme_notebook_table() -> dict[str, list[str]]:
    """docs/notebooks.md's table: notebook file -> the names in backticks of its `parameters` column."""
    section = NOTEBOOK_DOC.read_text(encoding="utf-8")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
    column = header.index("parameters")
    return {row[0].strip("`"): re.findall(r"`([^`]+)`", row[column]) for row in body}


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_every_notebook_has_a_parameter_cell_and_no_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert paths, f"no notebooks in {NOTEBOOKS}"
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters' expected"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: strip outputs"


def test_docs_table_names_each_notebooks_parameters():
    """docs/notebooks.md's table lists every notebook once, with exactly the names its `parameters` cell assigns,
    so a parameter renamed, added or dropped in a notebook fails here until the page follows."""
    table = readme_notebook_table()
    assert sorted(table) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name, listed in table.items():
        defined = parameter_names(NOTEBOOKS / name)
        assert defined, f"{name}: its parameters cell assigns nothing"
        assert sorted(listed) == sorted(defined), f"docs/notebooks.md lists {listed} for {name}; its parameter cell has {defined}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_on_its_own_small_run(name, tmp_path):
    nb, seconds = execute(NOTEBOOKS / name, tmp_path)
    assert images(nb) >= 2, f"{name} drew {images(nb)} figures"
    print(f"{name}: {seconds:.1f} s")


@pytest.mark.slow
def test_vblora_notebook_on_a_given_run_directory(tmp_path):
    from vbshare.analysis import demo

    run = demo.train_run("vblora", tmp_path / "run")  # no snapshots: the drift section says so and moves on
    nb, _ = execute(NOTEBOOKS / "vblora_sharing.ipynb", tmp_path, {"RUN_DIR": str(run)})
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert "need two or more adapter folders" in text
    assert images(nb) >= 3


def test_demo_sweep_defaults_to_every_registered_method(tmp_path, monkeypatch):
    """compare_methods.ipynb's own runs come from demo.sweep's default: one run per (method, seed) for every
    registered method, in registration order; an unknown name fails before anything trains."""
    from vbshare.analysis import demo
    from vbshare.errors import VBShareError
    from vbshare.registry import METHODS

    calls = []
    monkeypatch.setattr(demo, "train_run", lambda method, run_dir, **kw: calls.append((method, run_dir, kw)))
    assert demo.sweep(tmp_path, seeds=(0, 3), overrides=["trainer.max_steps=8"]) == tmp_path
    methods = list(METHODS)
    assert methods[:8] == ["lora", "vblora", "aslora", "sora", "tied_lora", "nola", "vera", "unilora"]
    assert [(m, d) for m, d, _ in calls] == [(m, tmp_path / m / f"seed{k}") for m in methods for k in (0, 3)]
    assert calls[1][2]["overrides"] == ["seed=3", "trainer.max_steps=8"]
    calls.clear()
    with pytest.raises(VBShareError, match="no adapter config for 'lorra'"):
        demo.sweep(tmp_path, methods=["lora", "lorra"])
    assert calls == []
