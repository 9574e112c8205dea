"""CIPO's training-state callbacks (the adaptive replay ratio, risk-averse reward shaping) and the checkpoint on
preemption."""

from cipo_lightning.callbacks.preemption import PreemptionCheckpoint
from cipo_lightning.callbacks.replay import AdaptiveReplay
from cipo_lightning.callbacks.shaping import RiskShaping

__all__ = ["AdaptiveReplay", "PreemptionCheckpoint", "RiskShaping"]
