"""The stream between the rollout callback and training_step.

Lightning prefetches one batch ahead from an iterable loader, so a batch generated inside the loader would be
sampled with the weights from before the previous step. Instead, the rollout callback generates at the start of
each step (after the previous optimizer step) and pushes the scored batch here; training_step takes
`dataloader_iter` (which Lightning does not prefetch) and pulls exactly that batch.

The DataModule also owns the prompt order: a seeded shuffle of the task's training rows, reshuffled every pass,
split across data-parallel ranks, with its position saved in checkpoints.

For validate and test (and validation during fit) it serves the eval sets: one dataloader per set, each rank its own
contiguous share of the problems, in batches of rows. Sharding is done here rather than by Lightning's
DistributedSampler, which pads ranks with repeated problems and would count them twice.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from cipo_lightning.data.tasks import Row, Task, is_fix_set, prompt_token_ids
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


class _Batches(IterableDataset):
    """Yields pre-made batches (an iterable dataset, so Lightning adds no DistributedSampler of its own)."""

    def __init__(self, batches: list[list[Row]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[Row]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class EvalSet:
    """An eval set: its label in metric keys, the task (prompts and verifier), every rank's rows, and its kind."""

    label: str
    task: Task
    rows: list[Row]
    fix: bool  # fix-given-solution (rows carry an `attempt`) rather than reasoning


class RolloutDataModule(L.LightningDataModule):
    """Prompts in, scored rollout batches out; eval sets for validate and test."""

    def __init__(
        self,
        task: Task | None = None,
        prompts_per_step: int = 4,
        seed: int = 0,
        eval_tasks: list[Task] | None = None,
        eval_max_problems: int | None = None,
        eval_batch_size: int = 64,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """
        Args:
            task: training prompts and their verifier (needed by fit); its held-out rows are the default eval set.
            prompts_per_step: prompts per optimizer step on each rank (each sampled rollout.group_size times).
            seed: seed of the prompt order.
            eval_tasks: eval sets for validate, test and validation during fit (trainer.val_check_interval). Each
                evaluates its held-out rows when it has some (ReasoningGymTask's validation problems, BundledTask's
                val_size, DatasetTask's val_path / val_split), otherwise all its rows (e.g. BundledTask humaneval:
                the whole benchmark). Default: the training task's held-out rows.
            eval_max_problems: evaluate at most the first this many problems of each set (None: all).
            eval_batch_size: problems per evaluation batch on each rank (each sampled eval.n times); the engine
                batches them all at once, so larger is faster until memory runs out.
            max_prompt_tokens: the longest prompt, in tokens after the chat template, of a training or eval row;
                checked when fit starts, before any generation. A longer one stops the run with an error naming
                the row, or is skipped and counted when its task sets skip_bad_rows. None: no check (the engine's
                max_model_len still bounds prompt + completion).
        """
        super().__init__()
        for key, value in {"prompts_per_step": prompts_per_step, "eval_batch_size": eval_batch_size}.items():
            if value < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {value}")
        for key, value in {"eval_max_problems": eval_max_problems, "max_prompt_tokens": max_prompt_tokens}.items():
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be >= 1 (or null), got {value}")
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.eval_tasks = list(eval_tasks or [])
        self.eval_max_problems = eval_max_problems
        self.eval_batch_size = eval_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self.eval_sets: list[EvalSet] = []
        self._queue: deque[RolloutBatch] = deque()
        self._order: list[int] = []
        self._pass = 0
        self._position = 0

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.task is None:
            raise ConfigError("data.task is required to fit (the training prompts and their verifier)")
        if self.task is not None and not self.train_rows and (stage == "fit" or not self.eval_tasks):
            self.train_rows, self.val_rows = self.task.load()
            if not self.train_rows:
                raise ConfigError(f"data.task: {type(self.task).__name__} produced no training rows")
            self._shuffle()
        if not self.eval_sets:
            self.eval_sets = self._load_eval_sets()

    def _load_eval_sets(self) -> list[EvalSet]:
        if self.eval_tasks:
            loaded = []
            for task in self.eval_tasks:
                train, held_out = task.load()
                loaded.append((task, held_out or train))
        else:
            loaded = [(self.task, self.val_rows)] if self.task is not None and self.val_rows else []
        sets, labels = [], set()
        for task, rows in loaded:
            label, copy = task.label, 2
            while label in labels:  # two sets from one source get distinct keys: gsm8k, gsm8k_2
                label, copy = f"{task.label}_{copy}", copy + 1
            labels.add(label)
            rows = rows[: self.eval_max_problems]
            sets.append(EvalSet(label, task, rows, is_fix_set(rows, label)))
        return sets

    def check_prompt_lengths(self, tokenizer: Any) -> None:
        """Apply data.max_prompt_tokens to the training rows and the eval sets (see __init__); skipped rows are
        noted in their task's skipped_rows."""
        if self.max_prompt_tokens is None:
            return
        sets = [("training", self.task, self.train_rows)] + [
            (f"eval set {s.label!r}", s.task, s.rows) for s in self.eval_sets
        ]
        for kind, task, rows in sets:
            kept = []
            for index, row in enumerate(rows):
                length = len(prompt_token_ids(tokenizer, row["prompt"]))
                if length <= self.max_prompt_tokens:
                    kept.append(row)
                    continue
                reason = f"the prompt has {length} tokens, over data.max_prompt_tokens {self.max_prompt_tokens}"
                task.bad_row(f"{kind} row {index} of {task.label}", reason)
            if len(kept) < len(rows):  # warn once per set that lost rows here, not again for load-time skips
                task.warn_skipped()
            rows[:] = kept
        if not self.train_rows:
            raise ConfigError(f"data.max_prompt_tokens {self.max_prompt_tokens}: no training row is that short")
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

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per eval set (validation_step gets its index), each over this rank's share of the problems."""
        if not self.eval_sets and self.trainer is not None and self.trainer.state.fn != "fit":
            raise ConfigError(
                "nothing to evaluate: set data.eval_tasks, or a data.task with held-out rows (e.g. a BundledTask "
                "with val_size > 0)"
            )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        loaders = []
        for eval_set in self.eval_sets:
            share = shard(eval_set.rows, rank, world)
            batches = [share[i : i + self.eval_batch_size] for i in range(0, len(share), self.eval_batch_size)]
            loaders.append(DataLoader(_Batches(batches), batch_size=None))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        """The same eval sets as validation: `test` is the same evaluation, logged under test/."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self._pass, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass, self._position = state["pass"], state["position"]
        if self.train_rows:
            self._shuffle()


def shard(rows: list[Row], rank: int, world_size: int) -> list[Row]:
    """Rank `rank`'s contiguous share of `rows`: every row on exactly one rank, shares differing by at most one."""
    start, stop = (len(rows) * rank) // world_size, (len(rows) * (rank + 1)) // world_size
    return rows[start:stop]
