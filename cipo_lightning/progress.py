"""The training progress bar: optimizer steps out of trainer.max_steps, with the last step's time and reward.

Lightning's default bars count batches of an epoch; the rollout stream has no epochs (so they read "Epoch 0/-2")
and, with `model.updates_per_batch` > 1, a batch is several optimizer steps.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# Logged metric -> its short name in the bar.
_SHOWN = {"time/step": "s/step", "train/reward_mean": "reward", "train/correction_reward_mean": "corr_reward"}


class StepProgressBar(TQDMProgressBar):
    """A tqdm bar over optimizer steps (`trainer.global_step` / `trainer.max_steps`), resumed runs included."""

    # Lightning's format without the rate: steps take seconds to minutes, so "0.03it/s" says less than s/step.
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    @property
    def train_description(self) -> str:
        return "step"

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        # One bar for the whole run (the stream is one endless epoch), so no new bar and no "Epoch N" here.
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The last step's time and rewards (the correction reward under CIPO), from the logged metrics."""
        logged = trainer.callback_metrics
        return {short: f"{logged[name].item():.3g}" for name, short in _SHOWN.items() if name in logged}
