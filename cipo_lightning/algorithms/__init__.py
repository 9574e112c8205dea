"""The RL objective as pure tensor functions: no Lightning, no models, unit-tested against hand-computed values."""

from cipo_lightning.algorithms.advantages import group_advantages, group_stats
from cipo_lightning.algorithms.losses import (
    clipped_surrogate,
    k3_kl,
    masked_sum,
    sampled_token_logprobs_and_entropy,
)

__all__ = [
    "clipped_surrogate",
    "group_advantages",
    "group_stats",
    "k3_kl",
    "masked_sum",
    "sampled_token_logprobs_and_entropy",
]
