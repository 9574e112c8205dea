"""Group-relative advantages (GRPO): each completion is scored against the other samples of the same prompt.

Groups are given by an id per completion rather than a fixed group size, because one batch mixes groups of different
sizes (base groups of G and, under CIPO, correction groups of G_c).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-completion mean and unbiased std of its group's rewards, and the group size.

    Unbiased (Bessel) std matches TRL and verl. A group of one has std 0.
    """
    groups, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    rewards = rewards.to(torch.float64)
    sums = torch.zeros(len(groups), dtype=rewards.dtype, device=rewards.device).index_add_(0, index, rewards)
    means = sums / counts
    centred = rewards - means[index]
    sq = torch.zeros_like(sums).index_add_(0, index, centred**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    return means[index], std[index], counts[index]


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps); zero for every member of a zero-variance group."""
    mean, std, _ = group_stats(rewards, group_ids)
    return ((rewards - mean) / (std + eps)).to(torch.float32)
