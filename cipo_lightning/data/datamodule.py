"""The stream between the rollout callback and training_step.

Lightning prefetches one batch ahead from an iterable loader, so a batch generated inside the loader would be
sampled with the weights from before the previous step. Instead, the rollout callback generates at the start of
each step (after the previous optimizer step) and pushes the scored batch here; training_step takes
`dataloader_iter` (which Lightning does not prefetch) and pulls exactly that batch.

The DataModule also owns the prompt order: a seeded shuffle of the task's training rows, reshuffled every pass,
split across data-parallel ranks, with its position saved in checkpoints.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from cipo_lightning.data.tasks import Row, Task
from cipo_lightning.errors import ConfigError
from cipo_lightning.rollout.batch import RolloutBatch


class _RolloutStream(IterableDataset):
    """Yields the batches pushed by the rollout callback, in order, forever."""

    def __init__(self, queue: deque[RolloutBatch]) -> None:
        self.queue = queue

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            if not self.queue:
                raise RuntimeError(
                    "training_step asked for a rollout batch but none was generated: "
                    "the RolloutCallback must be in the trainer's callbacks (the CLI's `rollout` section adds it)"
                )
            yield self.queue.popleft()


class RolloutDataModule(L.LightningDataModule):
    """Prompts in, scored rollout batches out."""

    def __init__(self, task: Task, prompts_per_step: int = 4, seed: int = 0) -> None:
        """
        Args:
            task: prompts and their verifier.
            prompts_per_step: prompts per optimizer step on each rank (each sampled rollout.group_size times).
            seed: seed of the prompt order.
        """
        super().__init__()
        if prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self._queue: deque[RolloutBatch] = deque()
        self._order: list[int] = []
        self._pass = 0
        self._position = 0

    def setup(self, stage: str | None = None) -> None:
        if not self.train_rows:
            self.train_rows, self.val_rows = self.task.load()
            if not self.train_rows:
                raise ConfigError(f"data.task: {type(self.task).__name__} produced no training rows")
            self._shuffle()

    def _shuffle(self) -> None:
        self._order = list(range(len(self.train_rows)))
        random.Random(self.seed * 1_000_003 + self._pass).shuffle(self._order)

    def next_prompts(self) -> list[Row]:
        """This rank's prompts for the next step. Every rank advances through the same global order."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        rows = []
        for _ in range(self.prompts_per_step * world):
            if self._position == len(self._order):
                self._pass, self._position = self._pass + 1, 0
                self._shuffle()
            rows.append(self.train_rows[self._order[self._position]])
            self._position += 1
        return rows[rank * self.prompts_per_step : (rank + 1) * self.prompts_per_step]

    def push(self, batch: RolloutBatch) -> None:
        self._queue.append(batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RolloutStream(self._queue), batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self._pass, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass, self._position = state["pass"], state["position"]
        if self.train_rows:
            self._shuffle()
