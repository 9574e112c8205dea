"""End-to-end RL steps on a tiny random model, with each real engine.

On-policy evidence: `train/logp_mismatch` is the mean |engine log-prob - trainer log-prob| of the sampled tokens,
with the trainer's log-probs taken from the weights after the previous step. With a large learning rate every step
moves the weights far, so a mismatch near float rounding at every step means each batch was sampled with the
updated weights; the control run that skips the weight push shows the metric does see stale weights.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cipo_lightning.data import ReasoningGymTask, RolloutDataModule
from cipo_lightning.module import CIPOModule
from cipo_lightning.rollout import HFEngine, RolloutCallback
from tests.helpers import HalfInformativeReward, ParityReward

REPO = Path(__file__).resolve().parents[1]


def _initial_weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _changed(policy: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in initial.items() if not torch.equal(policy[name].float(), tensor.float())]


class _StaleCallback(RolloutCallback):
    """Control: never pushes weights after the first step, so the engine keeps sampling with the start weights."""

    def sync_weights(self, pl_module, times):
        times["time/weight_sync"] = 0.0


def _fit_hf(tiny_model: str, callback_class=RolloutCallback, steps: int = 2, reward=None, **callback_args):
    module = CIPOModule(model=tiny_model, learning_rate=1e-2, micro_batch_size=4, gradient_checkpointing=False)
    task = ReasoningGymTask(train_size=64, val_size=8, reward=reward or ParityReward())
    datamodule = RolloutDataModule(task, prompts_per_step=2)
    callback = callback_class(HFEngine(), group_size=4, max_new_tokens=8, temperature=1.0, **callback_args)
    logged = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append({k: v.item() for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, Recorder()],
    )
    trainer.fit(module, datamodule)
    return module, callback, logged


def test_hf_engine_parameters_change_and_rollouts_are_on_policy(tiny_model):
    module, callback, logged = _fit_hf(tiny_model, steps=3)
    assert len(logged) == 3
    policy = {name: p.detach() for name, p in module.policy.named_parameters()}
    assert _changed(policy, _initial_weights(tiny_model)), "no parameter changed after 3 steps"
    assert all(step["train/grad_norm"] > 0 for step in logged)
    assert all(step["train/logp_mismatch"] < 1e-4 for step in logged)


def test_stale_engine_is_detected(tiny_model):
    _, _, logged = _fit_hf(tiny_model, callback_class=_StaleCallback, steps=3)
    assert logged[0]["train/logp_mismatch"] < 1e-4  # first step: engine and policy both hold the start weights
    assert max(step["train/logp_mismatch"] for step in logged[1:]) > 1e-2


def test_dynamic_sampling_trains_only_on_informative_groups(tiny_model):
    reward = HalfInformativeReward()
    _, _, plain = _fit_hf(tiny_model, steps=3, reward=reward)
    _, _, dynamic = _fit_hf(tiny_model, steps=3, reward=reward, dynamic_sampling=True, max_generation_rounds=5)
    assert max(step["train/zero_variance_frac"] for step in plain) > 0  # the reward does make dead groups
    assert all(step["train/zero_variance_frac"] == 0 for step in dynamic)
    assert any(step["train/generation_rounds"] > 1 for step in dynamic)
    assert all(0 < step["train/informative_group_frac"] <= 1 for step in dynamic)


def _read_metrics(run_dir: Path) -> list[dict[str, float]]:
    (metrics_file,) = run_dir.glob("version_*/metrics.csv")
    with open(metrics_file) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _cli(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "cipo_lightning", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_vllm_quickstart_config_trains_on_policy(tiny_model, tmp_path):
    """The quickstart config through the CLI, with vLLM, on the tiny model: overrides, outputs, on-policy, learning."""
    result = _cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.model",
        tiny_model,
        "--model.learning_rate",
        "1e-2",
        "--rollout.engine.init_args.dtype",
        "float32",
        "--rollout.group_size",
        "4",
        "--rollout.max_new_tokens",
        "8",
        "--data.task.init_args.reward",
        "tests.helpers.ParityReward",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["train/grad_norm"] > 0 for row in rows)
    # vLLM samples with the weights the trainer holds at every step (fp32 engine: equal up to kernel rounding).
    assert all(row["train/logp_mismatch"] < 1e-3 for row in rows), [row["train/logp_mismatch"] for row in rows]
    for key in ("train/reward_mean", "train/accuracy", "train/zero_variance_frac", "train/completion_len_mean",
                "train/completion_len_max", "train/clip_frac", "train/entropy", "train/lr", "time/rollout",
                "time/verify", "time/weight_sync", "time/optim"):  # fmt: skip
        assert key in rows[0], key
    (config,) = tmp_path.glob("version_*/config.yaml")
    assert "max_steps: 3" in config.read_text()
    (checkpoint,) = tmp_path.glob("version_*/checkpoints/last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    policy = {name.removeprefix("policy."): tensor for name, tensor in state.items()}
    assert _changed(policy, _initial_weights(tiny_model)), "no parameter changed after 3 steps"
