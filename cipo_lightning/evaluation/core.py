"""Evaluation of a policy on eval sets: reasoning (mean@n, pass@k, maj@k) and correction (two-turn, fix accuracy).

The same sampling path as training (`sample_scored_groups`: chat template, engine, task verifier), so an evaluation
measures what training optimises. Two kinds of eval set:

- Reasoning sets (rows without an `attempt`): n samples per problem give mean@n, unbiased pass@k and, when the
  verifier extracts final answers, majority-vote maj@k. With two-turn self-correction (SCoRe) every first attempt is
  shown back with the training correction template (which never says whether the attempt was right) and one
  correction is sampled: acc@t1 (= mean@n on the same samples), acc@t2, delta, delta_i2c, delta_c2i.
- Fix-given-solution sets (every row has an `attempt`, a given wrong solution, e.g. DebugBench): the attempt is shown
  with the same template and n corrections are sampled: fix_acc.

`evaluate()` is the one-call Python entry point; the Evaluation callback (callback.py) uses the same pieces batch by
batch inside Lightning's validate and test loops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from cipo_lightning.algorithms.cipo import DEFAULT_CORRECTION_TEMPLATE, correction_messages
from cipo_lightning.data.tasks import ATTEMPT_COLUMN, Row, Task, is_fix_set
from cipo_lightning.metrics import CorrectionMetrics, FixAccuracy, ReasoningMetrics
from cipo_lightning.rollout.callback import sample_scored_groups
from cipo_lightning.rollout.engine import RolloutEngine, SamplingSettings


@dataclass
class ScoredEval:
    """One batch of problems, sampled and verified."""

    correct: Tensor  # [problems, n] 0/1: first attempts (reasoning set) or corrections of the given attempt (fix set)
    answers: list[list[str | None]] | None  # [problems][n] extracted final answers for maj@k; None: no extractor
    corrected: Tensor | None  # [problems * n] 0/1: each first attempt's correction (two-turn); None otherwise
    records: list[dict[str, Any]]  # one per sample, for the samples file


def evaluate_rows(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    rows: list[Row],
    sampling: SamplingSettings,
    fix: bool,
    two_turn: bool,
    template: str = DEFAULT_CORRECTION_TEMPLATE,
    correct_threshold: float = 1.0,
) -> ScoredEval:
    """Sample and score `sampling.n` replies per row (corrections of the given attempts when `fix`), and with
    `two_turn` one correction of every reasoning attempt. A reward >= `correct_threshold` counts as correct."""
    if fix:
        messages = [correction_messages(row["prompt"], row[ATTEMPT_COLUMN], template) for row in rows]
    else:
        messages = [row["prompt"] for row in rows]
    groups = sample_scored_groups(engine, tokenizer, task, rows, messages, sampling)
    correct = torch.tensor([[r >= correct_threshold for r in g.rewards] for g in groups], dtype=torch.long)
    texts = [text for g in groups for text in g.texts]
    rewards = [r for g in groups for r in g.rewards]
    problems = [g.row["prompt"][-1]["content"] for g in groups for _ in g.texts]
    if fix:
        attempts = [g.row[ATTEMPT_COLUMN] for g in groups for _ in g.texts]
        records = [
            {"problem": p, "given_attempt": a, "correction": t, "reward": r}
            for p, a, t, r in zip(problems, attempts, texts, rewards, strict=True)
        ]
        return ScoredEval(correct, None, None, records)
    flat_answers = task.answers(texts)
    n = sampling.n
    answers = None if flat_answers is None else [flat_answers[i : i + n] for i in range(0, len(texts), n)]
    records = [
        {"problem": p, "attempt": t, "reward": r} | ({} if flat_answers is None else {"answer": flat_answers[i]})
        for i, (p, t, r) in enumerate(zip(problems, texts, rewards, strict=True))
    ]
    corrected = None
    if two_turn:
        messages = [correction_messages(g.row["prompt"], text, template) for g in groups for text in g.texts]
        attempt_rows = [g.row for g in groups for _ in g.texts]
        corrections = sample_scored_groups(engine, tokenizer, task, attempt_rows, messages, replace(sampling, n=1))
        corrected = torch.tensor([g.rewards[0] >= correct_threshold for g in corrections], dtype=torch.long)
        for record, g in zip(records, corrections, strict=True):
            record |= {"correction": g.texts[0], "correction_reward": g.rewards[0]}
    return ScoredEval(correct, answers, corrected, records)


class EvalMetrics(torch.nn.Module):
    """The metrics of one eval set. A Module, so `.to(device)` moves the states where the ranks' reduce needs them."""

    def __init__(self, n: int, fix: bool, two_turn: bool) -> None:
        super().__init__()
        self.fix = FixAccuracy() if fix else None
        self.reasoning = None if fix else ReasoningMetrics(n)
        self.correction = CorrectionMetrics() if two_turn and not fix else None

    def update(self, scored: ScoredEval) -> None:
        if self.fix is not None:
            self.fix.update(scored.correct.flatten().to(self.fix.device))
            return
        device = self.reasoning.device
        self.reasoning.update(scored.correct.to(device), scored.answers)
        if self.correction is not None:
            self.correction.update(scored.correct.flatten().to(device), scored.corrected.to(device))

    def compute(self) -> dict[str, float]:
        """The set's metrics, reduced over data-parallel ranks (torchmetrics syncs the states in compute)."""
        if self.fix is not None:
            return self.fix.compute()
        results = self.reasoning.compute()
        return results | self.correction.compute() if self.correction is not None else results


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    rows: list[Row],
    sampling: SamplingSettings,
    two_turn: bool = True,
    template: str = DEFAULT_CORRECTION_TEMPLATE,
    correct_threshold: float = 1.0,
) -> dict[str, float]:
    """The metrics of `rows` in one call: mean@n, pass@k (k = 1, 2, 4, ..., n), maj@k when the verifier extracts
    answers, and with `two_turn` acc@t1, acc@t2, delta, delta_i2c, delta_c2i; fix_acc for a fix-given-solution set.
    A reward >= `correct_threshold` counts as correct (training uses rollout.correct_threshold)."""
    fix = is_fix_set(rows, task.label)
    metrics = EvalMetrics(sampling.n, fix, two_turn)
    metrics.update(evaluate_rows(engine, tokenizer, task, rows, sampling, fix, two_turn, template, correct_threshold))
    return metrics.compute()
