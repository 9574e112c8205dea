"""Risk-averse shaping reaches the gradient: the loss of the correction stream changes with lambda_risk and alpha
under every advantage estimator and scale, also in a group where every correction broke a correct anchor.

Shaped rewards alone would not: a correction group holds one anchor's corrections, so with 0/1 rewards the penalty is
an affine map of the rewards inside the group, which the group normalisation removes (docs/cipo.md).
"""

import pytest
import torch

from cipo_lightning.callbacks import RiskShaping
from cipo_lightning.module import CIPOModule
from cipo_lightning.rollout import Sample, collate_rollouts
from cipo_lightning.rollout.batch import BASE_STREAM, CORRECTION_STREAM

SETTINGS = [
    {"advantage_estimator": "grpo", "advantage_scale": "group"},
    {"advantage_estimator": "grpo", "advantage_scale": "batch"},
    {"advantage_estimator": "grpo", "advantage_scale": "none"},
    {"advantage_estimator": "rloo"},
]
BASE = [1.0, 0.0, 1.0, 0.0]
# Two correction groups of a correct anchor: one mixed (two corrections broke it), one where all four broke it.
MIXED, ALL_BROKEN = [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]


def _batch(groups: list[tuple[int, float | None, list[float]]], shaping: RiskShaping):
    """One row per reward; each group is (stream, anchor reward or None for a base group, rewards)."""
    prompts, samples, rewards, group_ids, streams, shifts = [], [], [], [], [], []
    for index, (stream, anchor_reward, group_rewards) in enumerate(groups):
        shift = [0.0] * len(group_rewards)
        if anchor_reward is not None:
            r = torch.tensor(group_rewards)
            shift = shaping.advantage_shift(r, torch.full_like(r, anchor_reward)).tolist()
        for row, reward in enumerate(group_rewards):
            prompts.append([1, 9690, 198 + index])
            tokens = [42 + row + 5 * index, 43 + row, 2][: 1 + (row + index) % 3]
            samples.append(Sample(tokens, [0.0] * len(tokens), truncated=False))
            rewards.append(reward)
            group_ids.append(index)
            streams.append(stream)
        shifts += shift
    return collate_rollouts(prompts, samples, rewards, group_ids, 2, 0.7, 6, streams, shifts)


@pytest.fixture(scope="module")
def module(tiny_model):
    module = CIPOModule(model=tiny_model, micro_batch_size=32, gradient_checkpointing=False)
    module.configure_model()
    return module


def _gradient(module, batch, settings) -> torch.Tensor:
    module.hparams.update(settings)
    module.policy.zero_grad(set_to_none=False)
    module.accumulate_policy_gradient(batch, backward=lambda loss: loss.backward())
    return torch.cat([p.grad.flatten().clone() for p in module.policy.parameters()])


def _logprob_gradient(module, batch, rows: list[int]) -> torch.Tensor:
    """Gradient of the summed log-probs of the completion tokens of `rows`."""
    module.policy.zero_grad(set_to_none=False)
    logprobs, _ = module.token_logprobs(module.policy, batch)
    (logprobs * batch.completion_mask)[rows].sum().backward()
    return torch.cat([p.grad.flatten().clone() for p in module.policy.parameters()])


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(s.values()))
def test_lambda_risk_changes_the_correction_gradient(module, settings):
    groups = [(BASE_STREAM, None, BASE), (CORRECTION_STREAM, 1.0, MIXED)]
    off = _gradient(module, _batch(groups, RiskShaping(lambda_risk=0.0)), settings)
    on = _gradient(module, _batch(groups, RiskShaping(lambda_risk=1.0)), settings)
    assert off.norm() > 0
    assert (on - off).norm() / off.norm() > 0.05
    # The difference pushes the two broken corrections (rows 6 and 7) down: a step along -grad lowers their log-prob.
    broken = _logprob_gradient(module, _batch(groups, RiskShaping()), [6, 7])
    assert torch.dot(on - off, broken) > 0


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(s.values()))
def test_a_group_where_every_correction_broke_is_pushed_down(module, settings):
    groups = [(CORRECTION_STREAM, 1.0, ALL_BROKEN)]
    off = _gradient(module, _batch(groups, RiskShaping(lambda_risk=0.0)), settings)
    on = _gradient(module, _batch(groups, RiskShaping(lambda_risk=1.0)), settings)
    assert off.norm() == 0  # zero variance: no gradient without shaping
    assert on.norm() > 0
    broken = _logprob_gradient(module, _batch(groups, RiskShaping()), [0, 1, 2, 3])
    assert torch.dot(on, broken) > 0


def test_advantages_by_hand(module):
    module.hparams.update(SETTINGS[0])
    groups = [(BASE_STREAM, None, BASE), (CORRECTION_STREAM, 1.0, MIXED), (CORRECTION_STREAM, 1.0, ALL_BROKEN)]
    advantages = module.loss_targets(_batch(groups, RiskShaping(lambda_risk=1.0))).advantages
    # Base [1, 0, 1, 0]: mean 0.5, unbiased std sqrt(1/3), so +-0.5 * sqrt(3) = +-0.866 (eps 1e-6 aside).
    # Mixed corrections: the same +-0.866, the broken two then -1 more; all broken: 0 - 1.
    a = 0.5 * 3**0.5
    expected = [a, -a, a, -a, a, a, -a - 1, -a - 1, -1, -1, -1, -1]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-5)


def test_alpha_changes_the_gradient(module):
    # A failed anchor whose corrections fixed it once (i->c): the bonus alpha * (r - 0) raises that correction more.
    groups = [(CORRECTION_STREAM, 0.0, [1.0, 0.0, 0.0, 0.0])]
    plain = _gradient(module, _batch(groups, RiskShaping(alpha=0.0)), SETTINGS[0])
    bonus = _gradient(module, _batch(groups, RiskShaping(alpha=0.5)), SETTINGS[0])
    assert (bonus - plain).norm() / plain.norm() > 0.05
    fixed = _logprob_gradient(module, _batch(groups, RiskShaping()), [0])
    assert torch.dot(bonus - plain, fixed) < 0  # a step along -grad raises the fixing correction's log-prob
