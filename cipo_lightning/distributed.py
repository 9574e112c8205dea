"""Reductions over data-parallel ranks, each the identity in a single process (no Lightning here).

Under DDP or FSDP every rank samples and scores its own groups, so anything that summarises a step (the loss
normalisers, the logged rollout statistics, the retention that moves rho) must be reduced over ranks, or each rank
would act on its own share: rank 0's numbers in the logs and a rho that drifts apart between ranks. Means are
reduced as (sum, count) pairs, so ranks with different numbers of rows weigh by their rows, not by rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _device() -> str:
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def max_over_ranks(value: int) -> int:
    """The largest `value` over ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor(value, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def sum_over_ranks(values: Tensor) -> tuple[Tensor, int]:
    """`values` summed over ranks (on the CPU), and the number of ranks."""
    if not is_distributed():
        return values, 1
    values = values.to(_device())
    dist.all_reduce(values)
    return values.cpu(), dist.get_world_size()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] in a single process. A collective: every rank calls
    it."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@dataclass
class StepStats:
    """A step's statistics on one rank, in a form that reduces exactly over ranks.

    means: key -> (sum, count), reported as sum / count over all ranks (NaN when the count is 0: Lightning would
    otherwise repeat the previous value); sums: totals over ranks; maxima: the largest value over ranks (times: the
    slowest rank sets the step's pace). Every rank must hold the same keys.
    """

    means: dict[str, tuple[float, float]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)

    def update(self, other: StepStats) -> StepStats:
        self.means.update(other.means)
        self.sums.update(other.sums)
        self.maxima.update(other.maxima)
        return self

    def reduce(self) -> dict[str, float]:
        """The global values: two all-reduces on every rank (one sum, one max), none in a single process."""
        mean_keys, sum_keys, max_keys = sorted(self.means), sorted(self.sums), sorted(self.maxima)
        summed = torch.tensor(
            [v for k in mean_keys for v in self.means[k]] + [self.sums[k] for k in sum_keys], dtype=torch.float64
        )
        summed, _ = sum_over_ranks(summed)
        maxima = torch.tensor([self.maxima[k] for k in max_keys], dtype=torch.float64)
        if is_distributed() and max_keys:
            maxima = maxima.to(_device())
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            maxima = maxima.cpu()
        values = summed.tolist()
        result = {
            key: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else math.nan for i, key in enumerate(mean_keys)
        }
        result.update(zip(sum_keys, values[2 * len(mean_keys) :], strict=True))
        result.update(zip(max_keys, maxima.tolist(), strict=True))
        return result
