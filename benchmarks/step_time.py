"""Step time of the quickstart config, GRPO and CIPO side by side: where a step's time goes, the overhead over the
two unavoidable parts, CIPO's cost over GRPO at the same base batch, and peak memory.

Each algorithm trains `--steps` steps of configs/quickstart.yaml (embedded model, vLLM, 4 prompts x 8 samples; CIPO
adds 2 anchors x 4 corrections) in its own process, without validation; the first step (engine warm-up) is left
out. From metrics.csv, per step (median over steps):
  rollout = time/rollout + time/correction_rollout (generation), verify = time/verify, sync = time/weight_sync,
  optim = time/optim (policy forward, backward and optimizer step; a reference forward too when model.beta > 0,
  0 in this config), other = time/step - the rest;
  overhead = time/step / (rollout + optim) (target <= 1.15).
Padding and the dense floor: train/padding_frac is the share of the positions the policy's passes processed that were
padding (target <= 0.10); train/trained_tokens_per_s (real tokens through forward and backward per second of optim; a
prompt that a group's rows share in a pass, model.share_prompts, counts once) is compared with the dense floor
(common.dense_step_tokens_per_s): one AdamW step of the same model on one unpadded batch of the step's token count
(the run's median train/trained_tokens, as rows of 96 tokens, about a quickstart row), logits at every position.
The target (>= 0.9) is on the floor measured in the run's own process after its last step (common.InRunFloor: the
run's policy and optimizer, the engine still resident); the floor in a fresh process without an engine, the model
loaded as the run loads it (dtype, gradient checkpointing) under the run's allocator setting, is printed next to it,
the difference being what the resident engine costs a pass.
Peak memory is the training's maximum resident set (the engine runs in the trainer's process), shown against the sum
of the parts measured in the same run (common.PhaseRecorder.parts_gb): runtime, engine, weights, gradients, AdamW
state and one micro-batch's activations; the rest is what the allocator holds beyond them.

    python benchmarks/step_time.py [--steps 6] [extra CLI overrides, e.g. --model.model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import dense_step_tokens_per_s, train_quickstart

PARTS = ("rollout", "verify", "sync", "optim", "other")


def step_parts(algorithm: str, steps: int, root: Path, extra: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per part over steps 1.. of one quickstart training run, and its memory (train_quickstart)."""
    rows, memory = train_quickstart(["--algorithm", algorithm, *extra], steps, root, dense_floor=True)
    parts = {part: [] for part in (*PARTS, "step", "padding_frac", "tokens", "tokens_per_s")}
    for row in rows[1:]:
        known = {
            "rollout": row["time/rollout"] + row.get("time/correction_rollout", 0.0),
            "verify": row["time/verify"],
            "sync": row["time/weight_sync"],
            "optim": row.get("time/optim", 0.0),
        }
        known["other"] = row["time/step"] - sum(known.values())
        known["step"] = row["time/step"]
        known["padding_frac"] = row.get("train/padding_frac", float("nan"))
        known["tokens"] = row.get("train/trained_tokens", float("nan"))
        known["tokens_per_s"] = row.get("train/trained_tokens_per_s", float("nan"))
        for part, value in known.items():
            parts[part].append(value)
    medians = {part: statistics.median(values) for part, values in parts.items()}
    return medians | {"floor": memory.pop("floor")}, memory


def fresh_process_floor(run: Path, tokens: int) -> float:
    """The dense floor (common.dense_step_tokens_per_s) in this process, without a rollout engine: the run's model
    loaded as the run loaded it (its hparams.yaml), a new AdamW of the run's kind, and the run's allocator setting
    (the floor's steps keep freed blocks, as a CPU run does from fit start; malloc's settings changed the floor by
    10-20% on 2026-12-02, docs/benchmarks.md)."""
    import torch

    from cipo_lightning.module import CIPOModule

    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    module = CIPOModule(model=hparams["model"], gradient_checkpointing=hparams["gradient_checkpointing"])
    module.configure_model()
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-12, fused=True)  # the run's kind
    return dense_step_tokens_per_s(module.policy, optimizer, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per algorithm (the first is left out)")
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "cipo"], choices=["grpo", "cipo"])
    args, extra = parser.parse_known_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms:
            results[algorithm] = step_parts(algorithm, args.steps, Path(tmp) / algorithm, extra)
        # The fresh-process floors after all training runs, so that nothing runs between them: in two calls with a
        # floor measured between the runs the second run (CIPO) was ~40% slower; not reproduced reliably
        # (docs/benchmarks.md).
        for algorithm in args.algorithms:
            parts = results[algorithm][0]
            parts["fresh_floor"] = fresh_process_floor(Path(tmp) / algorithm / "version_0", int(parts["tokens"]))

    print(f"configs/quickstart.yaml {' '.join(extra)}, median of steps 1-{args.steps - 1} (seconds)")
    print(f"{'':6s}" + "".join(f"{name:>9s}" for name in (*PARTS, "step", "overhead", "peak GB")))
    for algorithm, (parts, memory) in results.items():
        overhead = parts["step"] / (parts["rollout"] + parts["optim"])
        cells = [f"{parts[name]:9.2f}" for name in (*PARTS, "step")] + [f"{overhead:9.3f}", f"{memory['peak_gb']:9.2f}"]
        print(f"{algorithm:6s}" + "".join(cells))
    print("overhead = step / (rollout + optim), target <= 1.15")
    for algorithm, (parts, _) in results.items():
        print(
            f"{algorithm} padding_frac {parts['padding_frac']:.3f} (target <= 0.10); trained tokens/s "
            f"{parts['tokens_per_s']:.1f} ({parts['tokens']:.0f} tokens a step), dense floor in the run "
            f"{parts['floor']:.1f}: ratio {parts['tokens_per_s'] / parts['floor']:.3f} (target >= 0.9); in a fresh "
            f"process {parts['fresh_floor']:.1f}: ratio {parts['tokens_per_s'] / parts['fresh_floor']:.3f}"
        )
    if len(results) == 2:
        grpo, cipo = (results[a][0]["step"] for a in ("grpo", "cipo"))
        print(f"CIPO step / GRPO step at the same base batch: {cipo / grpo:.2f} (target <= 1.5)")
    for algorithm, (_, memory) in results.items():
        memory_parts = memory["parts_gb"]
        listed = ", ".join(f"{name} {gb:.2f}" for name, gb in memory_parts.items())
        print(
            f"{algorithm} peak RSS {memory['peak_gb']:.2f} GB against its parts {sum(memory_parts.values()):.2f} GB "
            f"({listed}); beyond them {memory['peak_gb'] - sum(memory_parts.values()):.2f} GB"
        )
    print(json.dumps({a: {"parts": p, **m} for a, (p, m) in results.items()}))


if __name__ == "__main__":
    main()
