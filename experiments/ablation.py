"""CIPO's ablations on the quickstart task: what each mechanism buys, seed by seed on the same prompts.

    python experiments/ablation.py      # 7 variants, seed 0, 8 steps each; --seeds 0 1 for a second seed
    python experiments/ablation.py --variants cipo previous_anchors   # only these (finished runs are reused)

Each variant is the study's run (configs/quickstart.yaml + experiments/study.yaml, see experiments/study.py) with
the options below, so any one can be run by hand with `python -m cipo_lightning fit --config configs/quickstart.yaml
--config experiments/study.yaml <options>`:

    grpo              --algorithm grpo                        no correction stream
    cipo              --algorithm cipo                        everything on (docs/cipo.md)
    rho_fixed         cipo, --replay.w1 0 --replay.w2 0       no adaptive replay: rho stays at replay.rho
    no_shaping        cipo, --shaping.lambda_risk 0           no risk-averse penalty on c->i corrections
    no_band           cipo, --rollout.anchor_band [0,1]       anchors from any prompt, not intermediate ones first
    failed_only       cipo, rho fixed at 0                    failed anchors only, no correct ones replayed
    previous_anchors  cipo, --rollout.anchors_from_previous_step true
                                                              not a removal: anchors one step old, corrected in the
                                                              base groups' engine call, what the faster option costs

Every variant is validated on the same held-out problems (pass@1, pass@k up to eval.n, two-turn acc@t1 / acc@t2,
i->c, c->i) and logs the training-time CIPO metrics; the report compares each variant with grpo and with full cipo
(per-seed differences and a paired bootstrap over problems). Runs land in runs/ablations, the report in
docs/ablations (ablations.json, summary.md, plots); finished runs are reused. Options as in experiments/study.py.
"""

from __future__ import annotations

import study

CIPO = ["--algorithm", "cipo"]
VARIANTS = {
    "grpo": ["--algorithm", "grpo"],
    "cipo": CIPO,
    "rho_fixed": [*CIPO, "--replay.w1", "0", "--replay.w2", "0"],
    "no_shaping": [*CIPO, "--shaping.lambda_risk", "0"],
    "no_band": [*CIPO, "--rollout.anchor_band", "[0, 1]"],
    "failed_only": [*CIPO, "--replay.rho", "0", "--replay.rho_min", "0", "--replay.w1", "0", "--replay.w2", "0"],
    "previous_anchors": [*CIPO, "--rollout.anchors_from_previous_step", "true"],
}
COMPARISONS = [("cipo", "grpo")] + [(variant, "cipo") for variant in VARIANTS if variant not in ("grpo", "cipo")]

if __name__ == "__main__":
    study.main(__doc__, VARIANTS, COMPARISONS, name="ablations", seeds=(0,), val_every=4, eval_problems=32)
