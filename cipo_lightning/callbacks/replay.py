"""The adaptive replay ratio rho: the share of correct anchors in each step's correction stream.

A Lightning callback because rho and the previous step's retention are training state: Lightning saves a callback's
`state_dict` in every checkpoint and restores it on resume, so a resumed run selects anchors with the rho it had
reached, not with rho0. The rollout callback reads `rho` when it selects anchors and reports the step's retention
through `observe`; the update rule itself is the pure `update_rho` (docs/cipo.md, "Adaptive replay ratio").
"""

from __future__ import annotations

from typing import Any

import lightning as L

from cipo_lightning.algorithms import update_rho
from cipo_lightning.errors import ConfigError


class AdaptiveReplay(L.Callback):
    """Keeps rho and updates it from each step's retention (share of correct anchors whose corrections stay correct)."""

    def __init__(
        self,
        rho: float = 0.3,
        rho_min: float = 0.2,
        rho_max: float = 0.8,
        retention_target: float = 0.8,
        w1: float = 0.8,
        w2: float = 0.3,
    ) -> None:
        """
        Args:
            rho: initial share of correct anchors (rho0).
            rho_min: lower bound of rho; > 0 unless w1 = w2 = 0 (the update is multiplicative: a rho at 0 would
                never move again).
            rho_max: upper bound of rho.
            retention_target: retention below this raises rho (the model over-edits right answers).
            w1: gain on (retention_target - retention).
            w2: gain on a drop of retention since the previous step with correct anchors. w1 = w2 = 0 keeps rho
                fixed at its initial value (no adaptive replay; rho 0 then means failed anchors only).
        """
        for key, value in {
            "rho": rho,
            "rho_min": rho_min,
            "rho_max": rho_max,
            "retention_target": retention_target,
        }.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"replay.{key} must lie in [0, 1], got {value}")
        if rho_min > rho_max:
            raise ConfigError(f"replay.rho_min ({rho_min}) must be <= replay.rho_max ({rho_max})")
        if not rho_min <= rho <= rho_max:
            raise ConfigError(f"replay.rho ({rho}) must lie in [rho_min, rho_max] = [{rho_min}, {rho_max}]")
        for key, value in {"w1": w1, "w2": w2}.items():
            if value < 0:
                raise ConfigError(f"replay.{key} must be >= 0, got {value}")
        if rho_min <= 0 and (w1 > 0 or w2 > 0):
            raise ConfigError(
                f"replay.rho_min must be > 0 while rho adapts (w1 or w2 > 0): rho is updated multiplicatively and at 0 "
                f"would never move again; got {rho_min}"
            )
        self.rho = rho
        self.rho_min = rho_min
        self.rho_max = rho_max
        self.retention_target = retention_target
        self.w1 = w1
        self.w2 = w2
        self.retention_prev: float | None = None

    def observe(self, retention: float | None) -> None:
        """Update rho from this step's retention (None: the step had no correct anchor, nothing changes)."""
        self.rho = update_rho(
            self.rho,
            retention,
            self.retention_prev,
            self.retention_target,
            self.w1,
            self.w2,
            self.rho_min,
            self.rho_max,
        )
        if retention is not None:
            self.retention_prev = retention

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "retention_prev": self.retention_prev}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rho = state_dict["rho"]
        self.retention_prev = state_dict["retention_prev"]
