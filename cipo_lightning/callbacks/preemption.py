"""Preemption: on SIGTERM, or on SLURM's requeue signal, finish the current step, save a checkpoint, stop.

What Lightning 2.6 does by itself (lightning/pytorch/trainer/connectors/signal_connector.py): on SIGTERM it sets
`trainer.received_sigterm`, forwards the signal to the rank processes its launcher started, and ends the run with
`SIGTERMException` once the current training step is done; it saves nothing, so a preempted job loses every step
since the last periodic checkpoint. Under SLURM with `auto_requeue` (the default when Lightning detects SLURM) it
also saves `hpc_ckpt_N.ckpt` on the requeue signal (SIGUSR1) from inside the signal handler, that is in the middle
of a step, and requeues the job.

`PreemptionCheckpoint` adds the checkpoint at Lightning's own stopping point. At the end of every training step
(where a periodic ModelCheckpoint saves, so the state is the one an exact resume needs) it asks whether any rank got
SIGTERM or the requeue signal; if one did, every rank saves `version_N/checkpoints/preempted-...ckpt` (the file
`--ckpt_path last` resumes from), global rank 0 requeues the job when the requeue signal came, the rollout engines
shut down, and every rank leaves through Lightning's SIGTERM exit at the same step. It takes over the requeue
signal by installing its handler before Lightning registers its own (Lightning leaves a signal that already has a
handler alone), so no mid-step hpc checkpoint is written. With several ranks it also replaces Lightning's SIGTERM
handler by one without the collective Lightning calls inside it (see `on_train_start`). A signal during setup stops
the run after its first training step; one during validation stops it there (Lightning abandons the validation)
without a checkpoint.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (or SLURM's requeue signal under auto_requeue), save a checkpoint after the current training step,
    shut the rollout engines down and stop on every rank; requeue the SLURM job when it asked. The CLI adds it."""

    def __init__(self) -> None:
        self.checkpoint_path: Path | None = None
        self._requeue_requested = False
        self._requeue_signal: signal.Signals | None = None
        self._previous_handler: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment  # what Lightning's SignalConnector reads
        if stage != "fit" or not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes signal handlers in the main thread only
        # Installed now, before Lightning registers its handlers (after the setup hooks), so it skips this signal.
        self._requeue_signal = signal.Signals(environment.requeue_signal)
        self._previous_handler = signal.signal(self._requeue_signal, self._on_requeue_signal)

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requeue_requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            # Lightning's SIGTERM handler calls dist.broadcast from inside the handler, that is wherever each rank
            # happens to be, so it pairs with another collective of the step and the ranks hang (seen here with 2
            # CPU ranks; Lightning issue #20806). This one does the rest of what it does, without the collective:
            # the decision is reduced over the ranks at the end of the step instead. Lightning restores the handler
            # from before fit at its teardown.
            signal.signal(signal.SIGTERM, functools.partial(_note_sigterm, trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._requeue_signal is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._requeue_signal, self._previous_handler)
        self._requeue_signal = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # One decision for all ranks (any rank signalled): every rank saves (a collective) and stops at this step.
        requeue = trainer.strategy.reduce_boolean_decision(self._requeue_requested, all=False)
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm or requeue, all=False):
            return
        name = f"preempted-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        path = Path(trainer.log_dir) / "checkpoints" / name
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        reason = "the requeue signal" if requeue else "SIGTERM"
        rank_zero_info(f"preempted ({reason}) after step {trainer.global_step}: saved {path}; resume: --ckpt_path last")
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()
        # Lightning's own stop: with this flag set, every rank raises SIGTERMException once the step's metrics are
        # logged (the flag is what its SIGTERM handler sets; ranks that got no signal need it set here).
        trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        from cipo_lightning.rollout import RolloutCallback  # here: cipo_lightning.rollout imports this package

        for callback in trainer.callbacks:
            if isinstance(callback, RolloutCallback):
                callback.shutdown_engine()
        if self.checkpoint_path is None:
            rank_zero_warn(
                "stopped by a signal outside a training step (during validation): no checkpoint saved; "
                "--ckpt_path last resumes from the newest periodic checkpoint"
            )


def _note_sigterm(trainer: L.Trainer, signum: int, frame: FrameType | None) -> None:
    """Lightning's SIGTERM handler less its broadcast: pass the signal to the rank processes this one launched (once),
    and set the flag its loops stop on."""
    connector = trainer._signal_connector
    if not connector.received_sigterm and trainer.strategy.launcher is not None:
        trainer.strategy.launcher.kill(signum)
    connector.received_sigterm = True


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (the array task, in a job array), as Lightning's own requeue does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(f"scontrol requeue {job} failed: {error}")
        return
    if result.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
