"""Risk-averse shaping of corrections (docs/cipo.md, "Risk-averse shaping").

A correction that turns a correct anchor wrong (c -> i) must cost more than an ordinary wrong answer, so "change the
answer" is not a free move; an optional SCoRe-style bonus alpha * (r_corr - r_anchor) rewards improvement. Both act
as a term added to the correction's advantage after the group normalisation (`correction_advantage_shift`): put into
the rewards instead, the group normalisation would cancel them. A Lightning callback so the knobs are their own
config section next to the replay ratio; the correction stream (rollout/corrections.py) asks it for every correction
group's shift, and the loss adds the shift to the advantages.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from cipo_lightning.algorithms import correction_advantage_shift
from cipo_lightning.errors import ConfigError


class RiskShaping(L.Callback):
    """The advantage shift of corrections: -lambda_risk for c -> i, plus alpha * (r - r_anchor)."""

    def __init__(self, lambda_risk: float = 1.0, alpha: float = 0.0) -> None:
        """
        Args:
            lambda_risk: penalty, in advantage units, added to the advantage of a correction that turned a correct
                anchor wrong (c -> i); it acts in every group, also one where every correction broke.
            alpha: improvement bonus weight: alpha * (correction reward - anchor reward) is added to the
                correction's advantage; 0 turns it off.
        """
        if lambda_risk < 0:
            raise ConfigError(f"shaping.lambda_risk must be >= 0, got {lambda_risk}")
        if alpha < 0:
            raise ConfigError(f"shaping.alpha must be >= 0, got {alpha}")
        self.lambda_risk = lambda_risk
        self.alpha = alpha

    def advantage_shift(self, rewards: Tensor, anchor_rewards: Tensor, correct_threshold: float = 1.0) -> Tensor:
        """The term added to each correction's advantage; `anchor_rewards[i]` is the reward of correction i's
        anchor."""
        return correction_advantage_shift(rewards, anchor_rewards, self.lambda_risk, self.alpha, correct_threshold)
