"""CIPO's training-state callbacks (the adaptive replay ratio, risk-averse shaping), the checkpoint on preemption,
and how the step finds callbacks."""

from cipo_lightning.callbacks.lookup import the_callback
from cipo_lightning.callbacks.preemption import PreemptionCheckpoint
from cipo_lightning.callbacks.replay import AdaptiveReplay
from cipo_lightning.callbacks.shaping import RiskShaping

__all__ = ["AdaptiveReplay", "PreemptionCheckpoint", "RiskShaping", "the_callback"]
