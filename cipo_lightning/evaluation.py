"""Evaluation of a policy on a task: reasoning (mean@n, pass@k) and two-turn self-correction.

The same sampling path as training (`sample_scored_groups`: chat template, engine, task verifier), so an evaluation
measures what training optimises. Two-turn self-correction follows SCoRe: every first attempt is shown back with
the training correction template (which never says whether the attempt was right) and one correction is sampled;
Acc@t1 is the accuracy of the first attempts (it equals mean@n on the same samples), Acc@t2 of the corrections.

This is the core of the evaluation issue; the `validate` / `test` commands and validation during fit build on it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from cipo_lightning.algorithms.cipo import DEFAULT_CORRECTION_TEMPLATE, correction_messages
from cipo_lightning.data.tasks import Row, Task
from cipo_lightning.metrics import CorrectionMetrics, ReasoningMetrics
from cipo_lightning.rollout.callback import sample_scored_groups
from cipo_lightning.rollout.corrections import CORRECT
from cipo_lightning.rollout.engine import RolloutEngine, SamplingSettings


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    rows: list[Row],
    sampling: SamplingSettings,
    two_turn: bool = True,
    template: str = DEFAULT_CORRECTION_TEMPLATE,
) -> dict[str, float]:
    """mean@n, pass@k (k = 1, 2, 4, ..., n) and, with `two_turn`, acc@t1, acc@t2, delta, delta_i2c, delta_c2i."""
    groups = sample_scored_groups(engine, tokenizer, task, rows, [row["prompt"] for row in rows], sampling)
    first = torch.tensor([[r >= CORRECT for r in g.rewards] for g in groups], dtype=torch.long)
    reasoning = ReasoningMetrics(n=sampling.n)
    reasoning.update(first)
    results = reasoning.compute()
    if two_turn:
        messages = [correction_messages(g.row["prompt"], text, template) for g in groups for text in g.texts]
        attempt_rows = [g.row for g in groups for _ in g.texts]
        corrections = sample_scored_groups(engine, tokenizer, task, attempt_rows, messages, replace(sampling, n=1))
        second = torch.tensor([g.rewards[0] >= CORRECT for g in corrections], dtype=torch.long)
        correction = CorrectionMetrics()
        correction.update(first.flatten(), second)
        results |= correction.compute()
    return results
