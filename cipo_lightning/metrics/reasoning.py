"""Reasoning metrics over n samples per problem: mean@n, unbiased pass@k and majority-vote maj@k.

The states are integer counts (a histogram of correct samples per problem, maj@k hits, problem counts), all reduced
by sum. pass@k and mean@n depend on a problem only through its number of correct samples c, so the histogram holds
everything they need, and maj@k is decided per problem inside `update()` from that problem's own samples. Integer
sums are exact and order-free, so one process and any number of data-parallel ranks sharing out the same problems
compute identical values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 from n samples of which c are correct: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which avoids the huge binomials of the ratio form.
    """
    if n < 0 or c < 0:
        raise ValueError(f"pass_at_k needs non-negative n and c, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"pass_at_k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n (k of the n samples), got n={n}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k needs c <= n (correct samples among n), got n={n}, c={c}")
    if n - c < k:
        # Every choice of k samples includes a correct one.
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_ks(n: int) -> list[int]:
    """The powers of two below n, then n itself: 1, 2, 4, ..., n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [2**p for p in range(n.bit_length()) if 2**p < n] + [n]


def binary(values: Tensor, name: str, ndim: int) -> Tensor:
    """`values` as int64, after checking its rank and that it holds only 0/1 (bool or numeric correctness)."""
    if values.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(values.shape)}")
    if not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or bool) correctness")
    return values.to(torch.int64)


def majority_correct(answers: Sequence[Hashable | None], correct: Sequence[int], k: int) -> bool:
    """Whether the most frequent answer of the first k samples is correct.

    None (no answer extracted) does not vote; a problem with no vote is wrong. Ties go to the answer seen first
    (Counter keeps first-encounter order among equal counts). Samples with the same extracted answer get the same
    grade from a deterministic verifier, so the first sample that gave the winner stands for all of them.
    """
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return correct[list(answers).index(winner)] == 1


class ReasoningMetrics(Metric):
    """mean@n, pass@k and (when answers are given) maj@k over problems that each have exactly n samples.

    Every problem must have the same n: pass@k is the average of pass_at_k(n, c, k) over problems, and maj@k votes
    over the first k of the n samples. Pass the extracted answers either for every problem or for none (then no
    maj@k is reported); mixing raises at `compute()`. `compute()` returns a dict of floats, keyed "mean@{n}",
    "pass@{k}" and "maj@{k}", to log with `log_dict` at the end of an evaluation epoch.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, n: int, ks: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.ks = default_ks(n) if ks is None else sorted(set(ks))
        if not self.ks or not all(1 <= k <= n for k in self.ks):
            raise ValueError(f"ks must be non-empty with 1 <= k <= n={n}, got {list(self.ks)}")
        # correct_hist[c]: problems with exactly c of their n samples correct.
        self.add_state("correct_hist", torch.zeros(n + 1, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("majority_hits", torch.zeros(len(self.ks), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("voted", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: Tensor, answers: Sequence[Sequence[Hashable | None]] | None = None) -> None:
        """`correct`: [num_problems, n] 0/1 per sample; `answers`: per problem, the n extracted answers (None: none)."""
        correct = binary(correct, "correct", ndim=2)
        if correct.shape[1] != self.n:
            raise ValueError(f"correct must have n={self.n} samples per problem, got shape {tuple(correct.shape)}")
        # Check everything before touching a state, so that a rejected batch leaves none half-counted.
        if answers is not None and (len(answers) != correct.shape[0] or any(len(a) != self.n for a in answers)):
            raise ValueError(f"answers must be {correct.shape[0]} lists of n={self.n} answers, like correct")
        self.correct_hist += torch.bincount(correct.sum(dim=1), minlength=self.n + 1)
        if answers is None:
            return
        hits = [
            [majority_correct(problem_answers, problem_correct, k) for k in self.ks]
            for problem_answers, problem_correct in zip(answers, correct.tolist(), strict=True)
        ]
        self.majority_hits += torch.tensor(hits, dtype=torch.int64, device=self.device).sum(dim=0)
        self.voted += len(answers)

    def compute(self) -> dict[str, float]:
        hist = self.correct_hist.tolist()
        problems = sum(hist)
        if not problems:
            raise ValueError("ReasoningMetrics.compute() needs at least one problem (update() was never called)")
        result = {f"mean@{self.n}": sum(c * h for c, h in enumerate(hist)) / (self.n * problems)}
        for k in self.ks:
            result[f"pass@{k}"] = sum(h * pass_at_k(self.n, c, k) for c, h in enumerate(hist)) / problems
        voted = int(self.voted)
        if voted == problems:
            hits = self.majority_hits.tolist()
            result.update({f"maj@{k}": k_hits / problems for k, k_hits in zip(self.ks, hits, strict=True)})
        elif voted:
            raise ValueError(f"maj@k needs answers for every problem or none: got them for {voted} of {problems}")
        return result


def average_over_datasets(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over datasets of each metric that every dataset reports (so each benchmark counts once)."""
    if not results:
        raise ValueError("average_over_datasets needs at least one dataset's results")
    per_dataset = list(results.values())
    return {
        key: sum(metrics[key] for metrics in per_dataset) / len(per_dataset)
        for key in per_dataset[0]
        if all(key in metrics for metrics in per_dataset)
    }
