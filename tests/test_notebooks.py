"""The teaching notebooks: committed clean, and each one runs top to bottom in a fresh kernel.

Execution goes through ``nbllm.lab.execute_notebook`` (what ``nbllm lab --execute``
runs), on the embedded default model, offline. No timing asserts: per-notebook
times are printed by ``nbllm lab --execute`` and ``scripts/check_binder``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from nbllm.lab import execute_notebook, list_notebooks, notebooks_dir

NOTEBOOKS = list_notebooks(notebooks_dir())
TEACHING = [
    "01_first_tokens.ipynb",
    "02_next_token_distributions.ipynb",
    "03_decoding_loop.ipynb",
    "04_kv_cache.ipynb",
    "05_structured_output.ipynb",
    "06_chat.ipynb",
    "07_vision.ipynb",
]


def _ids(path: Path) -> str:
    return path.stem


def test_all_teaching_notebooks_present() -> None:
    missing = sorted(set(TEACHING) - {p.name for p in NOTEBOOKS})
    assert not missing, f"notebooks/ lacks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_says_how_to_use_a_hub_model(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first = next(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert 'nbllm.load("mlx-community/' in first, (
        f"{path.name}: the first markdown cell must say how to load a hub model"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the notebooks must not need the network
    run = execute_notebook(path, timeout=300, output=tmp_path)
    assert run.error is None, f"{path.name} failed: {run.error}"
    executed = nbformat.read(tmp_path / path.name, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") is not None for cell in code), "some cells did not run"
    # Errors that do not stop a cell (e.g. in a widget's background task) still print a traceback.
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            assert "Traceback" not in text, f"{path.name}, code cell {i}: {text[-500:]}"
            assert out.get("output_type") != "error", (
                f"{path.name}, code cell {i}: {out.get('ename')}: {out.get('evalue')}"
            )
