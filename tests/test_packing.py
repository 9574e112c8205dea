"""Packed sequences give the padded path's log-probs and gradient: one padding-free sequence per micro-batch,
positions restarting per row, logits only where a completion token is predicted."""

import pytest
import torch

from cipo_lightning.module import CIPOModule, token_budget_bounds
from tests.helpers import two_stream_batch

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@pytest.fixture(scope="module")
def modules(tiny_model):
    built = {}
    for packing in (False, True):
        module = CIPOModule(model=tiny_model, micro_batch_size=5, gradient_checkpointing=False, pack_sequences=packing)
        module.configure_model()
        built[packing] = module
    return built


def test_the_load_check_chooses_packing_for_a_llama(tiny_model):
    module = CIPOModule(model=tiny_model, gradient_checkpointing=False, pack_sequences=None)  # decided by the check
    module.configure_model()
    assert module.packing


def test_packed_log_probs_equal_padded(modules):
    batch = two_stream_batch()  # mixed prompt and completion lengths, both streams
    padded, padded_entropy = modules[False].token_logprobs(modules[False].policy, batch)
    packed, packed_entropy = modules[True].token_logprobs(modules[True].policy, batch)
    mask = batch.completion_mask.bool()
    assert (packed[mask] - padded[mask]).abs().max() < 1e-5
    assert (packed_entropy[mask] - padded_entropy[mask]).abs().max() < 1e-5
    assert (packed[~mask] == 0).all()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_packed_gradient_equals_padded(modules, aggregation):
    grads = {}
    for packing, module in modules.items():
        module.hparams.update(loss_aggregation=aggregation)
        module.policy.zero_grad(set_to_none=True)
        module.accumulate_policy_gradient(two_stream_batch(), backward=lambda loss: loss.backward())
        grads[packing] = torch.cat([p.grad.flatten() for p in module.policy.parameters()])
    assert grads[False].norm() > 0
    assert (grads[True] - grads[False]).abs().max() < 1e-5
    assert (grads[True] - grads[False]).norm() / grads[False].norm() < 1e-5


def test_token_budget_bounds_by_hand():
    prompts, completions = [5, 5, 3, 3, 2], [5, 1, 4, 2, 1]  # row lengths 10, 6, 7, 5, 3
    # Packed: the real tokens of a pass stay within 16 (10 + 6, then 7 + 5 + 3); a longer row gets a pass alone.
    assert token_budget_bounds(prompts, completions, 16, packed=True) == [(0, 2), (2, 5)]
    assert token_budget_bounds([20, 1], [1, 1], 16, packed=True) == [(0, 1), (1, 2)]
    # Padded: rows x (longest prompt + longest completion): rows 0-1 cost 2 x 10 = 20 > 16, rows 1-2 2 x 9 = 18,
    # rows 2-3 2 x 7 = 14, rows 2-4 3 x 7 = 21. With 27: rows 1-3 cost 3 x 9 = 27, adding row 4 4 x 9 = 36.
    assert token_budget_bounds(prompts, completions, 16, packed=False) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert token_budget_bounds(prompts[1:], completions[1:], 27, packed=False) == [(0, 3), (3, 4)]
    assert token_budget_bounds([], [], 16, packed=True) == []


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_micro_batches_keep_the_whole_batch_gradient(modules, packing):
    """Sorted by length and cut by a token budget (as training_step does), the batch gives the gradient of one
    whole-batch pass, and padding_frac counts what the passes processed."""
    module = modules[packing]
    module.hparams.update(loss_aggregation="seq_mean_token_mean", micro_batch_size=16, micro_batch_tokens=None)
    batch = two_stream_batch()
    grads, metrics = [], []
    for budget, rows in ((None, batch), (24, batch.sorted_by_length())):
        module.hparams.micro_batch_tokens = budget
        module.policy.zero_grad(set_to_none=True)
        metrics.append(module.accumulate_policy_gradient(rows, backward=lambda loss: loss.backward()))
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]))
    module.hparams.update(micro_batch_size=5, micro_batch_tokens=None)
    assert grads[0].norm() > 0 and (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5
    real = int(batch.attention_mask.sum())
    assert metrics[0]["train/trained_tokens"] == metrics[1]["train/trained_tokens"] == real
    if packing:
        assert metrics[0]["train/padding_frac"] == metrics[1]["train/padding_frac"] == 0.0
    else:
        # One padded pass over the whole [16, width] batch vs length-sorted passes of like rows.
        assert metrics[0]["train/padding_frac"] == pytest.approx(1 - real / batch.attention_mask.numel())
        assert metrics[1]["train/padding_frac"] < metrics[0]["train/padding_frac"]
