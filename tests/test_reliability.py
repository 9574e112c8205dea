"""Reliability: atomic checkpoints, exact resume after SIGKILL, guards on non-finite and signal-free steps, clear
errors on a failing vLLM engine and on bad data."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cipo_lightning.checkpointing import AtomicCheckpointIO, latest_checkpoint
from cipo_lightning.data import DatasetTask, ReasoningGymTask, RolloutDataModule
from cipo_lightning.errors import ConfigError
from cipo_lightning.rollout.corrections import correction_stats
from cipo_lightning.rollout.engine import SamplingSettings
from tests.helpers import SEEDED_PAIRS, ParityReward, prompts_beyond_one_step, two_group_batch
from tests.test_training import REPO, TINY_QUICKSTART, _cli, _fit_hf, _initial_weights, _read_metrics


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_a_failed_checkpoint_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_latest_checkpoint_skips_partial_files_and_dangling_links(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    old = tmp_path / "version_0" / "checkpoints" / "epoch=0-step=1.ckpt"
    new = tmp_path / "version_1" / "checkpoints" / "epoch=0-step=2.ckpt"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        time.sleep(0.01)
    (new.parent / ".epoch=0-step=3.ckpt.tmp-123").write_bytes(b"partial")  # a write killed before its rename
    (new.parent / "last.ckpt").symlink_to(new.parent / "gone.ckpt")  # dangling
    sharded = new.parent / "epoch=0-step=4.ckpt"  # a sharded checkpoint killed before its .metadata
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == new.resolve()
    (sharded / ".metadata").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == sharded.resolve()


# Deterministic CIPO through the CLI: transformers engine, seeded, a checkpoint every N steps (default: every step).
_CHECKPOINT_EVERY = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_top_k: -1, save_last: link}}
"""
_COMPARED = ("train/reward_mean", "train/loss", "train/grad_norm", "train/rho", "train/retention", "train/kl")


