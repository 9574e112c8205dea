"""CIPO's training-state callbacks: the adaptive replay ratio and risk-averse reward shaping."""

from cipo_lightning.callbacks.replay import AdaptiveReplay
from cipo_lightning.callbacks.shaping import RiskShaping

__all__ = ["AdaptiveReplay", "RiskShaping"]
