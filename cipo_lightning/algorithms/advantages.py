"""Advantages: each completion is scored against the other samples of the same prompt.

GRPO: (r - group mean), divided by the group's std (GRPO), the batch's std, or nothing (Dr. GRPO).
RLOO: r minus the mean of the *other* samples of the group (leave-one-out baseline, unscaled).

Groups are given by an id per completion rather than a fixed group size, because one batch mixes groups of different
sizes (base groups of G and, under CIPO, correction groups of G_c).
"""

from __future__ import annotations

from typing import Literal

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


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> Tensor:
    """A_i = (r_i - mean_group) / (s + eps), s the group's std, the batch's std, or 1 ("none", Dr. GRPO).

    Zero for every member of a zero-variance group, whatever the scale. `batch_std` overrides the std of `rewards`
    for scale "batch" (under data parallelism: the std over every rank's rewards).
    """
    mean, std, _ = group_stats(rewards, group_ids)
    centred = rewards - mean
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.to(torch.float64).std() if batch_std is None else batch_std
        centred = centred / (std + eps)
    return centred.to(torch.float32)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """A_i = r_i - mean_{j != i} r_j over i's group = G / (G - 1) * (r_i - mean_group); 0 in a group of one."""
    mean, _, count = group_stats(rewards, group_ids)
    return (count / (count - 1).clamp(min=1) * (rewards - mean) * (count > 1)).to(torch.float32)


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    estimator: Literal["grpo", "rloo"] = "grpo",
    scale: Literal["group", "batch", "none"] = "group",
    batch_std: Tensor | None = None,
) -> Tensor:
    """Per-completion advantages by the configured estimator (`scale` and `batch_std` apply to grpo)."""
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids)
    return group_advantages(rewards, group_ids, scale, batch_std=batch_std)
