"""Resident memory per phase of quickstart training steps: where the process's peak comes from.

Runs configs/quickstart.yaml in this process (the vLLM engine lives here too) for a few steps, validating and
checkpointing every `--every` steps, and prints after each phase: the resident set (RSS), its peak during the phase,
and the bytes glibc's malloc holds free in its arenas (freed memory that still counts as resident). Phases are the
real classes' methods (see common.PhaseRecorder): engine start, policy load, weight sync, rollout (base, correction
and validation generations), old/reference log-probs (only with model.beta > 0 or model.updates_per_batch > 1; not
in the quickstart), micro-batch forward and backward, optimizer step, step end (metrics logged), checkpoint,
validation. Ends with a table per phase and the peak against the parts a run cannot do without.

    python benchmarks/memory_probe.py [--steps 4] [--every 2] [extra CLI overrides, e.g. --algorithm grpo]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from common import PhaseRecorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2, help="validate and checkpoint every this many steps")
    parser.add_argument("--root", help="keep the run (metrics.csv, checkpoints) here (default: a temporary folder)")
    args, extra = parser.parse_known_args()

    from cipo_lightning.cli import main as cli_main

    recorder = PhaseRecorder()
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": args.every, "save_last": "link"}}  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        root = args.root or temporary
        cli_main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", str(args.steps),
                  "--trainer.val_check_interval", str(args.every), "--trainer.callbacks", json.dumps([checkpoint]),
                  "--trainer.default_root_dir", root, *extra])  # fmt: skip
    recorder.record("end")

    print(f"\n{'phase':24s} {'times':>5s} {'max RSS after':>14s} {'max peak in':>12s} {'max heap free':>14s}  (GB)")
    for phase in dict.fromkeys(row["phase"] for row in recorder.rows):
        rows = [row for row in recorder.rows if row["phase"] == phase]
        print(f"{phase:24s} {len(rows):5d} {max(r['rss_gb'] for r in rows):14.2f} "
              f"{max(r['peak_gb'] for r in rows):12.2f} {max(r['heap_free_gb'] for r in rows):14.2f}")  # fmt: skip
    parts = recorder.parts_gb()
    print(f"\npeak RSS {recorder.peak_gb:.2f} GB; parts {sum(parts.values()):.2f} GB: "
          + ", ".join(f"{name} {gb:.2f}" for name, gb in parts.items()))  # fmt: skip


if __name__ == "__main__":
    main()
