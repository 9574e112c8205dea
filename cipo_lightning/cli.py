"""The command line: LightningCLI with the rollout stage as its own config section.

`python -m cipo_lightning {fit,validate,test} --config FILE [--section.key value ...]` with sections `trainer`,
`model` (CIPOModule), `data` (RolloutDataModule: training task, eval sets), `rollout` (RolloutCallback: engine,
sampling, correction stream), `replay` (AdaptiveReplay: rho), `shaping` (RiskShaping) and `eval` (Evaluation:
samples per problem, two-turn correction), plus the top-level `algorithm: cipo | grpo`. `validate` / `test` evaluate
the `model` (a checkpoint with `--ckpt_path`); `trainer.val_check_interval: N` validates every N steps during fit.
Every setting's help text comes from the typed signatures and docstrings (`--print_config`, `--help`).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any, Literal

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cipo_lightning.callbacks import AdaptiveReplay, PreemptionCheckpoint, RiskShaping
from cipo_lightning.checkpointing import latest_checkpoint
from cipo_lightning.data import RolloutDataModule
from cipo_lightning.errors import ConfigError
from cipo_lightning.evaluation import Evaluation
from cipo_lightning.module import CIPOModule
from cipo_lightning.progress import StepProgressBar
from cipo_lightning.rollout import RolloutCallback

# Lightning warnings about choices this library makes on purpose: the `dataloader_iter` training step (not prefetched,
# so every batch is generated with the current weights; see CIPOModule.training_step) and eval loaders of pre-made
# batches with a length (num_workers 0, each rank its own share, so the duplicates it warns about cannot happen).
_EXPECTED_LIGHTNING_WARNINGS = (
    r"You are using the `dataloader_iter` step flavor",
    r"Found `dataloader_iter` argument in the `training_step`",
    r"Your `IterableDataset` has `__len__` defined",
)


def hide_expected_lightning_warnings() -> None:
    """Silences `_EXPECTED_LIGHTNING_WARNINGS` (process-wide, so the command line calls it, not the library)."""
    for message in _EXPECTED_LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def default_loggers(root_dir: str) -> list[Logger]:
    """metrics.csv and a wandb run, both under `root_dir` (metrics.csv in root_dir/version_N/).

    wandb runs offline unless WANDB_MODE says otherwise (`online` to sync live, `disabled` to skip it).
    """
    # wandb looks for the git repository from its folder at start and warns "git root ... does not exist" for a
    # folder that is not there yet.
    os.makedirs(root_dir, exist_ok=True)
    offline = os.environ.get("WANDB_MODE", "offline") == "offline"
    return [
        CSVLogger(save_dir=root_dir, name=""),
        WandbLogger(save_dir=root_dir, offline=offline, project="cipo_lightning"),
    ]


class CIPOLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--algorithm",
            type=Literal["cipo", "grpo"],
            default="cipo",
            help="cipo: base groups plus the correction stream; grpo: the same code with the correction stream off",
        )
        parser.add_lightning_class_args(RolloutCallback, "rollout", required=True)
        parser.link_arguments("algorithm", "rollout.algorithm")
        # Always added (they act only under cipo), so one config shape serves both algorithms.
        parser.add_lightning_class_args(AdaptiveReplay, "replay")
        parser.add_lightning_class_args(RiskShaping, "shaping")
        parser.add_lightning_class_args(Evaluation, "eval")
        # SIGTERM (or SLURM's requeue signal): a checkpoint after the current step, then stop (docs/reliability.md).
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def instantiate_trainer(self, **kwargs: Any):
        # Lightning's default `logger: true` becomes our default pair, placed under the run's default_root_dir so
        # `--trainer.default_root_dir` moves metrics, config and checkpoints together.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(trainer_config.get("default_root_dir") or "runs"))
        # Steps out of max_steps instead of Lightning's per-epoch bar, unless the config turns the bar off or brings
        # its own. As a trainer default it goes after the sections' callbacks, so at the end of a step it shows what
        # the rollout callback has just logged.
        callbacks = trainer_config.get("callbacks") or []
        own_bar = any(isinstance(c, ProgressBar) for c in (callbacks if isinstance(callbacks, list) else [callbacks]))
        if trainer_config.get("enable_progress_bar") is not False and not own_bar:
            self.trainer_defaults["callbacks"] = [StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._resolve_last_checkpoint(start_over=True)

    def before_validate(self) -> None:
        self._resolve_last_checkpoint(start_over=False)

    def before_test(self) -> None:
        self._resolve_last_checkpoint(start_over=False)

    def _resolve_last_checkpoint(self, start_over: bool) -> None:
        """`--ckpt_path last`: the newest complete checkpoint of any earlier run under trainer.default_root_dir.

        Lightning's own "last" looks in this run's new version_N folder, where there is none yet, and would start
        from scratch with only a warning. Without any checkpoint, fit starts a new run (so one command both starts
        and resumes a preemptible job); validate and test stop with an error.
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = self.trainer.default_root_dir
        found = latest_checkpoint(root)
        if found is None and not start_over:
            raise ConfigError(f"ckpt_path last: no checkpoint under {root}/version_*/checkpoints/")
        if found is None:
            rank_zero_info(f"ckpt_path last: no checkpoint under {root}/version_*/checkpoints/, starting a new run")
        else:
            rank_zero_info(f"ckpt_path last: resuming from {found}")
        config["ckpt_path"] = None if found is None else str(found)


def main(args: list[str] | None = None) -> None:
    hide_expected_lightning_warnings()
    try:
        CIPOLightningCLI(
            CIPOModule,
            RolloutDataModule,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except SIGTERMException:
        # Stopped by SIGTERM or the requeue signal (after PreemptionCheckpoint saved, within a training step): the
        # shell's status for SIGTERM, so that `fit ... && next` does not go on with an unfinished run.
        sys.exit(128 + signal.SIGTERM)
    except Exception as err:
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        sys.exit(f"error: {config_error}")


def _find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`, if any: jsonargparse wraps errors raised while instantiating classes."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None
