"""The module's loss on a fixed small batch equals the value computed by hand, and does not depend on micro-batching."""

import math

import pytest
import torch

from cipo_lightning.module import CIPOModule
from cipo_lightning.rollout import Sample, collate_rollouts


def _fixed_batch(temperature: float = 1.0, truncated: tuple[bool, ...] = (False,) * 4):
    # One group of 4: rewards [1, 0, 0, 0] -> advantages [1.5, -0.5, -0.5, -0.5] (mean 0.25, unbiased std 0.5).
    # Completion lengths 1, 2, 3, 2 -> 8 tokens.
    prompts = [[1, 9690, 198], [1, 4093], [1, 4093, 198, 6004], [1, 520]]
    completions = [[42], [43, 44], [45, 46, 47], [48, 2]]
    samples = [Sample(c, [0.0] * len(c), truncated=t) for c, t in zip(completions, truncated, strict=True)]
    rewards, groups = [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0]
    return collate_rollouts(
        prompts, samples, rewards, groups, pad_token_id=2, temperature=temperature, max_completion_len=4
    )


@pytest.fixture
def module(tiny_model):
    module = CIPOModule(model=tiny_model, micro_batch_size=4, gradient_checkpointing=False)
    module.configure_model()
    return module


def test_loss_of_fixed_batch_equals_hand_value(module):
    # With one update per batch the ratio is exactly 1, so the token-mean loss is -sum_i(A_i * len_i) / sum_i(len_i)
    # = -(1.5 * 1 - 0.5 * 2 - 0.5 * 3 - 0.5 * 2) / 8 = 0.25, whatever the model's weights.
    metrics = module.accumulate_policy_gradient(_fixed_batch(), backward=lambda loss: None)
    assert math.isclose(metrics["train/loss"], 0.25, rel_tol=1e-5)
    assert metrics["train/clip_frac"] == 0.0


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # -sum_i(A_i * len_i) / 8 tokens (above).
        ("token_mean", 0.25),
        # Mean over each completion of -A_i, then over completions: -mean(A) = 0 for group-centred advantages.
        ("seq_mean_token_mean", 0.0),
        # -sum_i(A_i * len_i) / (max_len 4 * 4 completions) = 2 / 16.
        ("seq_mean_token_sum_norm", 0.125),
    ],
)
def test_loss_of_fixed_batch_by_aggregation(module, aggregation, expected):
    module.hparams.loss_aggregation = aggregation
    metrics = module.accumulate_policy_gradient(_fixed_batch(), backward=lambda loss: None)
    assert metrics["train/loss"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("policy_loss", ["ppo", "gspo", "cispo"])
def test_gradient_does_not_depend_on_micro_batch_size(module, aggregation, policy_loss):
    module.hparams.loss_aggregation = aggregation
    module.hparams.policy_loss = policy_loss
    batch = _fixed_batch(temperature=0.7)
    grads = []
    for micro_batch_size in (4, 1, 3):
        module.hparams.micro_batch_size = micro_batch_size
        module.policy.zero_grad()
        module.accumulate_policy_gradient(batch, backward=lambda loss: loss.backward())
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]))
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        # Equal up to float32 rounding (different padding changes the summation order).
        assert (other - grads[0]).norm() / grads[0].norm() < 1e-4


def test_kl_term_is_zero_when_policy_equals_reference(tiny_model):
    module = CIPOModule(model=tiny_model, beta=0.1, gradient_checkpointing=False)
    module.configure_model()
    metrics = module.accumulate_policy_gradient(_fixed_batch(), backward=lambda loss: None)
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-7)
    assert math.isclose(metrics["train/loss"], 0.25, rel_tol=1e-5)


def test_reference_not_loaded_when_beta_is_zero(module):
    assert module.reference is None


def test_masking_truncated_completions(module):
    # The length-3 completion (A = -0.5) is truncated and masked: -(1.5 * 1 - 0.5 * 2 - 0.5 * 2) / 5 tokens = 0.1.
    module.hparams.mask_truncated = True
    metrics = module.accumulate_policy_gradient(_fixed_batch(truncated=(False, False, True, False)), lambda loss: None)
    assert metrics["train/loss"] == pytest.approx(0.1, abs=1e-6)


