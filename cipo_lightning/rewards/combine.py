"""Several verifiers as one: a weighted sum, so any task can be scored by e.g. correctness plus a format check."""

from __future__ import annotations

from typing import Any

from cipo_lightning.rewards.base import RewardFunction


class WeightedSum:
    """sum_k weights[k] * rewards[k](prompts, completions, **columns), per completion."""

    def __init__(self, rewards: list[RewardFunction], weights: list[float] | None = None) -> None:
        """
        Args:
            rewards: the reward functions; each gets every column and reads what it needs.
            weights: one weight per reward function (default: 1.0 each).
        """
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if not rewards or len(weights) != len(rewards):
            raise ValueError(f"WeightedSum needs one weight per reward function, got {len(weights)} for {len(rewards)}")
        self.rewards = rewards
        self.weights = weights

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        total = [0.0] * len(completions)
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            scores = reward(prompts, completions, **columns)
            total = [t + weight * float(s) for t, s in zip(total, scores, strict=True)]
        return total
