"""The rollout stage of every RL step: prompts -> sampled completions -> verifier rewards -> a training batch.

It runs in `on_train_batch_start`, that is after the previous optimizer step and before training_step pulls the
batch, so step k always trains on completions sampled with the weights after step k-1 (on-policy). Before
generating it pushes the policy's weights into the engine whenever they changed since the last push (and once at the
start, which also covers a run resumed from a checkpoint).

With dynamic sampling (DAPO) groups whose completions all got the same reward are dropped, since their advantages
are zero, and new prompts are sampled until the step has data.prompts_per_step informative groups or
max_generation_rounds is reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from cipo_lightning.algorithms import group_stats
from cipo_lightning.data.tasks import Row, Task
from cipo_lightning.errors import ConfigError
from cipo_lightning.rollout.batch import RolloutBatch, collate_rollouts
from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings


@dataclass
class ScoredGroup:
    """The completions sampled for one prompt, with their rewards."""

    prompt_ids: list[int]
    samples: list[Sample]
    rewards: list[float]

    @property
    def informative(self) -> bool:
        """Whether the rewards differ, i.e. the group's advantages are not all zero."""
        return max(self.rewards) > min(self.rewards)


class RolloutCallback(L.Callback):
    """Generates and scores each step's groups with the current policy and streams them to the DataModule."""

    def __init__(
        self,
        engine: RolloutEngine,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        dynamic_sampling: bool = False,
        max_generation_rounds: int = 3,
    ) -> None:
        """
        Args:
            engine: the rollout engine (cipo_lightning.rollout.VLLMEngine or HFEngine).
            group_size: completions sampled per prompt (G); advantages compare completions within a group.
            max_new_tokens: longest completion; longer ones are cut and marked truncated.
            temperature: sampling temperature; the trainer scores tokens at the same temperature.
            top_p: nucleus sampling threshold.
            dynamic_sampling: drop groups whose completions all got the same reward (no gradient signal) and
                sample new prompts to refill the step (DAPO).
            max_generation_rounds: with dynamic_sampling, the most generation rounds per step; the step trains on
                the informative groups found by then (or, if none, on the last round's groups: a zero gradient).
        """
        if group_size < 2:
            raise ConfigError(
                f"rollout.group_size must be >= 2 (advantages compare samples of a prompt), got {group_size}"
            )
        if max_generation_rounds < 1:
            raise ConfigError(f"rollout.max_generation_rounds must be >= 1, got {max_generation_rounds}")
        if temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for RL sampling, got {temperature}")
        self.engine = engine
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.dynamic_sampling = dynamic_sampling
        self.max_generation_rounds = max_generation_rounds
        self._synced_version: int | None = None
        self._started = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._started:
            seed = torch.initial_seed() % 2**31 + trainer.global_rank
            self.engine.start(pl_module.model_path, seed=seed, device=pl_module.device)
            self._started = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.engine.shutdown()
        self._started = False
        self._synced_version = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        times = {"time/rollout": 0.0, "time/verify": 0.0}
        self.sync_weights(pl_module, times)
        datamodule = trainer.datamodule
        groups = self.sample_groups(pl_module, datamodule.task, datamodule.next_prompts(), times)
        stats = {}
        if self.dynamic_sampling:
            sampled, kept, rounds = len(groups), [g for g in groups if g.informative], 1
            while len(kept) < datamodule.prompts_per_step and rounds < self.max_generation_rounds:
                more = self.sample_groups(pl_module, datamodule.task, datamodule.next_prompts(), times)
                sampled, rounds = sampled + len(more), rounds + 1
                kept += [g for g in more if g.informative]
            stats = {"train/generation_rounds": rounds, "train/informative_group_frac": len(kept) / sampled}
            groups = kept[: datamodule.prompts_per_step] or groups
        rollout_batch = self.collate(groups, pl_module.tokenizer.pad_token_id)
        datamodule.push(rollout_batch)
        stats.update(rollout_stats(rollout_batch))
        reward = stats.pop("train/reward_mean")
        size = len(groups)
        pl_module.log("train/reward_mean", reward, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        pl_module.log_dict({**stats, **times}, on_step=True, on_epoch=False, batch_size=size)

    def sync_weights(self, pl_module: L.LightningModule, times: dict[str, float]) -> None:
        """Push the policy's weights into the engine if they changed since the last push."""
        start = time.perf_counter()
        if self._synced_version != pl_module.policy_version:
            self.engine.load_weights(pl_module.policy_weights())
            self._synced_version = pl_module.policy_version
        times["time/weight_sync"] = time.perf_counter() - start

    def sample_groups(
        self, pl_module: L.LightningModule, task: Task, rows: list[Row], times: dict[str, float]
    ) -> list[ScoredGroup]:
        """Sample group_size completions per row with the engine and score them with the task's verifier."""
        tokenizer = pl_module.tokenizer
        prompts = [
            tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False) for row in rows
        ]
        sampling = SamplingSettings(
            n=self.group_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )
        start = time.perf_counter()
        sampled = self.engine.generate(prompts, sampling)
        times["time/rollout"] += time.perf_counter() - start

        samples = [s for group in sampled for s in group]
        texts = tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        start = time.perf_counter()
        rewards = task.score([row for row in rows for _ in range(self.group_size)], texts)
        times["time/verify"] += time.perf_counter() - start
        n = self.group_size
        return [
            ScoredGroup(prompt, group, rewards[i * n : (i + 1) * n])
            for i, (prompt, group) in enumerate(zip(prompts, sampled, strict=True))
        ]

    def collate(self, groups: list[ScoredGroup], pad_token_id: int) -> RolloutBatch:
        """One training batch from scored groups: one row per completion, one group id per prompt."""
        return collate_rollouts(
            prompts=[g.prompt_ids for g in groups for _ in g.samples],
            samples=[s for g in groups for s in g.samples],
            rewards=[r for g in groups for r in g.rewards],
            group_ids=[i for i, g in enumerate(groups) for _ in g.samples],
            pad_token_id=pad_token_id,
            temperature=self.temperature,
            max_completion_len=self.max_new_tokens,
        )


def rollout_stats(batch: RolloutBatch) -> dict[str, float]:
    """What the sampled groups look like: reward, accuracy, how many groups carry no signal, lengths."""
    _, std, _ = group_stats(batch.rewards, batch.group_ids)
    lengths = batch.completion_mask.sum(-1)
    return {
        "train/reward_mean": batch.rewards.mean().item(),
        "train/accuracy": (batch.rewards >= 1.0).float().mean().item(),
        "train/zero_variance_frac": (std == 0).float().mean().item(),
        "train/completion_len_mean": lengths.mean().item(),
        "train/completion_len_max": lengths.max().item(),
        "train/truncated_frac": batch.truncated.float().mean().item(),
        "train/prompt_len_mean": batch.attention_mask[:, : batch.prompt_width].sum(-1).float().mean().item(),
    }
