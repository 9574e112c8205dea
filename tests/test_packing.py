"""Packed sequences give the padded path's log-probs and gradient: one padding-free sequence per micro-batch,
positions restarting per row, logits only where a completion token is predicted."""

import pytest
import torch

from cipo_lightning.errors import ConfigError
from cipo_lightning.module import CIPOModule, token_budget_bounds
from tests.helpers import grouped_two_stream_batch, two_stream_batch

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@pytest.fixture(scope="module")
def modules(tiny_model):
    """Padded (False), packed with every row's own prompt (True) and packed with shared prompts ("shared")."""
    built = {}
    for layout, packing, sharing in ((False, False, False), (True, True, False), ("shared", True, True)):
        module = CIPOModule(
            model=tiny_model, micro_batch_size=5, gradient_checkpointing=False, pack_sequences=packing,
            share_prompts=sharing,
        )  # fmt: skip
        module.configure_model()
        built[layout] = module
    return built


def test_the_load_check_chooses_packing_and_sharing_for_a_llama(tiny_model):
    module = CIPOModule(model=tiny_model, gradient_checkpointing=False, pack_sequences=None)  # decided by the checks
    module.configure_model()
    assert module.packing and module.sharing


def _causal_only_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa that ignores the mask and attends causally over the whole sequence: packed rows read each other."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_load_check_refuses_attention_that_reads_across_rows(tiny_model, dtype):
    from transformers import AttentionInterface

    AttentionInterface.register("causal_only", _causal_only_attention)
    module = CIPOModule(model=tiny_model, gradient_checkpointing=False, pack_sequences=True, share_prompts=None)
    module.configure_model()
    module.policy.to(dtype)
    assert module._choose_packing() and module._choose_sharing()  # sdpa passes, within the dtype's tolerance
    module.policy.set_attn_implementation("causal_only")
    assert not module._choose_sharing()  # None: off, with the reason logged
    with pytest.raises(ConfigError, match=r"model.pack_sequences true: packed log-probs differ from each row's alone"):
        module._choose_packing()


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
    for packing, module in list(modules.items())[:2]:
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


def test_shared_prompts_are_fed_once_with_the_padded_log_probs(modules):
    """A group's rows feed their prompt once; each completion still gets the log-probs of its own padded row."""
    batch = grouped_two_stream_batch()
    first_rows = {0, 4, 7, 10}  # of groups of 4, 3, 3 and 2 rows
    assert batch.shares_prompt().tolist() == [row not in first_rows for row in range(12)]
    padded, padded_entropy = modules[False].token_logprobs(modules[False].policy, batch)
    shared, shared_entropy = modules["shared"].token_logprobs(modules["shared"].policy, batch)
    mask = batch.completion_mask.bool()
    assert (shared[mask] - padded[mask]).abs().max() < 1e-5
    assert (shared_entropy[mask] - padded_entropy[mask]).abs().max() < 1e-5
    assert (shared[~mask] == 0).all()
    # Prompts of 3, 5, 7 and 6 tokens fed once instead of 4, 3, 3 and 2 times; 27 completion tokens.
    assert batch.fed_tokens(share_prompts=True) == 3 + 5 + 7 + 6 + 27
    real = int(batch.attention_mask.sum())
    assert batch.fed_tokens(share_prompts=False) == real == 4 * 3 + 3 * 5 + 3 * 7 + 2 * 6 + 27


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_shared_prompt_gradient_equals_padded(modules, aggregation):
    grads, metrics = {}, {}
    for layout in (False, "shared"):
        module = modules[layout]
        module.hparams.update(loss_aggregation=aggregation)
        module.policy.zero_grad(set_to_none=True)
        metrics[layout] = module.accumulate_policy_gradient(grouped_two_stream_batch(), lambda loss: loss.backward())
        grads[layout] = torch.cat([p.grad.flatten() for p in module.policy.parameters()])
    assert grads[False].norm() > 0
    assert (grads["shared"] - grads[False]).norm() / grads[False].norm() < 1e-5
    assert metrics["shared"]["train/loss"] == pytest.approx(metrics[False]["train/loss"], abs=1e-6)
    # Micro-batches of 5 rows: groups split across passes feed their prompt once per pass (rows 0-4, 5-9, 10-11).
    assert metrics["shared"]["train/trained_tokens"] == (3 + 5) + (5 + 7) + 6 + 27
    assert metrics["shared"]["train/padding_frac"] == 0.0


def test_rows_sorted_group_by_group_then_cut_by_a_budget_with_shared_prompts(modules):
    """training_step's order under sharing: groups by their tokens, longest first, each group's rows together and
    longest first; the budget counts a shared prompt once; the gradient is the whole batch's."""
    batch = grouped_two_stream_batch()
    ordered = batch.sorted_by_length(keep_groups=True)
    # Group tokens (prompts + completions): base 12 + 8 and 15 + 8, corrections 21 + 7 and 12 + 4.
    assert ordered.group_ids.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 3, 3]
    lengths = ordered.attention_mask.sum(-1).tolist()
    assert lengths[:3] == [11, 9, 8] and lengths[3:6] == [10, 7, 6]
    module = modules["shared"]
    module.hparams.update(loss_aggregation="token_mean", micro_batch_tokens=None, micro_batch_size=16)
    grads, metrics = [], []
    for budget, rows in ((None, batch), (20, ordered)):
        module.hparams.micro_batch_tokens = budget
        module.policy.zero_grad(set_to_none=True)
        metrics.append(module.accumulate_policy_gradient(rows, backward=lambda loss: loss.backward()))
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]))
    # Completions 4, 2, 1 | 5, 2, 1 | 3, 2, 2, 1 | 3, 1 under prompts of 7, 5, 3, 6: a pass feeds 7 + 7, then
    # 5 + 8 + 3 + 3 (another row would make 21), then group 0's rest with its prompt again, 3 + 5 + 6 + 4.
    assert module.micro_batch_bounds(ordered) == [(0, 3), (3, 7), (7, 12)]
    module.hparams.update(micro_batch_size=5, micro_batch_tokens=None)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5
    assert metrics[1]["train/trained_tokens"] == (7 + 7) + (5 + 8 + 3 + 3) + (3 + 5 + 6 + 4)


def test_eager_attention_honours_the_shared_prompt_mask_too(tiny_model):
    """The additive 4D mask reaches eager attention as it does sdpa (transformers adds it to the scores there)."""
    module = CIPOModule(model=tiny_model, gradient_checkpointing=False, pack_sequences=True, share_prompts=True)
    module.configure_model()
    module.policy.set_attn_implementation("eager")
    assert module._choose_sharing()
    batch = grouped_two_stream_batch()
    with torch.no_grad():
        shared, _ = module.token_logprobs(module.policy, batch)
        module.packing = module.sharing = False
        padded, _ = module.token_logprobs(module.policy, batch)
    mask = batch.completion_mask.bool()
    assert (shared[mask] - padded[mask]).abs().max() < 1e-5
