"""The objective's pure functions against values computed by hand or by naive loops."""

import math

import torch

from cipo_lightning.algorithms import (
    clipped_surrogate,
    group_advantages,
    k3_kl,
    masked_sum,
    sampled_token_logprobs_and_entropy,
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
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A > 0: -min(r A, clip(r) A): r = 1.65 clipped to 1.28; r = 0.61 not clipped (min picks r A).
    # A < 0: r = 1.65 -> -min(-1.65, -1.28) = 1.65 (unclipped); r = 0.61 -> -min(-0.61, -0.8) = 0.8 (clipped).
    expected = torch.tensor([[-2.0, -1.28, -r_lo, r_hi, 0.8]])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert clipped.tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0]]


def test_clipped_surrogate_gradient_vanishes_only_where_clipped():
    logp = torch.tensor([[0.0, 0.5, -0.5]], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 3), torch.ones(1, 3), eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    # d(-r A)/dlogp = -r A where unclipped; 0 where clipped.
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0, -math.exp(-0.5)]]))


def test_k3_kl_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    # d = ref - logp = [0, 1, -1]; k3 = e^d - d - 1.
    expected = torch.tensor([0.0, math.e - 2.0, math.exp(-1.0)])
    assert torch.allclose(k3_kl(logp, ref), expected)


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


def test_masked_sum():
    assert masked_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == 8.0
