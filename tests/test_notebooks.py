"""The notebooks run headless from top to bottom: quickstart.ipynb trains and validates a tiny model, then
analysis.ipynb reads that run. The committed files carry the outputs of a real run (scripts/notebooks.py render);
running them here must not touch those."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebooks_script", REPO / "scripts" / "notebooks.py")
notebooks_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks_script)

NAMES = ("quickstart", "analysis")


def _digests() -> dict[str, str]:
    return {name: hashlib.sha256((REPO / "notebooks" / f"{name}.ipynb").read_bytes()).hexdigest() for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_show_a_dated_real_run(name):
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    stamps = [cell for cell in notebook.cells if notebooks_script.RENDERED_TAG in cell.metadata.get("tags", [])]
    assert len(stamps) == 1 and "SmolLM2-135M-Instruct" in stamps[0].source
    assert "scripts/notebooks.py render" in stamps[0].source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [output for cell in code for output in cell.outputs]
    # Results a reader sees: tables or values, and figures; no error, and no stderr logs with machine paths.
    assert any(output.output_type == "execute_result" for output in outputs), name
    assert any("image/png" in output.get("data", {}) for output in outputs), name
    assert not any(output.output_type == "error" or output.get("name") == "stderr" for output in outputs)


@pytest.mark.slow
def test_quickstart_then_analysis_notebooks_run(tiny_model, tmp_path):
    before = _digests()
    env = {"CIPO_NOTEBOOK_MODEL": tiny_model, "CIPO_NOTEBOOK_STEPS": "2", "CIPO_NOTEBOOK_ROOT": str(tmp_path)}
    quickstart = notebooks_script.text_outputs(notebooks_script.execute("quickstart", env))
    # The random tiny model answers nothing right: every anchor is a failed one.
    assert "anchor_reward" in quickstart and "failed anchor" in quickstart and "val/pass@1" in quickstart
    run = tmp_path / "version_0"
    assert (run / "correction_samples.jsonl").is_file() and list((run / "eval").glob("val_step2.json"))
    analysis = notebooks_script.text_outputs(notebooks_script.execute("analysis", env))
    assert "2 training steps" in analysis and "basic_arithmetic" in analysis
    assert _digests() == before
