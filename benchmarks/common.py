"""What the benchmark scripts share: a quickstart training run in its own process, read back from metrics.csv, and
resident memory recorded at the phase boundaries of a run in this process."""

from __future__ import annotations

import ctypes
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cipo_lightning.memory import resident_memory
from cipo_lightning.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
# Runs the CLI in this process and reports its peak RSS (a colocated vLLM engine lives in the same process).
# With DENSE_FLOOR set it also measures the dense floor in that process after the last step (InRunFloor).
_CHILD = """
import json, os, sys
from benchmarks.common import InRunFloor, PhaseRecorder
from cipo_lightning.cli import main
recorder = PhaseRecorder(verbose=False)
floor = InRunFloor(recorder) if os.environ.get("DENSE_FLOOR") else None
main(sys.argv[1:])
recorder.record("end")
report = {"peak_gb": recorder.peak_gb, "parts_gb": recorder.parts_gb()}
if floor is not None:
    report.update(peak_gb=floor.training_peak_gb, floor=floor.tokens_per_s)
print("MEMORY_JSON " + json.dumps(report))
"""
GB = 2**30


def train_quickstart(
    overrides: list[str], steps: int, root: Path, dense_floor: bool = False
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """`steps` steps of configs/quickstart.yaml with `overrides`, without validation or checkpoints, logged under
    root: one dict of metrics per step (in step order) and the process's memory: {"peak_gb": peak RSS, "parts_gb":
    PhaseRecorder.parts_gb()}; with `dense_floor` also {"floor": InRunFloor.tokens_per_s}, the peak then being the
    training's, before the floor."""
    args = ["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "100000", "--trainer.default_root_dir", str(root),
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", *overrides]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    if dense_floor:
        env["DENSE_FLOOR"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"training run {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    memory = json.loads(result.stdout.split("MEMORY_JSON ")[1].splitlines()[0])
    steps = read_metrics(root / "version_0").values()
    return [metrics for metrics in steps if "time/step" in metrics], memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def heap_free_bytes() -> int:
    """Bytes glibc's malloc holds free in its arenas, all threads' arenas together (mallinfo2 fordblks): freed
    memory that still counts as resident unless it was trimmed."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    return mallinfo2().fordblks


def _reset_peak() -> None:
    """Restart the kernel's resident high-water mark (VmHWM, and the ru_maxrss it feeds) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class PhaseRecorder:
    """Resident memory at the end of each phase of a training run in this process, phases being the real classes'
    methods (wrapped on construction): engine start, policy load, weight sync, rollout (validation's too),
    old/reference log-probs, micro-batch forward and backward, optimizer step, step end (metrics logged),
    checkpoint, validation. Each row: step, phase, RSS after, RSS peak during (the kernel's high-water mark, reset
    at each boundary), glibc's free heap bytes."""

    def __init__(self, verbose: bool = True) -> None:
        import torch

        from cipo_lightning.checkpointing import AtomicCheckpointIO
        from cipo_lightning.module import CIPOModule
        from cipo_lightning.rollout import RolloutCallback, VLLMEngine

        self.verbose = verbose
        self.rows: list[dict[str, Any]] = []
        self.module: CIPOModule | None = None
        self.peak_gb = 0.0
        self.state_gb: dict[str, float] = {}
        _reset_peak()
        self.record("start (imports)")

        def policy_loaded(args: tuple) -> str:
            self.module = args[0]
            return "policy load"

        def optimizer_stepped(args: tuple) -> str:
            optimizer = args[0]
            if not self.state_gb:  # sizes of the training state, once it all exists (after the first step)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
                self.state_gb = {
                    "weights": sum(p.nbytes for p in params) / GB,
                    "gradients": sum(p.grad.nbytes for p in params if p.grad is not None) / GB,
                    "AdamW state": sum(t.nbytes for t in state) / GB,
                }
            return "optimizer step"

        self._wrap(VLLMEngine, "start", "engine start")
        self._wrap(CIPOModule, "configure_model", policy_loaded)
        self._wrap(VLLMEngine, "load_weights", "weight sync")
        self._wrap(VLLMEngine, "generate", "rollout")
        self._wrap(CIPOModule, "completion_logprobs", "old/reference log-probs")
        self._wrap(CIPOModule, "token_logprobs", "forward (micro-batch)")
        self._wrap(CIPOModule, "manual_backward", "backward (micro-batch)")
        self._wrap(torch.optim.AdamW, "step", optimizer_stepped)
        self._wrap(RolloutCallback, "on_train_batch_end", "step end (metrics)")
        self._wrap(AtomicCheckpointIO, "save_checkpoint", "checkpoint")
        self._wrap(CIPOModule, "on_validation_end", "validation")

    def record(self, phase: str) -> None:
        rss, peak = resident_memory()
        self.peak_gb = max(self.peak_gb, peak / GB)
        trainer = self.module._trainer if self.module is not None else None
        step = trainer.global_step if trainer is not None else -1
        row = {"step": step, "phase": phase, "rss_gb": rss / GB, "peak_gb": peak / GB}
        row["heap_free_gb"] = heap_free_bytes() / GB
        self.rows.append(row)
        if self.verbose:
            print(f"[memory] step {step:3d}  {phase:24s} rss {row['rss_gb']:6.2f}  peak {row['peak_gb']:6.2f}  "
                  f"heap free {row['heap_free_gb']:5.2f} GB", flush=True)  # fmt: skip
        _reset_peak()

    def parts_gb(self) -> dict[str, float]:
        """The parts a training process cannot do without, in GB: the runtime (Python, torch, Lightning: RSS at
        start), the engine (RSS rise over its start), weights, gradients and AdamW state (tensor sizes), and one
        micro-batch's activations (the largest RSS rise during a forward and backward pass that is not the step's
        first, whose backward also allocates the gradients)."""
        engine, activations, before, first = 0.0, 0.0, 0.0, True
        for previous, row in zip(self.rows, self.rows[1:], strict=False):
            if row["phase"] == "engine start":
                engine = row["rss_gb"] - previous["rss_gb"]
            elif row["phase"] == "forward (micro-batch)":
                before, forward_peak = previous["rss_gb"], row["peak_gb"]
            elif row["phase"] == "backward (micro-batch)":
                if not first:
                    activations = max(activations, max(forward_peak, row["peak_gb"]) - before)
                first = False
            elif row["phase"] == "optimizer step":
                first = True
        return {"runtime": self.rows[0]["rss_gb"], "engine": engine, **self.state_gb, "activations": activations}

    def _wrap(self, owner: type, method: str, phase: str | Callable[[tuple], str]) -> None:
        original = getattr(owner, method)

        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.record(phase(args) if callable(phase) else phase)
            return result

        static = isinstance(inspect.getattr_static(owner, method), staticmethod)
        setattr(owner, method, staticmethod(recorded) if static else recorded)


def dense_step_tokens_per_s(policy: Any, optimizer: Any, tokens: int, row_tokens: int = 96, repeats: int = 3) -> float:
    """The dense floor: tokens per second of one optimizer step of `policy` on an unpadded [tokens // row_tokens,
    row_tokens] batch of random tokens (about a quickstart row each), logits at every position; median of `repeats`
    after a warm-up. The gradients are dropped after each step. The steps run under the allocator setting of a CPU
    training run (memory.keep_freed_blocks, which the run keeps from fit start to end; inside a run this one is
    nested and changes nothing)."""
    import torch

    from cipo_lightning.memory import keep_freed_blocks

    shape = (max(tokens // row_tokens, 1), row_tokens)
    input_ids = torch.randint(policy.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    times = []
    with keep_freed_blocks():
        for _ in range(repeats + 1):
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logits = policy(input_ids=input_ids, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            del logits, loss  # freed inside the timed step, as a micro-batch's are
            times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    return input_ids.numel() / statistics.median(times[1:])


class InRunFloor:
    """The dense floor measured in a training run's own process, after its last step and before the rollout engine
    shuts down (RolloutCallback.on_fit_end): the run's policy and AdamW, the vLLM engine still resident, the run's
    allocator settings and threads, so it shares every condition the steps ran under but the work. A floor measured
    in a fresh process lacks the engine (in the probes of docs/benchmarks.md a policy update on the 2-core CPU
    machine was 3-30% slower with one resident). Its batch has the median of the steps' trained tokens (the first
    step left out, as step_time does). It runs after training, so it changes no step; the weights it moves are not
    saved (the benchmarks run without checkpoints). `training_peak_gb` is the peak RSS before it: its one dense pass
    holds more activations than a micro-batch."""

    def __init__(self, recorder: PhaseRecorder) -> None:
        from cipo_lightning.module import CIPOModule
        from cipo_lightning.rollout import RolloutCallback

        self.tokens_per_s: float | None = None
        self.training_peak_gb: float | None = None
        step_tokens: list[float] = []
        accumulate, fit_end = CIPOModule.accumulate_policy_gradient, RolloutCallback.on_fit_end

        @functools.wraps(accumulate)
        def counted(module: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            metrics = accumulate(module, *args, **kwargs)
            step_tokens.append(metrics["train/trained_tokens"])
            return metrics

        @functools.wraps(fit_end)
        def measured(callback: Any, trainer: Any, module: Any) -> None:
            recorder.record("training end")
            self.training_peak_gb = recorder.peak_gb
            tokens = int(statistics.median(step_tokens[1:] or step_tokens))
            self.tokens_per_s = dense_step_tokens_per_s(module.policy, trainer.optimizers[0], tokens)
            fit_end(callback, trainer, module)

        CIPOModule.accumulate_policy_gradient = counted
        RolloutCallback.on_fit_end = measured
