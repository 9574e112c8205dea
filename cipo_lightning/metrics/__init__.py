"""Evaluation metrics as torchmetrics Metrics with sum-reduced integer states: exact under data parallelism."""

from cipo_lightning.metrics.correction import CorrectionMetrics, FixAccuracy
from cipo_lightning.metrics.reasoning import (
    ReasoningMetrics,
    average_over_datasets,
    default_ks,
    majority_correct,
    pass_at_k,
)

__all__ = [
    "CorrectionMetrics",
    "FixAccuracy",
    "ReasoningMetrics",
    "average_over_datasets",
    "default_ks",
    "majority_correct",
    "pass_at_k",
]
