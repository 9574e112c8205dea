"""Readers of "the newest run" skip the folders of runs that stopped before their first training step."""

from __future__ import annotations

import pytest

from cipo_lightning.checkpointing import latest_checkpoint
from cipo_lightning.runs import latest_run
from tests.test_training import _cli


@pytest.mark.slow
def test_a_run_that_fails_before_training_is_skipped_by_the_newest_run_readers(tmp_path):
    trained = tmp_path / "version_0"
    (trained / "checkpoints").mkdir(parents=True)
    # CSVLogger's layout: a training row and a validation row of step 0.
    (trained / "metrics.csv").write_text("epoch,step,train/reward_mean,val/pass@1\n0,0,0.5,\n0,0,,0.25\n")
    (trained / "checkpoints" / "epoch=0-step=1.ckpt").write_bytes(b"x")
    evaluated = tmp_path / "version_1"  # a validate run: metrics, but no training step
    evaluated.mkdir()
    (evaluated / "metrics.csv").write_text("step,val/pass@1\n0,0.25\n")

    failed = _cli("fit", "--config", "configs/quickstart.yaml", "--model.model", "/no/such/model",
                  "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert failed.returncode != 0 and "/no/such/model" in failed.stderr
    assert [p.name for p in (tmp_path / "version_2").iterdir()] == ["config.yaml"]  # what such a run leaves

    assert latest_run(tmp_path) == trained
    assert latest_checkpoint(tmp_path) == (trained / "checkpoints" / "epoch=0-step=1.ckpt").resolve()


def test_no_trained_run_is_a_clear_error(tmp_path):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"no run under {tmp_path} logged a training step \(1 version_N"):
        latest_run(tmp_path)
