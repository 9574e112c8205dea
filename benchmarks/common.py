"""What the benchmark scripts share: a quickstart training run in its own process, read back from metrics.csv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cipo_lightning.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
# Runs the CLI in this process and reports its peak RSS (a colocated vLLM engine lives in the same process).
_CHILD = """
import resource, sys
from cipo_lightning.cli import main
main(sys.argv[1:])
print("PEAK_RSS_KB " + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def train_quickstart(overrides: list[str], steps: int, root: Path) -> tuple[list[dict[str, float]], float]:
    """`steps` steps of configs/quickstart.yaml with `overrides`, without validation or checkpoints, logged under
    root: one dict of metrics per step (in step order) and the process's peak RSS in GB."""
    args = ["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "100000", "--trainer.default_root_dir", str(root),
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", *overrides]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"training run {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stdout.split("PEAK_RSS_KB ")[1].split()[0])
    steps = read_metrics(root / "version_0").values()
    return [metrics for metrics in steps if "time/step" in metrics], peak_kb / 2**20