def _resume_args(tiny_model: str, root: Path, steps: int, checkpoint_every: int = 1) -> tuple[str, ...]:
    config = root.parent / f"checkpoint_every_{checkpoint_every}.yaml"
    config.write_text(_CHECKPOINT_EVERY.format(every=checkpoint_every))
    return (*TINY_QUICKSTART, "--config", str(config), "--model.model", tiny_model,
            "--rollout.engine.class_path", "cipo_lightning.rollout.HFEngine", "--trainer.val_check_interval", "1000",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps))  # fmt: skip


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_reaches_the_uninterrupted_metrics(tiny_model, tmp_path):
    """A run killed with SIGKILL during step 3 of 5 and resumed with `--ckpt_path last` logs the same step-3 and
    step-4 metrics as a run never interrupted (transformers engine, fixed seeds)."""
    steps = 5
    whole = _cli("fit", *_resume_args(tiny_model, tmp_path / "whole", steps))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = {row["step"]: row for row in _read_metrics(tmp_path / "whole" / "version_0")}

    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cipo_lightning", "fit", *_resume_args(tiny_model, root, steps)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoint = root / "version_0" / "checkpoints" / "epoch=0-step=3.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run ended or stalled before its third checkpoint"
    time.sleep(0.3)  # into step 3's rollout
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (root / "version_0" / "checkpoints" / "epoch=0-step=5.ckpt").exists(), "killed too late"

    resumed = _cli("fit", *_resume_args(tiny_model, root, steps), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {row["step"]: row for row in _read_metrics(root / "version_1")}
    first = min(rows)
    assert first >= 3 and max(rows) == steps - 1, sorted(rows)
    _assert_same_metrics(rows, expected)


def _assert_same_metrics(rows: dict[float, dict[str, float]], expected: dict[float, dict[str, float]]) -> None:
    for step, row in rows.items():
        for key in _COMPARED:
            if key in expected[step]:
                assert row[key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6, nan_ok=True), (step, key)


def _preemptible_args(tiny_model: str, root: Path, steps: int, *extra: str) -> tuple[str, ...]:
    # No periodic checkpoint within the run; the sample table gets each step's lines as its rollouts end.
    args = _resume_args(tiny_model, root, steps, checkpoint_every=1000)
    return (*args, "--rollout.sample_table_every_n_steps", "1", *extra)


def _signal_mid_step(args: tuple[str, ...], root: Path, step: int, signum: int, env: dict[str, str]) -> Path:
    """Runs the CLI with `args`, sends `signum` to it between step `step`'s rollouts and its update, and checks it
    exits with 143 within 120 s leaving no process of its session. Returns the checkpoint it saved."""
    log = root.parent / f"{root.name}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cipo_lightning", "fit", *args],
            cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    samples = root / "version_0" / "correction_samples.jsonl"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if samples.exists() and f'"step": {step}' in samples.read_text():
            break  # the step's rollouts are done, its update not yet: the middle of a step
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended or stalled before step {step}:\n" + log.read_text()[-3000:]
    process.send_signal(signum)
    try:
        returncode = process.wait(timeout=120)
        deadline = time.monotonic() + 30  # the other ranks' exit follows the launching rank's
        while _live_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _live_processes(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left (a failure here), not to outlive the test
    assert returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert not left, f"processes of the run still alive: {left}\n" + log.read_text()[-3000:]
    (checkpoint,) = (root / "version_0" / "checkpoints").glob("*.ckpt")
    assert checkpoint.name.startswith("preempted-"), checkpoint.name
    return checkpoint


def _live_processes(session: int) -> list[str]:
    """The command lines of the processes of a session that are still running (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, session
            if int(fields[3]) == session and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
    return found


def _steps_done(checkpoint: Path) -> int:
    return int(checkpoint.stem.rsplit("step=", 1)[1])


def _stopped_and_resumed_match(
    args: tuple[str, ...], root: Path, checkpoint: Path, steps: int, expected: dict[float, dict[str, float]]
) -> None:
    """The stopped run logged every step up to its checkpoint and `--ckpt_path last` the rest, all as in `expected`."""
    saved_step = _steps_done(checkpoint)
    stopped = {row["step"]: row for row in _read_metrics(root / "version_0")}
    assert sorted(stopped) == list(range(saved_step)), sorted(stopped)  # the step in progress was finished and logged
    _assert_same_metrics(stopped, expected)
    resumed = _cli("fit", *args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    rows = {row["step"]: row for row in _read_metrics(root / "version_1")}
    assert sorted(rows) == list(range(saved_step, steps)), sorted(rows)
    _assert_same_metrics(rows, expected)


_ENV = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_sigterm_mid_step_saves_a_checkpoint_and_the_resume_matches_the_uninterrupted_run(tiny_model, tmp_path):
    """SIGTERM during a step of a run whose periodic checkpoints never come (interval 1000, 5 steps): the run
    finishes the step, saves a checkpoint, shuts down and exits within a bounded time, leaving no process; the
    resume with `--ckpt_path last` logs the remaining steps as the uninterrupted run did."""
    steps = 5
    whole = _cli("fit", *_preemptible_args(tiny_model, tmp_path / "whole", steps))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = {row["step"]: row for row in _read_metrics(tmp_path / "whole" / "version_0")}

    root = tmp_path / "stopped"
    args = _preemptible_args(tiny_model, root, steps)
    checkpoint = _signal_mid_step(args, root, 2, signal.SIGTERM, _ENV)
    assert 3 <= _steps_done(checkpoint) < steps, checkpoint.name
    _stopped_and_resumed_match(args, root, checkpoint, steps, expected)


@pytest.mark.slow
@pytest.mark.parametrize("previous_anchors", [False, True], ids=["own_anchors", "previous_anchors"])
def test_sigterm_under_ddp_stops_every_rank_at_the_same_step_and_resumes_exactly(
    tiny_model, tmp_path, previous_anchors
):
    """Two DDP ranks on the CPU (gloo): SIGTERM to the launching rank mid-step (Lightning passes it to the other);
    both save the same step's checkpoint and exit, nothing is left, and the resume matches the uninterrupted run.
    With rollout.anchors_from_previous_step each rank's last base groups are in the checkpoint and come back to it."""
    steps = 4
    ddp = ("--config", "configs/strategy/ddp.yaml", "--trainer.devices", "2",
           "--rollout.anchors_from_previous_step", str(previous_anchors).lower())  # fmt: skip
    whole = _cli("fit", *_preemptible_args(tiny_model, tmp_path / "whole", steps, *ddp))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = {row["step"]: row for row in _read_metrics(tmp_path / "whole" / "version_0")}

    root = tmp_path / "stopped"
    args = _preemptible_args(tiny_model, root, steps, *ddp)
    checkpoint = _signal_mid_step(args, root, 1, signal.SIGTERM, _ENV)
    assert 2 <= _steps_done(checkpoint) < steps, checkpoint.name
    _stopped_and_resumed_match(args, root, checkpoint, steps, expected)


@pytest.mark.slow
def test_slurm_requeue_signal_saves_at_the_end_of_the_step_and_requeues(tiny_model, tmp_path):
    """Under SLURM (its environment variables; `scontrol` is a script that records its arguments, as no SLURM runs
    here), SIGUSR1 mid-step: the run saves after the step, not Lightning's mid-step hpc checkpoint, runs
    `scontrol requeue <job id>` and exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "cipo", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    env = {**_ENV, **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    root = tmp_path / "stopped"
    checkpoint = _signal_mid_step(_preemptible_args(tiny_model, root, 5), root, 1, signal.SIGUSR1, env)
    assert 2 <= _steps_done(checkpoint) < 5, checkpoint.name
    assert calls.read_text() == "requeue 4242\n"
    assert not list(root.rglob("hpc_ckpt_*")), "Lightning's mid-step hpc checkpoint was written"


class NaNFirstCall(ParityReward):
    """NaN rewards on the first call (one step's base groups), parity afterwards: a verifier bug once."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        if self.calls == 1:
            return [math.nan] * len(completions)
        return super().__call__(prompts, completions, **columns)


class ConstantReward(ParityReward):
    def __call__(self, prompts, completions, **columns):
        return [1.0] * len(completions)


def test_a_non_finite_gradient_skips_the_step_and_is_counted(tiny_model):
    module, _, logged = _fit_hf(tiny_model, steps=2, reward=NaNFirstCall())
    assert [row["train/skipped_steps"] for row in logged] == [1.0, 1.0]
    assert logged[1]["train/grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert module.policy_version == 1  # one optimizer step of two


def test_a_batch_without_signal_is_a_logged_no_op(tiny_model):
    module, _, logged = _fit_hf(tiny_model, steps=2, reward=ConstantReward())
    assert [row["train/noop_steps"] for row in logged] == [1.0, 2.0]
    assert module.policy_version == 0
    initial = _initial_weights(tiny_model)
    assert all(torch.equal(p, initial[name]) for name, p in module.policy.named_parameters())


def test_an_empty_correction_set_trains_the_base_stream(tiny_model):
    stats = correction_stats([]).reduce()
    assert stats["train/anchors_correct"] == stats["train/anchors_failed"] == 0
    assert math.isnan(stats["train/retention"]) and math.isnan(stats["train/i2c_rate"])
    from cipo_lightning.module import CIPOModule

    module = CIPOModule(model=tiny_model, gradient_checkpointing=False)
    module.configure_model()
    metrics = module.accumulate_policy_gradient(two_group_batch(), backward=lambda loss: loss.backward())
    assert math.isfinite(metrics["train/loss"]) and "train/correction_loss" not in metrics  # no stream, no metric
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())


@pytest.mark.slow
def test_vllm_failures_name_the_setting(tiny_model):
    from cipo_lightning.rollout import SamplingSettings, VLLMEngine

    with pytest.raises(RuntimeError, match="kv_cache_memory_gb"):
        engine = VLLMEngine(dtype="float32", kv_cache_memory_gb=1e-6, max_model_len=512)
        engine.start(tiny_model, 0, torch.device("cpu"))
    engine = VLLMEngine(dtype="float32", kv_cache_memory_gb=0.1, max_model_len=64)
    engine.start(tiny_model, 0, torch.device("cpu"))
    try:
        with pytest.raises(RuntimeError, match="max_model_len"):
            engine.generate([[5] * 100], SamplingSettings(n=2, max_new_tokens=4))
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_vllm_seeded_prompts_beyond_one_scheduler_step(tiny_model):
    """More prompt tokens than vLLM schedules in one step: on CPU a prompt was then prefilled in two chunks, and
    vLLM's CPU backend cannot rewind a seeded request's generator ("CPU Generator does not use offset")."""
    from cipo_lightning.rollout import VLLMEngine

    engine = VLLMEngine(dtype="float32", kv_cache_memory_gb=0.1, max_model_len=512)
    engine.start(tiny_model, 0, torch.device("cpu"))
    try:
        budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        prompts = prompts_beyond_one_step(budget)
        together = engine.generate(prompts, SEEDED_PAIRS)
        alone = engine.generate(prompts[-1:], SEEDED_PAIRS)
    finally:
        engine.shutdown()
    assert len(together) == len(prompts) and all(len(samples) == 2 for samples in together)
    # Seeded per prompt: the prompt scheduled last draws what it draws alone.
    assert together[-1] == alone[0]


@pytest.mark.slow
def test_vllm_cpu_generation_compiles_nothing_and_shares_prompt_blocks(tiny_model):
    """With enforce_eager (the default), a CPU generation runs no torch.compile: vLLM's sampler compiles a helper of
    its own otherwise, whose first call after set-up had gcc build a precompiled header (11 s of the quickstart's
    first step). And block_size reaches vLLM: with 32-token blocks a second 40-token prompt that starts like the
    first reads the first's 32 prompt tokens from the cache (vLLM's own 128-token blocks share nothing here)."""
    from torch._dynamo.utils import counters

    from cipo_lightning.rollout import VLLMEngine

    engine = VLLMEngine(dtype="float32", kv_cache_memory_gb=0.1, max_model_len=64, block_size=32)
    engine.start(tiny_model, 0, torch.device("cpu"))
    try:
        torch._dynamo.reset()  # forget any function compiled earlier in this process
        counters.clear()
        samples = engine.generate([[1, 2, 3], [4, 5]], SamplingSettings(n=2, max_new_tokens=4, temperature=1.0))
        first = list(range(1, 41))
        prompts = [first, first[:32] + list(range(100, 108))]
        cached = [engine.llm.generate({"prompt_token_ids": p}, use_tqdm=False)[0].num_cached_tokens for p in prompts]
    finally:
        engine.shutdown()
    assert [len(group) for group in samples] == [2, 2]
    assert not counters["frames"], dict(counters["frames"])
    assert cached == [0, 32]


def _jsonl(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_rows_stop_loading_with_the_file_and_line(tmp_path):
    good = b'{"prompt": "What is 1 + 1?", "answer": "2"}'
    cases = {
        "invalid UTF-8": [good, b'{"prompt": "caf\xe9", "answer": "1"}'],
        "not JSON": [good, b'{"prompt": "x", '],
        "not a JSON object": [good, b"[1, 2]"],
        "the problem text is empty": [good, b'{"prompt": "", "answer": "1"}'],
        "not text": [good, b'{"prompt": 7, "answer": "1"}'],
        "no column 'prompt'": [good, b'{"question": "x", "answer": "1"}'],
    }
    for reason, lines in cases.items():
        path = _jsonl(tmp_path / "rows.jsonl", lines)
        with pytest.raises(ConfigError, match=rf"rows.jsonl: (line 2|row 1): .*{reason}"):
            DatasetTask(path, reward=ParityReward()).load()
    # Mixed value types across rows (which Arrow refuses) are fine: rows stay Python objects.
    mixed = _jsonl(tmp_path / "mixed.jsonl", [good, b'{"prompt": "What is 2 + 2?", "answer": 4}'])
    assert [row["answer"] for row in DatasetTask(mixed, reward=ParityReward()).load()[0]] == ["2", 4]


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    good = b'{"prompt": "What is 1 + 1?", "answer": "2"}'
    path = _jsonl(tmp_path / "rows.jsonl", [good, b'{"prompt": "caf\xe9"}', b"{", good, b'{"prompt": " "}'])
    task = DatasetTask(path, reward=ParityReward(), skip_bad_rows=True)
    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        train, _ = task.load()
    assert len(train) == 2 and len(task.skipped_rows) == 3
    assert "line 2" in task.skipped_rows[0] and "line 5" in task.skipped_rows[2]


def test_prompts_over_the_length_limit(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    task = ReasoningGymTask(train_size=16, val_size=4, reward=ParityReward())
    long_question = {"prompt": [{"role": "user", "content": "word " * 300}], "question": "long", "answer": "0"}

    datamodule = RolloutDataModule(task, prompts_per_step=2, max_prompt_tokens=100)
    datamodule.setup("fit")
    datamodule.train_rows.insert(5, long_question)
    with pytest.raises(ConfigError, match=r"training row 5 of basic_arithmetic: .* over data.max_prompt_tokens 100"):
        datamodule.check_prompt_lengths(tokenizer)

    task.skip_bad_rows = True
    with pytest.warns(UserWarning, match="skipped 1"):
        datamodule.check_prompt_lengths(tokenizer)
    assert len(datamodule.train_rows) == 16 and long_question not in datamodule.train_rows
