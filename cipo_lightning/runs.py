"""Reading a finished run folder back (`trainer.default_root_dir/version_N`): the benchmarks and the GRPO-vs-CIPO
study compare runs from these files, the same ones a user gets, rather than from anything kept in memory.

A run that stops before its first training step (a bad model path, config or data file) still leaves its version_N
folder (Lightning writes config.yaml during setup, before the model loads). Readers of "the newest run" skip such
folders: `latest_run` takes the newest folder that logged a training step, and `--ckpt_path last`
(cipo_lightning.checkpointing.latest_checkpoint) the newest checkpoint, which only a trained run has.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """run_dir/metrics.csv as {step: {metric: value}}. Lightning's CSVLogger writes one row per log call (training
    and validation metrics of a step land in separate rows), so the rows of a step are merged; empty cells are
    metrics not logged in that row."""
    path = Path(run_dir) / "metrics.csv"
    by_step: dict[int, dict[str, float]] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            by_step.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v})
    return dict(sorted(by_step.items()))


def latest_run(root_dir: str | Path) -> Path:
    """The version_N folder under root_dir with the highest N whose metrics.csv holds a training step (a `train/`
    metric); folders of runs that stopped before their first step, and of validate/test runs, are skipped."""
    runs = sorted(Path(root_dir).glob("version_*"), key=_version_number, reverse=True)
    for run in runs:
        if (run / "metrics.csv").is_file() and any(
            name.startswith("train/") for step in read_metrics(run).values() for name in step
        ):
            return run
    raise FileNotFoundError(
        f"no run under {root_dir} logged a training step ({len(runs)} version_N folders without one): "
        "train first, or point the reader at a run folder"
    )


def _version_number(path: Path) -> int:
    suffix = path.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def read_eval_reports(run_dir: Path, stage: str = "val") -> dict[int, dict[str, Any]]:
    """The evaluation reports run_dir/eval/<stage>_step<N>.json (written by the Evaluation callback) as {N: report}."""
    pattern = re.compile(rf"{re.escape(stage)}_step(\d+)\.json")
    reports = {}
    for path in (Path(run_dir) / "eval").glob(f"{stage}_step*.json"):
        match = pattern.fullmatch(path.name)
        if match:
            reports[int(match.group(1))] = json.loads(path.read_text())
    return dict(sorted(reports.items()))
