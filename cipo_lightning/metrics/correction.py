"""Self-correction metrics: two-turn accuracy and its transitions (SCoRe, Kumar et al. 2024), and fix accuracy.

SCoRe reports Accuracy@t1, Accuracy@t2, Delta(t1, t2) = Accuracy@t2 - Accuracy@t1, and the transitions
Delta^{i->c} (wrong at t1, right at t2) and Delta^{c->i} (right at t1, wrong at t2), both as fractions of *all*
samples so that Delta = Delta^{i->c} - Delta^{c->i}: a model that only looks like it improves by also breaking correct
answers shows up in Delta^{c->i}. Fix accuracy scores corrections of given wrong solutions (not the model's own).

States are integer counts reduced by sum, so one process and data-parallel ranks compute identical values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cipo_lightning.metrics.reasoning import binary


class CorrectionMetrics(Metric):
    """acc@t1, acc@t2, delta, delta_i2c and delta_c2i over (attempt 1, attempt 2) pairs on the same sample."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("total", "correct_t1", "correct_t2", "incorrect_to_correct", "correct_to_incorrect"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, first: Tensor, second: Tensor) -> None:
        """`first`, `second`: [N] 0/1 correctness of attempt 1 and of its correction (attempt 2), sample by sample."""
        first, second = binary(first, "first", ndim=1), binary(second, "second", ndim=1)
        if first.shape != second.shape:
            raise ValueError(f"first and second must pair up, got shapes {tuple(first.shape)}, {tuple(second.shape)}")
        self.total += first.numel()
        self.correct_t1 += first.sum()
        self.correct_t2 += second.sum()
        self.incorrect_to_correct += ((first == 0) & (second == 1)).sum()
        self.correct_to_incorrect += ((first == 1) & (second == 0)).sum()

    def compute(self) -> dict[str, float]:
        total = int(self.total)
        if not total:
            raise ValueError("CorrectionMetrics.compute() needs at least one sample (update() was never called)")
        t1, t2 = int(self.correct_t1), int(self.correct_t2)
        return {
            "acc@t1": t1 / total,
            "acc@t2": t2 / total,
            "delta": (t2 - t1) / total,
            "delta_i2c": int(self.incorrect_to_correct) / total,
            "delta_c2i": int(self.correct_to_incorrect) / total,
        }


class FixAccuracy(Metric):
    """fix_acc: the fraction of corrections of given wrong solutions that are correct."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("fixed", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        """`correct`: [N] 0/1 correctness of each correction."""
        correct = binary(correct, "correct", ndim=1)
        self.total += correct.numel()
        self.fixed += correct.sum()

    def compute(self) -> dict[str, float]:
        total = int(self.total)
        if not total:
            raise ValueError("FixAccuracy.compute() needs at least one sample (update() was never called)")
        return {"fix_acc": int(self.fixed) / total}
