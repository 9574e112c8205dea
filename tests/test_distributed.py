"""Gradient equivalence: one batch whole, in 2 micro-batches, and split across 2 CPU ranks (gloo) give one gradient.

The ranks mimic DistributedDataParallel: each backpropagates its own share of the groups, then gradients are
averaged over ranks. The module's weights use global counts (and the global reward std for batch scaling), so the
average equals the single-process gradient for every aggregation mode. The step statistics (logged, and the
retention that moves rho) reduce over ranks the same way: by rows, not by rank.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cipo_lightning.distributed import StepStats
from cipo_lightning.module import CIPOModule
from tests.helpers import two_group_batch, two_stream_batch

SETTINGS = [
    {"loss_aggregation": "token_mean"},
    {"loss_aggregation": "seq_mean_token_mean"},
    {"loss_aggregation": "seq_mean_token_sum_norm"},
    {"loss_aggregation": "token_mean", "advantage_scale": "batch"},
]


def _gradient(module: CIPOModule, batch, settings: dict) -> torch.Tensor:
    module.hparams.update(settings)
    module.policy.zero_grad()
    module.accumulate_policy_gradient(batch, backward=lambda loss: loss.backward())
    return torch.cat([p.grad.flatten() for p in module.policy.parameters()])


def _module(model_dir: str, micro_batch_size: int, **settings) -> CIPOModule:
    module = CIPOModule(model=model_dir, micro_batch_size=micro_batch_size, gradient_checkpointing=False, **settings)
    module.configure_model()
    return module


# Every logged statistic of the loss: KL (beta > 0), IS weights and clip fractions (narrow clip ranges, and a second
# update that moves the ratio).
METRIC_SETTINGS = {"beta": 0.1, "rollout_is": "token", "lambda_corr": 0.5, "clip_eps_low": 1e-4, "clip_eps_high": 1e-4}


def _rank(rank: int, model_dir: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = _module(model_dir, micro_batch_size=4)
    grads = []
    for settings in SETTINGS:
        grad = _gradient(module, two_group_batch().rows(4 * rank, 4 * rank + 4), settings)
        dist.all_reduce(grad)
        grads.append(grad / 2)  # DDP averages gradients over ranks
    metrics = _metrics(
        _module(model_dir, micro_batch_size=3, **METRIC_SETTINGS), two_stream_batch().rows(8 * rank, 8 * rank + 8)
    )
    if rank == 0:
        torch.save((grads, metrics), out_file)
    dist.destroy_process_group()


def _metrics(module: CIPOModule, batch) -> dict[str, float]:
    """The logged statistics of a batch's loss, after one update has moved the policy away from the old log-probs."""
    old = module.completion_logprobs(batch)
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=1.0)
    module.accumulate_policy_gradient(batch, lambda loss: loss.backward(), old)
    if dist.is_initialized():  # as DDP: gradients averaged over ranks before the step
        for parameter in module.policy.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()
    optimizer.step()
    module.policy.zero_grad()
    return module.accumulate_policy_gradient(batch, lambda loss: loss.backward(), old)


def test_gradient_is_the_same_whole_in_micro_batches_and_across_ranks(tiny_model, tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(_rank, args=(tiny_model, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    across_ranks, distributed_metrics = torch.load(out_file)
    whole_module, micro_module = _module(tiny_model, micro_batch_size=8), _module(tiny_model, micro_batch_size=4)
    for settings, distributed in zip(SETTINGS, across_ranks, strict=True):
        whole = _gradient(whole_module, two_group_batch(), settings)
        micro = _gradient(micro_module, two_group_batch(), settings)
        assert whole.norm() > 0, settings
        for other in (micro, distributed):
            # Equal up to float32 rounding (padding widths and summation order differ).
            assert (other - whole).norm() / whole.norm() < 1e-4, settings
    # The logged losses and rates are the global batch's on every rank, not rank 0's share.
    single = _metrics(_module(tiny_model, micro_batch_size=16, **METRIC_SETTINGS), two_stream_batch())
    assert set(distributed_metrics) == set(single)
    assert single["train/clip_frac"] > 0 and single["train/correction_kl"] > 0
    for key, value in single.items():
        if key == "train/padding_frac":  # a property of the layout: each rank pads only its own rows
            continue
        assert distributed_metrics[key] == pytest.approx(value, abs=1e-5), key


def _stats_rank(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Rank 0 has 3 rows (2 correct) and no correct anchor, rank 1 one wrong row and a correct anchor kept 1 of 2.
    stats = StepStats(
        means={"accuracy": [(2, 3), (0, 1)][rank], "retention": [(0, 0), (1, 2)][rank], "never": (0, 0)},
        sums={"anchors": [1, 2][rank]},
        maxima={"time": [0.5, 2.0][rank]},
    )
    reduced = stats.reduce()
    if rank == 0:
        torch.save(reduced, out_file)
    dist.destroy_process_group()


def test_step_stats_reduce_over_ranks_by_rows_not_by_rank(tmp_path):
    out_file = tmp_path / "stats.pt"
    mp.spawn(_stats_rank, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    reduced = torch.load(out_file)
    assert reduced["accuracy"] == 2 / 4  # not (2/3 + 0/1) / 2
    assert reduced["retention"] == 1 / 2  # rank 0 had no correct anchor: it does not count
    assert math.isnan(reduced["never"])
    assert reduced["anchors"] == 3 and reduced["time"] == 2.0
