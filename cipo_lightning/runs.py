"""Reading a finished run folder back (`trainer.default_root_dir/version_N`): the benchmarks and the GRPO-vs-CIPO
study compare runs from these files, the same ones a user gets, rather than from anything kept in memory."""

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


def read_eval_reports(run_dir: Path, stage: str = "val") -> dict[int, dict[str, Any]]:
    """The evaluation reports run_dir/eval/<stage>_step<N>.json (written by the Evaluation callback) as {N: report}."""
    pattern = re.compile(rf"{re.escape(stage)}_step(\d+)\.json")
    reports = {}
    for path in (Path(run_dir) / "eval").glob(f"{stage}_step*.json"):
        match = pattern.fullmatch(path.name)
        if match:
            reports[int(match.group(1))] = json.loads(path.read_text())
    return dict(sorted(reports.items()))
