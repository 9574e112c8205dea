"""Risk-averse shaping of correction rewards (../shared/CIPO.md, step 4).

A correction that turns a correct anchor wrong (c -> i) costs lambda_risk on top of its verifier reward, so
"change the answer" is not a free move; an optional SCoRe-style bonus alpha * (r_corr - r_anchor) rewards
improvement. A Lightning callback so the knobs are their own config section next to the replay ratio; the rollout
callback applies it to every correction group before the batch reaches the loss.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from cipo_lightning.algorithms import shape_correction_rewards
from cipo_lightning.errors import ConfigError


class RiskShaping(L.Callback):
    """Shapes correction rewards: r - lambda_risk for c -> i, plus alpha * (r - r_anchor)."""

    def __init__(self, lambda_risk: float = 1.0, alpha: float = 0.0) -> None:
        """
        Args:
            lambda_risk: penalty when the anchor was correct and its correction is wrong (c -> i).
            alpha: improvement bonus weight on (correction reward - anchor reward); 0 turns it off.
        """
        if lambda_risk < 0:
            raise ConfigError(f"shaping.lambda_risk must be >= 0, got {lambda_risk}")
        if alpha < 0:
            raise ConfigError(f"shaping.alpha must be >= 0, got {alpha}")
        self.lambda_risk = lambda_risk
        self.alpha = alpha

    def shape(self, rewards: Tensor, anchor_rewards: Tensor) -> Tensor:
        """Shaped rewards of corrections; `anchor_rewards[i]` is the reward of correction i's anchor."""
        return shape_correction_rewards(rewards, anchor_rewards, self.lambda_risk, self.alpha)
