"""The objective's pure functions against values computed by hand or by naive loops."""

import math

import pytest
import torch

from cipo_lightning.algorithms import (
    cispo_loss,
    clipped_surrogate,
    group_advantages,
    kl_penalty,
    masked_sum,
    overlong_penalty,
    rloo_advantages,
    sampled_token_logprobs_and_entropy,
    sequence_log_ratio,
    token_weights,
    truncated_is_weights,
)


def test_group_advantages_by_hand():
    # Group 0: rewards [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
    # Group 1: all equal -> zero variance -> zero advantage. Group 2: [1, 0]: mean 0.5, std sqrt(0.5).
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    expected = [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)]
    assert torch.allclose(group_advantages(rewards, groups, eps=0.0).nan_to_num(0.0), torch.tensor(expected))
    assert torch.allclose(group_advantages(rewards, groups), torch.tensor(expected), atol=1e-5)


def test_group_advantages_do_not_depend_on_row_order():
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    groups = torch.tensor([4, 9, 4, 9, 4])
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(group_advantages(rewards, groups)[perm], group_advantages(rewards[perm], groups[perm]))


def test_clipped_surrogate_by_hand():
    # ratios e^0 = 1, e^0.5 = 1.6487, e^-0.5 = 0.6065 with eps_low 0.2, eps_high 0.28.
    logp = torch.tensor([[0.0, 0.5, -0.5, 0.5, -0.5]])
    old = torch.zeros_like(logp)
    adv = torch.tensor([[2.0, 1.0, 1.0, -1.0, -1.0]])
    loss, clip_low, clip_high = clipped_surrogate(logp - old, adv, eps_low=0.2, eps_high=0.28)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A > 0: -min(r A, clip(r) A): r = 1.65 clipped to 1.28; r = 0.61 not clipped (min picks r A).
    # A < 0: r = 1.65 -> -min(-1.65, -1.28) = 1.65 (unclipped); r = 0.61 -> -min(-0.61, -0.8) = 0.8 (clipped).
    expected = torch.tensor([[-2.0, -1.28, -r_lo, r_hi, 0.8]])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert clip_high.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
    assert clip_low.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0]]


def test_dual_clip_bounds_negative_advantage_loss():
    # ratio e^2 = 7.39 with A = -1: PPO loss 7.39; dual clip c = 3 caps it at 3. Positive advantages are untouched.
    log_ratio = torch.tensor([[2.0, 2.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    plain, _, _ = clipped_surrogate(log_ratio, adv, 0.2, 0.28)
    dual, _, _ = clipped_surrogate(log_ratio, adv, 0.2, 0.28, dual_clip=3.0)
    assert torch.allclose(plain, torch.tensor([[math.exp(2.0), -1.28]]))
    assert torch.allclose(dual, torch.tensor([[3.0, -1.28]]))


def test_clipped_surrogate_gradient_vanishes_only_where_clipped():
    logp = torch.tensor([[0.0, 0.5, -0.5]], requires_grad=True)
    loss, _, _ = clipped_surrogate(logp, torch.ones(1, 3), eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    # d(-r A)/dlogp = -r A where unclipped; 0 where clipped.
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0, -math.exp(-0.5)]]))


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    # d = logp - ref = [0, -1, 1]; k1 = d; k2 = d^2 / 2; k3 = e^-d + d - 1.
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.0, -1.0, 1.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.0, 0.5, 0.5]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.0, math.e - 2.0, math.exp(-1.0)]))


def test_group_advantages_batch_and_no_scaling():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    # Centred: [0.5, -0.5, 0, 0]. Batch std (unbiased) of [1, 0, 1, 1] = sqrt(0.25) = 0.5.
    assert torch.allclose(group_advantages(rewards, groups, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert torch.allclose(group_advantages(rewards, groups, "batch", eps=0.0), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_rloo_matches_leave_one_out_loop():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = []
    for i in range(6):
        others = [rewards[j].item() for j in range(6) if groups[j] == groups[i] and j != i]
        expected.append(rewards[i].item() - sum(others) / len(others) if others else 0.0)
    assert torch.allclose(rloo_advantages(rewards, groups), torch.tensor(expected))


def test_sequence_log_ratio_is_the_mean_in_value_and_the_token_in_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    log_ratio = sequence_log_ratio(logp, old, mask)
    assert torch.allclose(log_ratio, torch.full((1, 3), 0.25))  # (0.5 + 0) / 2
    (log_ratio * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.0, 2.0, 3.0]]))


