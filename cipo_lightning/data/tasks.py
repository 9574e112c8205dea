"""Tasks: where prompts come from and which verifier scores the replies.

A task yields rows: a `prompt` (chat messages) plus any columns its verifier reads (`answer`, `test`, ...). Rows stay
plain dicts in memory; the prompt is rendered with the policy's chat template by the rollout callback, so one task
works with any model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from cipo_lightning.errors import ConfigError
from cipo_lightning.rewards import ReasoningGymReward, RewardFunction

Row = dict[str, Any]


class Task(ABC):
    """Prompts plus the verifier for their replies."""

    def __init__(self, reward: RewardFunction | None) -> None:
        if reward is None:
            raise ConfigError(
                f"data.task: {type(self).__name__} has no verifier; set data.task.init_args.reward to a reward "
                "function (class_path: cipo_lightning.rewards....)"
            )
        self.reward = reward

    @abstractmethod
    def load(self) -> tuple[list[Row], list[Row]]:
        """Train rows and validation rows."""

    def score(self, rows: list[Row], completions: list[str]) -> list[float]:
        """Rewards for `completions[i]`, a reply to `rows[i]`; row columns reach the verifier by name."""
        prompts = [row["prompt"][-1]["content"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        rewards = self.reward(prompts, completions, **columns)
        if len(rewards) != len(completions):
            raise ValueError(f"{type(self.reward).__name__} returned {len(rewards)} rewards for {len(completions)}")
        return [float(r) for r in rewards]


def user_prompt(text: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one user turn, with an optional system turn."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": text}]


class ReasoningGymTask(Task):
    """A procedural reasoning-gym dataset, with disjoint train and validation problems."""

    def __init__(
        self,
        name: str = "basic_arithmetic",
        dataset_kwargs: dict[str, Any] | None = None,
        train_size: int = 10_000,
        val_size: int = 200,
        seed: int = 0,
        instruction: str = " Give only the final number.",
        system_prompt: str | None = None,
        reward: RewardFunction | None = None,
    ) -> None:
        """
        Args:
            name: reasoning-gym dataset, e.g. "basic_arithmetic", "chain_sum".
            dataset_kwargs: the dataset's own settings (e.g. min_terms, max_digits, operators).
            train_size: training problems (the stream cycles through them, reshuffled each pass).
            val_size: validation problems, generated from another seed; any that also occur in train are dropped.
            seed: seed of the training problems; validation uses seed + 1.
            instruction: appended to each question (the answer format the verifier expects).
            system_prompt: optional system message.
            reward: verifier; default: ReasoningGymReward for `name` (strict 1.0 / 0.0).
        """
        super().__init__(reward if reward is not None else ReasoningGymReward(name))
        self.name = name
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.train_size = train_size
        self.val_size = val_size
        self.seed = seed
        self.instruction = instruction
        self.system_prompt = system_prompt

    def load(self) -> tuple[list[Row], list[Row]]:
        import reasoning_gym

        try:
            train = reasoning_gym.create_dataset(self.name, size=self.train_size, seed=self.seed, **self.dataset_kwargs)
            val = reasoning_gym.create_dataset(self.name, size=self.val_size, seed=self.seed + 1, **self.dataset_kwargs)
        except (KeyError, TypeError, ValueError, AssertionError) as err:
            raise ConfigError(
                f"data.task: reasoning-gym dataset {self.name!r} with {self.dataset_kwargs}: {err}"
            ) from err
        train_rows = [self._row(entry) for entry in train]
        seen = {row["question"] for row in train_rows}
        val_rows = [row for row in map(self._row, val) if row["question"] not in seen]
        return train_rows, val_rows

    def _row(self, entry: dict[str, Any]) -> Row:
        return {
            "prompt": user_prompt(entry["question"] + self.instruction, self.system_prompt),
            "question": entry["question"],
            "answer": str(entry["answer"]),
            "metadata": json.dumps(entry["metadata"], default=str),
        }


class FileTask(Task):
    """Prompts from local jsonl / json / parquet files (one row per problem), scored by the given verifier."""

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        prompt_column: str = "prompt",
        system_prompt: str | None = None,
        reward: RewardFunction | None = None,
    ) -> None:
        """
        Args:
            train_file: training rows (.jsonl, .json or .parquet).
            val_file: validation rows, same format.
            prompt_column: column holding the problem text; the other columns reach the verifier by name.
            system_prompt: optional system message.
            reward: verifier (required).
        """
        super().__init__(reward)
        self.train_file = train_file
        self.val_file = val_file
        self.prompt_column = prompt_column
        self.system_prompt = system_prompt

    def load(self) -> tuple[list[Row], list[Row]]:
        return self._read(self.train_file), self._read(self.val_file) if self.val_file else []

    def _read(self, file: str) -> list[Row]:
        import datasets

        path = Path(file)
        formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        if not path.is_file():
            raise ConfigError(f"data.task: no such file {file!r}")
        if path.suffix not in formats:
            raise ConfigError(f"data.task: {file!r} is not .jsonl, .json or .parquet")
        table = datasets.load_dataset(formats[path.suffix], data_files=str(path), split="train")
        if self.prompt_column not in table.column_names:
            raise ConfigError(
                f"data.task.prompt_column: {file!r} has no column {self.prompt_column!r} (has {table.column_names})"
            )
        rows = []
        for index, record in enumerate(table):
            text = record.pop(self.prompt_column)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{file}: row {index}: column {self.prompt_column!r} is empty or not text")
            rows.append({"prompt": user_prompt(text, self.system_prompt), **record})
        return rows
