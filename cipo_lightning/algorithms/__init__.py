"""The RL objective as pure tensor functions: no Lightning, no models, unit-tested against hand-computed values."""

from cipo_lightning.algorithms.advantages import compute_advantages, group_advantages, group_stats, rloo_advantages
from cipo_lightning.algorithms.aggregation import Aggregation, token_weights
from cipo_lightning.algorithms.cipo import (
    Anchor,
    correction_advantage_shift,
    correction_messages,
    retention_counts,
    select_anchors,
    update_rho,
)
from cipo_lightning.algorithms.losses import (
    PolicyLoss,
    cispo_loss,
    clipped_surrogate,
    kl_penalty,
    masked_sum,
    overlong_penalty,
    policy_token_loss,
    sampled_token_logprobs_and_entropy,
    sequence_log_ratio,
    truncated_is_weights,
)

__all__ = [
    "Aggregation",
    "Anchor",
    "correction_advantage_shift",
    "correction_messages",
    "retention_counts",
    "select_anchors",
    "update_rho",
    "cispo_loss",
    "clipped_surrogate",
    "compute_advantages",
    "group_advantages",
    "group_stats",
    "kl_penalty",
    "PolicyLoss",
    "masked_sum",
    "overlong_penalty",
    "policy_token_loss",
    "rloo_advantages",
    "sampled_token_logprobs_and_entropy",
    "sequence_log_ratio",
    "token_weights",
    "truncated_is_weights",
]
