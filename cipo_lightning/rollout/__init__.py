"""Rollout engines behind one interface, and the callback that runs the rollout stage of each RL step."""

from cipo_lightning.rollout.batch import RolloutBatch, collate_rollouts
from cipo_lightning.rollout.callback import RolloutCallback
from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings
from cipo_lightning.rollout.hf_engine import HFEngine
from cipo_lightning.rollout.vllm_engine import VLLMEngine
from cipo_lightning.rollout.vllm_server import VLLMServerEngine

__all__ = [
    "HFEngine",
    "RolloutBatch",
    "RolloutCallback",
    "RolloutEngine",
    "Sample",
    "SamplingSettings",
    "VLLMEngine",
    "VLLMServerEngine",
    "collate_rollouts",
]