def test_several_updates_per_batch_use_the_behaviour_policy(module):
    batch = _fixed_batch(temperature=0.7)
    old = module.completion_logprobs(batch)
    # training_step passes the batch's loss targets: the same passes, the same log-probs.
    assert torch.equal(module.completion_logprobs(batch, module.loss_targets(batch)), old)
    # Before any update the behaviour policy is the current one: the hand value holds.
    first = module.accumulate_policy_gradient(batch, lambda loss: loss.backward(), old)
    assert first["train/loss"] == pytest.approx(0.25, abs=1e-5)
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=50.0)
    optimizer.step()
    module.policy.zero_grad()
    # After a step the ratio to the behaviour policy moves away from 1 and the clip starts to act.
    second = module.accumulate_policy_gradient(batch, lambda loss: None, old)
    assert second["train/loss"] != pytest.approx(0.25, abs=1e-3)
    assert second["train/clip_frac"] > 0


def test_rollout_is_weights_are_logged(module):
    module.hparams.rollout_is = "token"
    metrics = module.accumulate_policy_gradient(_fixed_batch(), lambda loss: None)
    # Engine log-probs of the fixed batch are 0, so every weight is min(exp(logp), 2) = p(token) < 1.
    assert 0 < metrics["train/is_weight_mean"] < 1 and metrics["train/is_weight_max"] < 1
    assert metrics["train/logp_mismatch_max"] > 0


# A correction group for the two-stream tests: longer prompts (problem + anchor attempt), rewards [1, 1, 0, 0],
# completion lengths 1, 1, 2, 2 -> advantages +-a, a = 0.5 / sqrt(1/3) = 0.8660, token-mean loss
# -(a + a - 2a - 2a) / 6 = a / 3 = 0.2887.
CORRECTION_PROMPTS = [[1, 9690, 198, 30, 31, 32], [1, 4093, 30, 31, 32, 33, 34], [1, 30, 31], [1, 520, 30, 31, 32]]
CORRECTION_COMPLETIONS = [[60], [61], [62, 63], [64, 2]]


def _correction_rows_as_batch():
    samples = [Sample(c, [0.0] * len(c), truncated=False) for c in CORRECTION_COMPLETIONS]
    return collate_rollouts(CORRECTION_PROMPTS, samples, [1.0, 1.0, 0.0, 0.0], [0] * 4, 2, 1.0, max_completion_len=4)


def _two_stream_batch():
    base = _fixed_batch()
    prompts = [[1, 9690, 198], [1, 4093], [1, 4093, 198, 6004], [1, 520]] + CORRECTION_PROMPTS
    completions = [[42], [43, 44], [45, 46, 47], [48, 2]] + CORRECTION_COMPLETIONS
    samples = [Sample(c, [0.0] * len(c), truncated=False) for c in completions]
    rewards = base.rewards.tolist() + [1.0, 1.0, 0.0, 0.0]
    return collate_rollouts(
        prompts, samples, rewards, [0] * 4 + [1] * 4, 2, 1.0, max_completion_len=4, streams=[0] * 4 + [1] * 4
    )


def test_two_stream_loss_is_base_plus_weighted_correction_by_hand(module):
    module.hparams.lambda_corr = 0.5
    metrics = module.accumulate_policy_gradient(_two_stream_batch(), backward=lambda loss: None)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert metrics["train/base_loss"] == pytest.approx(0.25, rel=1e-5)
    assert metrics["train/correction_loss"] == pytest.approx(a / 3, rel=1e-5)
    assert metrics["train/loss"] == pytest.approx(0.25 + 0.5 * a / 3, rel=1e-5)
    assert metrics["train/correction_clip_frac"] == 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_two_stream_gradient_is_base_gradient_plus_weighted_correction_gradient(module, aggregation):
    """Each stream is normalised on its own, so the joint gradient decomposes; the correction stream contributes."""
    module.hparams.loss_aggregation = aggregation
    module.hparams.micro_batch_size = 3  # micro-batches that straddle the two streams

    def gradient(batch, lambda_corr=1.0):
        module.hparams.lambda_corr = lambda_corr
        module.policy.zero_grad()
        module.accumulate_policy_gradient(batch, backward=lambda loss: loss.backward())
        return torch.cat([p.grad.flatten() for p in module.policy.parameters()])

    base, correction = gradient(_fixed_batch()), gradient(_correction_rows_as_batch())
    joint = gradient(_two_stream_batch(), lambda_corr=0.5)
    assert correction.norm() > 0
    expected = base + 0.5 * correction
    assert (joint - expected).norm() / expected.norm() < 1e-4
    # lambda_corr 0 leaves exactly the base stream's gradient.
    assert (gradient(_two_stream_batch(), lambda_corr=0.0) - base).norm() / base.norm() < 1e-4
