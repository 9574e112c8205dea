"""The console: vLLM's expected noise filtered at its loggers (real warnings kept), the step progress bar, and no
wandb "git root ... does not exist" warning for a new run folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cipo_lightning.cli import CIPOLightningCLI, hide_expected_lightning_warnings
from cipo_lightning.data import RolloutDataModule
from cipo_lightning.errors import ConfigError
from cipo_lightning.module import CIPOModule
from cipo_lightning.progress import StepProgressBar
from cipo_lightning.rollout.vllm_engine import _EXPECTED_WARNINGS, VLLMEngine, configure_vllm_logging
from tests.helpers import tiny_grpo_fit_args

REPO = Path(__file__).resolve().parent.parent
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def vllm_logging(monkeypatch: pytest.MonkeyPatch):
    """Restores the vllm loggers' levels and VLLM_LOGGING_LEVEL after the test."""
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    loggers = [logging.getLogger(name) for name in ("vllm", *_EXPECTED_WARNINGS)]
    saved = [(logger.level, list(logger.filters)) for logger in loggers]
    yield
    for logger, (level, filters) in zip(loggers, saved, strict=True):
        logger.setLevel(level)
        logger.filters[:] = filters
    os.environ.pop("VLLM_LOGGING_LEVEL", None)


def _emit(logger_name: str, level: int, msg: str, *args: object) -> list[str]:
    logger = logging.getLogger(logger_name)
    handler = _Records()
    logger.addHandler(handler)
    try:
        logger.log(level, msg, *args)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def test_expected_vllm_warnings_are_dropped_and_real_ones_still_show(vllm_logging):
    configure_vllm_logging("WARNING")
    failed = "%s: Failed to load weights"
    assert _emit(RELOAD_LOGGER, logging.WARNING, failed, "RotaryEmbedding") == []
    assert _emit(RELOAD_LOGGER, logging.WARNING, failed, "Llama3RotaryEmbedding") == []
    assert _emit(RELOAD_LOGGER, logging.WARNING, failed, "QKVParallelLinear") == [
        "QKVParallelLinear: Failed to load weights"
    ]
    assert _emit(RELOAD_LOGGER, logging.WARNING, "something else went wrong") == ["something else went wrong"]
    seed = "The global random seed is set to %d. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, ..."
    assert _emit("vllm.engine.arg_utils", logging.WARNING, seed, 0) == []
    assert _emit("vllm.config.vllm", logging.WARNING, "Enforce eager set, disabling torch.compile") == []
    assert _emit("vllm.config.vllm", logging.WARNING, "max_model_len too large") == ["max_model_len too large"]
    threads = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
    assert _emit("vllm.v1.worker.cpu_worker", logging.WARNING, threads) == []
    assert _emit("vllm.v1.worker.cpu_worker", logging.WARNING, "libtcmalloc is not found") == [
        "libtcmalloc is not found"
    ]
    configure_vllm_logging("WARNING")  # a second engine in the same process adds no second filter
    assert len(logging.getLogger(RELOAD_LOGGER).filters) == 1


def test_filtered_loggers_are_the_modules_of_the_installed_vllm():
    """The filters name vLLM modules by path; a vLLM upgrade that moves one would silently bring its warning back."""
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None:
        pytest.skip("vLLM is not installed")
    root = Path(spec.origin).parent.parent
    for name in _EXPECTED_WARNINGS:
        assert (root / (name.replace(".", "/") + ".py")).is_file(), name


def test_vllm_info_lines_only_when_asked(vllm_logging, monkeypatch):
    configure_vllm_logging(VLLMEngine().log_level)  # the default
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert _emit("vllm.engine", logging.INFO, "start-up detail") == []
    assert _emit("vllm.engine", logging.WARNING, "a real warning") == ["a real warning"]
    configure_vllm_logging(VLLMEngine(log_level="info").log_level)
    assert _emit("vllm.engine", logging.INFO, "start-up detail") == ["start-up detail"]
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own setting wins over the default
    assert VLLMEngine().log_level == "DEBUG"
    with pytest.raises(ConfigError, match="rollout.engine.init_args.log_level"):
        VLLMEngine(log_level="LOUD")


def test_expected_lightning_warnings_hidden_and_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_expected_lightning_warnings()
        warnings.warn("You are using the `dataloader_iter` step flavor. If you consume ...", UserWarning, stacklevel=1)
        warnings.warn("Found `dataloader_iter` argument in the `training_step`. Note ...", UserWarning, stacklevel=1)
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination ...", UserWarning, stacklevel=1)
        warnings.warn("Found `dataloader_iter` argument in the `validation_step`.", UserWarning, stacklevel=1)
        warnings.warn("a real warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "Found `dataloader_iter` argument in the `validation_step`.",
        "a real warning",
    ]


def _cli(*args: str, cwd: Path = REPO, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "cipo_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_progress_bar_counts_steps_with_step_time_and_reward(tiny_model, tmp_path):
    """GRPO on the tiny model with the transformers engine, two steps, through the CLI."""
    result = _cli(
        *tiny_grpo_fit_args(tiny_model),
        "--rollout.group_size",
        "2",
        "--rollout.max_new_tokens",
        "4",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bar = [line for line in result.stdout.replace("\r", "\n").splitlines() if line.startswith("step: ")]
    assert bar, result.stdout[-3000:]
    assert "2/2" in bar[-1] and "s/step=" in bar[-1] and "reward=" in bar[-1], bar[-1]
    assert "Epoch" not in result.stdout
    assert "dataloader_iter" not in result.stderr and "IterableDataset" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("extra", "expected"), [([], StepProgressBar), (["--trainer.enable_progress_bar", "false"], type(None))]
)
def test_cli_uses_the_step_bar_unless_the_trainer_turns_bars_off(tiny_model, tmp_path, monkeypatch, extra, expected):
    monkeypatch.setattr(sys, "argv", ["cipo_lightning"])  # pytest's own arguments are not the CLI's
    args = ["--config", str(REPO / "configs/quickstart.yaml"), "--model.model", tiny_model]
    args += ["--rollout.engine", "cipo_lightning.rollout.HFEngine", "--trainer.default_root_dir", str(tmp_path)]
    cli = CIPOLightningCLI(CIPOModule, RolloutDataModule, args=args + extra, run=False, auto_configure_optimizers=False)
    assert type(cli.trainer.progress_bar_callback) is expected


@pytest.mark.slow
def test_no_wandb_git_warning_for_a_new_run_folder(tmp_path):
    """wandb (offline) started from a git repository with a remote, as in a fresh clone, with a run folder that does
    not exist yet: default_loggers creates it, so wandb finds the repository instead of warning. The control,
    Lightning's WandbLogger on a folder that does not exist yet, warns (so the check can fail)."""
    repo = tmp_path / "clone"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "remote", "add", "origin", "https://example.invalid/x.git"], cwd=repo, check=True)
    script = (
        "import sys\n"
        "from lightning.pytorch.loggers import WandbLogger\n"
        "from cipo_lightning.cli import default_loggers\n"
        "WandbLogger(save_dir='runs/plain', offline=True).experiment.finish()\n"
        "print('--- ours', file=sys.stderr, flush=True)\n"
        "default_loggers('runs/ours')[1].experiment.finish()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain, ours = result.stderr.split("--- ours")
    assert "git root" in plain and "does not exist" in plain, plain[-3000:]
    assert "does not exist" not in ours, ours[-3000:]
