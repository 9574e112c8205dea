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
from cipo_lightning.memory import _glibc, release_free_heap
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


def _fit_hf(
    tiny_model: str, callback_class=RolloutCallback, steps: int = 2, reward=None, module_args=None, **callback_args
):
    module = CIPOModule(
        model=tiny_model, learning_rate=1e-2, micro_batch_size=4, gradient_checkpointing=False, **(module_args or {})
    )
    task = ReasoningGymTask(train_size=64, val_size=8, reward=reward or ParityReward())
    datamodule = RolloutDataModule(task, prompts_per_step=2)
    callback = callback_class(
        HFEngine(), group_size=4, max_new_tokens=8, temperature=1.0, algorithm="grpo", **callback_args
    )
    logged = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            # Whether the heap could be given back now: never inside a CPU run (memory.keep_freed_blocks).
            heap_released = float(release_free_heap())
            logged.append({k: v.item() for k, v in trainer.callback_metrics.items()} | {"heap_released": heap_released})

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
    # The run kept freed blocks in malloc's heap from fit start to fit end, and let go at the end.
    assert all(step["heap_released"] == 0 for step in logged)
    assert release_free_heap() == (_glibc() is not None)


def test_packed_token_budget_steps_are_on_policy_without_padding(tiny_model):
    """Rows sorted by length, cut by a token budget and packed: the weights move, the trainer's log-probs still follow
    the engine's, and the passes process no padding."""
    budget = {"pack_sequences": True, "micro_batch_tokens": 48}
    module, _, logged = _fit_hf(tiny_model, steps=2, module_args=budget)
    assert _changed({n: p.detach() for n, p in module.policy.named_parameters()}, _initial_weights(tiny_model))
    assert all(step["train/logp_mismatch"] < 1e-4 for step in logged)
    assert all(step["train/padding_frac"] == 0.0 and step["train/trained_tokens_per_s"] > 0 for step in logged)
    # 2 prompts x 4 samples of prompt + completion tokens, in more than one pass of <= 48 positions.
    assert all(step["train/trained_tokens"] > 48 for step in logged)


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


def _read_metrics(version_dir: Path) -> list[dict[str, float]]:
    with open(version_dir / "metrics.csv") as f:
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


TINY_QUICKSTART = (
    "--config",
    "configs/quickstart.yaml",
    "--model.learning_rate",
    "1e-2",
    "--rollout.group_size",
    "4",
    "--rollout.max_new_tokens",
    "8",
    "--replay.rho",
    "0.5",  # one correct and one failed anchor per step, so retention is measured and rho moves
    "--data.task.init_args.reward",
    "tests.helpers.ParityReward",
)


@pytest.mark.slow
def test_vllm_quickstart_config_trains_cipo_on_policy_and_resumes_rho(tiny_model, tmp_path):
    """The quickstart config (CIPO) through the CLI, with vLLM, on the tiny model: overrides, outputs, on-policy,
    learning, the CIPO metrics, the sample table, and a resume that continues with the saved rho."""
    common = (*TINY_QUICKSTART, "--model.model", tiny_model, "--trainer.default_root_dir", str(tmp_path))
    # Validation with vLLM after the last step, on 4 held-out problems (the quickstart validates every 10 steps).
    validation = ("--trainer.val_check_interval", "3", "--data.eval_max_problems", "4")
    result = _cli("fit", *common, "--trainer.max_steps", "3", *validation)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_metrics(tmp_path / "version_0")
    (validated,) = [row for row in rows if "val/pass@4" in row]
    assert validated["step"] == 2 and {"val/basic_arithmetic/mean@4", "val/acc@t2", "val/delta_c2i"} <= set(validated)
    assert (tmp_path / "version_0" / "eval" / "val_step3.json").is_file()
    rows = [row for row in rows if "val/pass@4" not in row]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["train/grad_norm"] > 0 for row in rows)
    # vLLM samples with the weights the trainer holds at every step (fp32 engine: equal up to kernel rounding).
    assert all(row["train/logp_mismatch"] < 1e-3 for row in rows), [row["train/logp_mismatch"] for row in rows]
    for key in ("train/reward_mean", "train/accuracy", "train/zero_variance_frac", "train/completion_len_mean",
                "train/completion_len_max", "train/clip_frac", "train/entropy", "train/lr", "time/rollout",
                "time/verify", "time/weight_sync", "time/optim", "train/rho", "train/anchors_correct",
                "train/anchors_failed", "train/anchors_in_band", "train/anchors_fallback",
                "train/correction_reward_mean", "train/correction_advantage_shift_mean", "train/i2c_rate",
                "train/c2i_rate", "train/retention", "train/base_loss", "train/correction_loss",
                "train/base_clip_frac", "train/correction_clip_frac", "train/correction_prompt_len_mean",
                "train/correction_len_mean", "time/correction_rollout", "time/step", "train/padding_frac",
                "train/trained_tokens", "train/trained_tokens_per_s"):  # fmt: skip
        assert key in rows[0], key
    assert rows[0]["train/anchors_correct"] == rows[0]["train/anchors_failed"] == 1  # rho 0.5 of 2 anchors
    assert all(row["train/anchors_correct"] + row["train/anchors_failed"] == 2 for row in rows)
    samples = (tmp_path / "version_0" / "correction_samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 4  # step 0 only (every 5 steps): 2 anchors x 4 corrections
    (config,) = tmp_path.glob("version_0/config.yaml")
    assert "max_steps: 3" in config.read_text()
    checkpoint = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    policy = {name.removeprefix("policy."): tensor for name, tensor in saved["state_dict"].items()}
    assert _changed(policy, _initial_weights(tiny_model)), "no parameter changed after 3 steps"
    saved_rho = saved["callbacks"]["AdaptiveReplay"]["rho"]
    assert saved_rho != 0.5

    resumed = _cli("fit", *common, "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (row,) = _read_metrics(tmp_path / "version_1")
    assert row["step"] == 3 and row["train/rho"] == pytest.approx(saved_rho)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["math", "coder"])
def test_domain_configs_run_on_the_cpu(config, tiny_model, tmp_path):
    """configs/math.yaml and configs/coder.yaml as shipped (bundled data, their real verifiers, vLLM, CIPO), on the
    tiny model with short replies: one step each (docs/benchmarks.md gives the measured 2-step runs on the embedded
    model)."""
    result = _cli(
        "fit",
        "--config",
        f"configs/{config}.yaml",
        "--model.model",
        tiny_model,
        "--trainer.max_steps",
        "1",
        "--rollout.max_new_tokens",
        "16",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--rollout.engine.init_args.max_model_len",
        "1024",
    )  # fmt: skip (the tiny model's context)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = _read_metrics(tmp_path / "version_0")
    assert row["train/anchors_correct"] + row["train/anchors_failed"] >= 1
    assert "train/correction_reward_mean" in row
    # The random tiny model solves nothing, so every reward is 0 and the step is a logged no-op.
    assert row["train/grad_norm"] >= 0 if "train/grad_norm" in row else row["train/noop_steps"] == 1