def test_cispo_by_hand():
    logp = torch.tensor([[0.5, -0.5, 0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, -1.0]])
    loss, clip_low, clip_high = cispo_loss(logp, torch.zeros(1, 3), adv, eps_low=0.2, eps_high=0.28)
    # Weights clip(e^0.5 = 1.65 -> 1.28), clip(e^-0.5 = 0.61 -> 0.8), e^0.1 = 1.105 unclipped; loss = -w * A * logp.
    w = [1.28, 0.8, math.exp(0.1)]
    assert torch.allclose(loss, torch.tensor([[-w[0] * 0.5, -w[1] * 2 * -0.5, w[2] * 0.1]]))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-w[0], -2 * w[1], w[2]]]))  # the weight is detached
    assert clip_high.tolist() == [[1.0, 0.0, 0.0]] and clip_low.tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # Lengths 1 and 3, 4 tokens, 2 sequences, max_len 5.
        ("token_mean", [[0.25, 0.0, 0.0], [0.25, 0.25, 0.25]]),
        ("seq_mean_token_mean", [[0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        ("seq_mean_token_sum_norm", [[0.1, 0.0, 0.0], [0.1, 0.1, 0.1]]),
    ],
)
def test_token_weights_by_hand(mode, expected):
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    weights = token_weights(mask, mode, num_sequences=2, num_tokens=4, max_len=5)
    assert torch.allclose(weights, torch.tensor(expected))


def test_sampled_token_logprobs_and_entropy_match_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    logprobs, entropy = sampled_token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    for i in range(2):
        for t in range(3):
            scaled = [x / 0.7 for x in logits[i, t].tolist()]
            norm = math.log(sum(math.exp(x) for x in scaled))
            probs = [math.exp(x - norm) for x in scaled]
            assert math.isclose(logprobs[i, t].item(), scaled[tokens[i, t]] - norm, abs_tol=1e-5)
            assert math.isclose(entropy[i, t].item(), -sum(p * math.log(p) for p in probs), abs_tol=1e-5)


def _composed_logprobs_and_entropy(logits, tokens, temperature):
    """The same quantities composed from torch ops, differentiated by autograd (the reference for the fused node)."""
    scaled = logits / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    return logprobs, lse - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)


@pytest.mark.parametrize("shape", [(3, 4, 11), (6, 11)], ids=["rows x tokens", "packed positions"])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprob_and_entropy_gradients_match_autograd(shape, entropy_grad):
    """The hand-written backward against autograd through the composed ops, in float64: the logits' gradient for a
    loss on the log-probs and, with entropy_grad, on the entropy as well."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    tokens = torch.randint(0, shape[-1], shape[:-1])
    logprob_weights, entropy_weights = torch.randn(shape[:-1], dtype=torch.float64), torch.randn(shape[:-1])

    def logits_grad(function):
        logits.grad = None
        logprobs, entropy = function(logits, tokens, 0.7)
        loss = (logprobs * logprob_weights).sum()
        if entropy_grad:
            loss = loss + (entropy * entropy_weights).sum()
        loss.backward()
        return logprobs.detach(), entropy.detach(), logits.grad

    fused = logits_grad(lambda *args: sampled_token_logprobs_and_entropy(*args, entropy_grad=entropy_grad))
    for got, expected in zip(fused, logits_grad(_composed_logprobs_and_entropy), strict=True):
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_logprob_gradient_keeps_the_logits_dtype_and_refuses_a_second_backward():
    logits = torch.randn(5, 9, dtype=torch.bfloat16, requires_grad=True)
    logprobs, _ = sampled_token_logprobs_and_entropy(logits, torch.arange(5), 1.0)
    logprobs.sum().backward(retain_graph=True)
    assert logits.grad.dtype == torch.bfloat16
    # The backward wrote the gradient over its saved probabilities: a second pass must fail, not return garbage.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logprobs.sum().backward()


def test_masked_sum():
    assert masked_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == 8.0


def test_truncated_is_weights_by_hand():
    trainer = torch.tensor([[-1.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    engine = torch.tensor([[-1.5, -0.5, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Per token: exp(trainer - engine) = [e^0.5, e^-0.5, 1], [e^0.5, e^1.5 -> cap 2, masked].
    token = truncated_is_weights(trainer, engine, mask, "token", cap=2.0)
    assert torch.allclose(token, torch.tensor([[math.exp(0.5), math.exp(-0.5), 1.0], [math.exp(0.5), 2.0, 0.0]]))
    # Per sequence: exp(0.5 - 0.5 + 0) = 1 for row 0; exp(0.5 + 1.5) = e^2 -> cap 2 for row 1.
    sequence = truncated_is_weights(trainer, engine, mask, "sequence", cap=2.0)
    assert torch.allclose(sequence, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 12, 14, 15, 16])
    # max 16, buffer 4: free up to 12, then -(length - 12) / 4.
    assert torch.allclose(overlong_penalty(lengths, 16, 4), torch.tensor([0.0, 0.0, -0.5, -0.75, -1.0]))
    assert torch.allclose(overlong_penalty(lengths, 16, 0), torch.zeros(5))


def test_entropy_carries_gradient_only_on_request():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    tokens = torch.tensor([[0, 3]])
    _, detached = sampled_token_logprobs_and_entropy(logits, tokens, 1.0)
    _, live = sampled_token_logprobs_and_entropy(logits, tokens, 1.0, entropy_grad=True)
    assert not detached.requires_grad and live.requires_grad
    assert torch.allclose(detached, live.detach())
