"""CIPO's training-state callbacks (the adaptive replay ratio, risk-averse shaping) and how the step finds
callbacks."""

from cipo_lightning.callbacks.lookup import the_callback
from cipo_lightning.callbacks.replay import AdaptiveReplay
from cipo_lightning.callbacks.shaping import RiskShaping

__all__ = ["AdaptiveReplay", "RiskShaping", "the_callback"]
