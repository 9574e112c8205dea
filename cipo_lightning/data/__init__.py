"""Tasks (prompt sources with their verifiers) and the DataModule that streams rollouts into training_step."""

from cipo_lightning.data.datamodule import RolloutDataModule
from cipo_lightning.data.tasks import BundledTask, DatasetTask, ReasoningGymTask, Task

__all__ = ["BundledTask", "DatasetTask", "ReasoningGymTask", "RolloutDataModule", "Task"]
