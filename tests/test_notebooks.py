"""The notebooks run headless from top to bottom: quickstart.ipynb trains and validates a tiny model, then
analysis.ipynb reads that run."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.slow
def test_quickstart_then_analysis_notebooks_run(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CIPO_NOTEBOOK_MODEL", tiny_model)
    monkeypatch.setenv("CIPO_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("CIPO_NOTEBOOK_ROOT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOKS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    quickstart = _outputs(_run("quickstart.ipynb"))
    # The random tiny model answers nothing right: every anchor is a failed one.
    assert "anchor_reward" in quickstart and "failed anchor" in quickstart and "val/pass@1" in quickstart
    run = tmp_path / "version_0"
    assert (run / "correction_samples.jsonl").is_file() and list((run / "eval").glob("val_step2.json"))
    analysis = _outputs(_run("analysis.ipynb"))
    assert "2 training steps" in analysis and "basic_arithmetic" in analysis
