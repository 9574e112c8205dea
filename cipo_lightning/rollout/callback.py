"""The rollout stage of every RL step: prompts -> sampled completions -> verifier rewards -> a training batch.

It runs in `on_train_batch_start`, that is after the previous optimizer step and before training_step pulls the
batch, so step k always trains on completions sampled with the weights after step k-1 (on-policy). Before
generating it pushes the policy's weights into the engine whenever they changed since the last push (and once at the
start, which also covers a run resumed from a checkpoint).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from cipo_lightning.algorithms import group_stats
from cipo_lightning.data.tasks import Row, Task
from cipo_lightning.errors import ConfigError
from cipo_lightning.rollout.batch import RolloutBatch, collate_rollouts
from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings


class RolloutCallback(L.Callback):
    """Generates and scores each step's groups with the current policy and streams them to the DataModule."""

    def __init__(
        self,
        engine: RolloutEngine,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        """
        Args:
            engine: the rollout engine (cipo_lightning.rollout.VLLMEngine or HFEngine).
            group_size: completions sampled per prompt (G); advantages compare completions within a group.
            max_new_tokens: longest completion; longer ones are cut and marked truncated.
            temperature: sampling temperature; the trainer scores tokens at the same temperature.
            top_p: nucleus sampling threshold.
        """
        if group_size < 2:
            raise ConfigError(
                f"rollout.group_size must be >= 2 (advantages compare samples of a prompt), got {group_size}"
            )
        if temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for RL sampling, got {temperature}")
        self.engine = engine
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
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
        times: dict[str, float] = {}
        self.sync_weights(pl_module, times)
        datamodule = trainer.datamodule
        rows = datamodule.next_prompts()
        rollout_batch, stats = self.rollout(pl_module, datamodule.task, rows, times)
        datamodule.push(rollout_batch)
        reward = stats.pop("train/reward_mean")
        pl_module.log("train/reward_mean", reward, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(rows))
        pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(rows))

    def sync_weights(self, pl_module: L.LightningModule, times: dict[str, float]) -> None:
        """Push the policy's weights into the engine if they changed since the last push."""
        start = time.perf_counter()
        if self._synced_version != pl_module.policy_version:
            self.engine.load_weights(pl_module.policy_weights())
            self._synced_version = pl_module.policy_version
        times["time/weight_sync"] = time.perf_counter() - start

    def rollout(
        self, pl_module: L.LightningModule, task: Task, rows: list[Row], times: dict[str, float]
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate group_size completions per row, score them, and collate; returns the batch and its metrics."""
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
        groups = self.engine.generate(prompts, sampling)
        times["time/rollout"] = time.perf_counter() - start

        samples: list[Sample] = [s for group in groups for s in group]
        sample_rows = [row for row in rows for _ in range(self.group_size)]
        texts = tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        start = time.perf_counter()
        rewards = task.score(sample_rows, texts)
        times["time/verify"] = time.perf_counter() - start

        batch = collate_rollouts(
            prompts=[p for p in prompts for _ in range(self.group_size)],
            samples=samples,
            rewards=rewards,
            group_ids=[i // self.group_size for i in range(len(samples))],
            pad_token_id=tokenizer.pad_token_id,
            temperature=self.temperature,
            max_completion_len=self.max_new_tokens,
        )
        return batch, {**rollout_stats(batch, samples), **times}


def rollout_stats(batch: RolloutBatch, samples: list[Sample]) -> dict[str, float]:
    """What the sampled groups look like: reward, accuracy, how many groups carry no signal, lengths."""
    _, std, _ = group_stats(batch.rewards, batch.group_ids)
    lengths = batch.completion_mask.sum(-1)
    return {
        "train/reward_mean": batch.rewards.mean().item(),
        "train/accuracy": (batch.rewards >= 1.0).float().mean().item(),
        "train/zero_variance_frac": (std == 0).float().mean().item(),
        "train/completion_len_mean": lengths.mean().item(),
        "train/completion_len_max": lengths.max().item(),
        "train/truncated_frac": sum(s.truncated for s in samples) / len(samples),
        "train/prompt_len_mean": batch.attention_mask[:, : batch.prompt_width].sum(-1).float().mean().item(),
    }
