"""Shared test pieces."""

from __future__ import annotations

from typing import Any

from cipo_lightning.rollout import Sample, collate_rollouts


class ParityReward:
    """1.0 when the completion has an even number of characters.

    Tiny random models never answer arithmetic correctly, so the real verifier would give every group zero variance
    and no gradient. This reward follows the same contract and splits random completions about evenly, which is what
    the training-mechanics tests need.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) for c in completions]


class HalfInformativeReward:
    """ParityReward for problems with an odd answer, 0.0 for every completion of the others (zero-variance groups)."""

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **_: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) if int(a) % 2 else 0.0 for c, a in zip(completions, answer, strict=True)]


def two_group_batch():
    """Two groups of four with different rewards and lengths (rank r of 2 gets group r)."""
    prompts = [[1, 9690, 198], [1, 4093], [1, 4093, 198, 6004], [1, 520]] * 2
    completions = [[42], [43, 44], [45, 46, 47], [48, 2], [50, 51, 52, 53], [54], [55, 56], [57, 58, 59]]
    samples = [Sample(c, [0.0] * len(c), truncated=False) for c in completions]
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    return collate_rollouts(prompts, samples, rewards, [0] * 4 + [1] * 4, 2, temperature=0.7, max_completion_len=6)
