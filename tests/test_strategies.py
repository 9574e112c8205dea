"""Strategies from config: 2 CPU processes (gloo) under DDP and under FSDP2 end with the parameters that one process
reaches on the same global batch.

The runs use the transformers engine with reproducible sampling (each prompt's samples seeded from the step and the
prompt), so the 4 prompts of a step get the same completions whether one process samples them all or two ranks
sample 2 each. The only differences left are float32 summation orders (micro-batch and rank splits, the gradient
all-reduce or reduce-scatter), which Adam can amplify for near-zero gradients: hence the tolerance below.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cipo_lightning.module import CIPOModule, padded_micro_batches, row_count_bounds
from cipo_lightning.rollout import HFEngine, SamplingSettings
from cipo_lightning.rollout.engine import derived_seed
from tests.helpers import tiny_grpo_fit_args, two_group_batch

REPO = Path(__file__).resolve().parents[1]
# Max abs parameter difference after 2 steps at learning rate 1e-5, in which parameters move up to 2e-5. Measured
# 2026-11-26 on the 2-core CPU: DDP 2.2e-8, FSDP2 1.3e-8.
TOLERANCE = 1e-6


def _fit(tiny_model: str, root: Path, *extra: str) -> dict[str, torch.Tensor]:
    command = [
        sys.executable,
        "-m",
        "cipo_lightning",
        *tiny_grpo_fit_args(tiny_model),
        "--rollout.reproducible_sampling",
        "true",
        "--rollout.max_new_tokens",
        "8",
        "--rollout.group_size",
        "4",
        "--data.task.init_args.reward",
        "tests.helpers.ParityReward",
        "--model.micro_batch_size",
        "4",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--model.beta",
        "0.01",
        *extra,
    ]  # fmt: skip (a KL term, so the frozen reference is sharded too)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = root / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {name: tensor for name, tensor in state.items() if name.startswith("policy.")}


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> dict[str, torch.Tensor]:
    return _fit(tiny_model, tmp_path_factory.mktemp("single"), "--config", "configs/strategy/single.yaml",
                "--data.prompts_per_step", "4")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_end_with_the_parameters_of_one_process(strategy, one_process, tiny_model, tmp_path):
    extra = ["--trainer.strategy.init_args.save_distributed_checkpoint", "false"] if strategy == "fsdp2" else []
    two_ranks = _fit(tiny_model, tmp_path, "--config", f"configs/strategy/{strategy}.yaml", "--trainer.devices", "2",
                     "--data.prompts_per_step", "2", *extra)  # fmt: skip
    assert two_ranks.keys() == one_process.keys()
    moved = max((one_process[name] - initial).abs().max().item() for name, initial in _initial(tiny_model).items())
    assert moved > 1e-6, "the parameters did not move: the comparison would show nothing"
    difference = max((two_ranks[name] - one_process[name]).abs().max().item() for name in one_process)
    assert difference < TOLERANCE, difference


@pytest.mark.slow
def test_cipo_trains_and_validates_on_two_ranks(tiny_model, tmp_path):
    """CIPO under DDP: each rank draws its own anchors (so ranks may need different numbers of passes), rank 0
    writes the sample table, and validation shards the held-out problems and reduces the metrics over ranks."""
    _fit(tiny_model, tmp_path, "--algorithm", "cipo", "--config", "configs/strategy/ddp.yaml", "--trainer.devices",
         "2", "--data.prompts_per_step", "2", "--rollout.sample_table_every_n_steps", "1",
         "--trainer.val_check_interval", "2", "--data.eval_max_problems", "5")  # fmt: skip
    run = tmp_path / "version_0"
    assert (
        len((run / "correction_samples.jsonl").read_text().splitlines()) == 2 * 2 * 4
    )  # 2 steps x 2 anchors x 4 corrections
    report = json.loads((run / "eval" / "val_step2.json").read_text())
    assert report["problems"] == {"basic_arithmetic": 5} and "pass@4" in report["results"]["basic_arithmetic"]
    assert sorted(p.name for p in (run / "eval").glob("*_samples*")) == [
        "val_step2_samples.rank0.jsonl", "val_step2_samples.rank1.jsonl"]  # fmt: skip
    shares = [len((run / "eval" / f"val_step2_samples.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert shares == [2 * 4, 3 * 4]  # 5 problems split 2 / 3, 4 samples each


def _initial(tiny_model: str) -> dict[str, torch.Tensor]:
    weights = load_file(os.path.join(tiny_model, "model.safetensors"))
    return {f"policy.{name}": tensor for name, tensor in weights.items()}


def test_micro_batch_bounds_pad_with_repeats_of_the_last_micro_batch():
    bounds = row_count_bounds(10, 4)
    assert list(padded_micro_batches(bounds, 3)) == [(0, 4, False), (4, 8, False), (8, 10, False)]
    assert list(padded_micro_batches(bounds, 5))[3:] == [(8, 10, True), (8, 10, True)]


def test_padding_micro_batches_add_nothing_to_the_gradient(tiny_model):
    module = CIPOModule(model=tiny_model, micro_batch_size=4, gradient_checkpointing=False)
    module.configure_model()
    batch = two_group_batch()
    gradients = []
    for extra in (0, 2):  # as on a rank with 2 fewer micro-batches than another
        module.policy.zero_grad()
        targets = module.loss_targets(batch)
        targets = targets._replace(micro_batches=targets.micro_batches + extra)
        module.accumulate_policy_gradient(batch, lambda loss: loss.backward(), targets=targets)
        gradients.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]))
    assert gradients[0].norm() > 0 and torch.equal(gradients[0], gradients[1])


def test_reproducible_sampling_does_not_depend_on_the_batch(tiny_model):
    assert derived_seed(0, [1, 2]) == derived_seed(0, [1, 2]) != derived_seed(0, [2, 1]) != derived_seed(1, [1, 2])
    engine = HFEngine()
    engine.start(tiny_model, seed=0, device=torch.device("cpu"))
    sampling = SamplingSettings(n=3, max_new_tokens=6, temperature=1.0, seed=7)
    alone = engine.generate([[1, 9690, 198]], sampling)[0]
    batched = engine.generate([[1, 4093], [1, 9690, 198]], sampling)[1]  # another prompt first, as on another rank
    assert [s.token_ids for s in alone] == [s.token_ids for s in batched]
    assert len({tuple(s.token_ids) for s in alone}) > 1  # still n distinct draws, not one repeated
    engine.shutdown()
