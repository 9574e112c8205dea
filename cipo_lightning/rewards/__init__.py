"""Verifiers: callables `fn(prompts, completions, **columns) -> list[float]`, dataset columns passed by name."""

from cipo_lightning.rewards.base import RewardFunction
from cipo_lightning.rewards.code import CodeTestsReward
from cipo_lightning.rewards.combine import WeightedSum
from cipo_lightning.rewards.math_answer import MathAnswerReward
from cipo_lightning.rewards.reasoning_gym import ReasoningGymReward

__all__ = ["CodeTestsReward", "MathAnswerReward", "ReasoningGymReward", "RewardFunction", "WeightedSum"]
