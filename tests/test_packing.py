"""Packed sequences give the padded path's log-probs and gradient: one padding-free sequence per micro-batch,
positions restarting per row, logits only where a completion token is predicted."""

import pytest
import torch

from cipo_lightning.module import CIPOModule
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
