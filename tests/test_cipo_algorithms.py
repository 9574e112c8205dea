"""CIPO's anchor selection, risk shaping and replay-ratio update against hand-computed expectations."""

import random

import pytest
import torch

from cipo_lightning.algorithms.cipo import (
    correction_advantage_shift,
    correction_messages,
    retention_counts,
    select_anchors,
    update_rho,
)
from cipo_lightning.callbacks import AdaptiveReplay, RiskShaping
from cipo_lightning.errors import ConfigError

# Pass rates 1.0, 0.25, 0.0, 0.5: groups 1 and 3 lie in the default band [0.25, 0.75].
GROUPS = [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("seed", range(5))
def test_in_band_prompts_are_preferred(seed):
    anchors = select_anchors(GROUPS, num_anchors=2, rho=0.5, rng=random.Random(seed))
    assert {a.group for a in anchors} == {1, 3}
    assert all(a.in_band for a in anchors)
    assert sorted(a.correct for a in anchors) == [False, True]
    for a in anchors:  # the chosen sample has the kind it claims
        assert (GROUPS[a.group][a.sample] == 1.0) == a.correct


def test_fallback_outside_the_band_keeps_the_mix():
    anchors = select_anchors(GROUPS, num_anchors=4, rho=0.5, rng=random.Random(0))
    # Group 0 has only correct samples and group 2 only failed ones, so the band's groups 1 and 3 must give one of
    # each kind for the mix to be 2 + 2; allocated greedily (correct first) it would be 3 + 1.
    assert sorted(a.group for a in anchors) == [0, 1, 2, 3]
    assert sum(a.correct for a in anchors) == 2
    assert {a.group for a in anchors if not a.in_band} == {0, 2}
    assert sorted(a.correct for a in anchors if a.in_band) == [False, True]


def test_joint_allocation_realises_the_mix():
    # The in-band prompt is the only source of a failed anchor: it must give that one, not a correct one.
    for seed in range(20):
        anchors = select_anchors([[1, 1, 0, 0], [1, 1, 1, 1]], num_anchors=2, rho=0.5, rng=random.Random(seed))
        assert sorted((a.group, a.correct) for a in anchors) == [(0, False), (1, True)]
    # Two anchors per prompt fill K = 4 with 2 + 2.
    for seed in range(20):
        anchors = select_anchors(
            [[1, 1, 1, 1], [0, 0, 0, 0]], num_anchors=4, rho=0.5, max_per_prompt=2, rng=random.Random(seed)
        )
        assert len(anchors) == 4 and sum(a.correct for a in anchors) == 2
        assert len({(a.group, a.sample) for a in anchors}) == 4


def test_realised_mix_equals_the_rounded_target_whenever_candidates_allow():
    """Property test: wherever at least K prompts can give a correct anchor and at least K a failed one, the number
    of correct anchors is the stochastically rounded rho * K (the rounding draw is replayed from the same seed) and
    every other promise holds: K anchors, distinct samples of the stated kind, per-prompt cap, band first."""
    checked = 0
    for seed in range(400):
        draw = random.Random(seed)
        group_size, num_anchors, per_prompt = draw.choice([2, 4, 8]), draw.randint(1, 6), draw.randint(1, 3)
        groups = [[float(draw.random() < draw.random()) for _ in range(group_size)] for _ in range(draw.randint(1, 8))]
        rho = draw.random()
        anchors = select_anchors(groups, num_anchors, rho, max_per_prompt=per_prompt, rng=random.Random(seed))
        capacity = sum(min(per_prompt, group_size) for _ in groups)
        assert len(anchors) == min(num_anchors, capacity)
        assert len({(a.group, a.sample) for a in anchors}) == len(anchors)
        assert all((groups[a.group][a.sample] >= 1.0) == a.correct for a in anchors)
        assert all(sum(a.group == g for a in anchors) <= per_prompt for g in range(len(groups)))
        # Band first: a fallback anchor of a kind only when no in-band prompt could still give one of that kind.
        for kind in {a.correct for a in anchors if not a.in_band}:
            for g, rewards in enumerate(groups):
                if 0.25 <= sum(rewards) / len(rewards) <= 0.75:
                    used = [a.sample for a in anchors if a.group == g]
                    unused_of_kind = [i for i, r in enumerate(rewards) if (r >= 1.0) == kind and i not in used]
                    assert len(used) == min(per_prompt, group_size) or not unused_of_kind
        if sum(1.0 in g for g in groups) >= num_anchors and sum(0.0 in g for g in groups) >= num_anchors:
            whole, fraction = divmod(round(rho * num_anchors, 9), 1.0)
            target = int(whole) + (random.Random(seed).random() < fraction)
            assert sum(a.correct for a in anchors) == target, (groups, num_anchors, rho)
            checked += 1
    assert checked > 50


def test_rho_sets_the_mix():
    groups = [[1.0, 0.0]] * 10
    anchors = select_anchors(groups, num_anchors=10, rho=0.3)
    assert sum(a.correct for a in anchors) == 3 and sum(not a.correct for a in anchors) == 7
    assert sorted(a.group for a in anchors) == list(range(10))


def test_fractional_mix_is_rounded_stochastically():
    # One anchor at rho 0.3: a correct one in about 30% of steps (plain rounding would give none, ever).
    groups = [[1.0, 0.0]] * 4
    picks = [select_anchors(groups, num_anchors=1, rho=0.3, rng=random.Random(seed))[0].correct for seed in range(2000)]
    assert sum(picks) / len(picks) == pytest.approx(0.3, abs=0.04)


def test_at_most_one_anchor_per_prompt_by_default():
    groups = [[1.0, 0.0, 1.0, 0.0]] * 2
    assert len(select_anchors(groups, num_anchors=4, rho=0.5)) == 2
    anchors = select_anchors(groups, num_anchors=4, rho=0.5, max_per_prompt=2)
    assert len(anchors) == 4 and len({(a.group, a.sample) for a in anchors}) == 4


def test_advantage_shift_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    anchors = torch.tensor([1.0, 1.0, 0.0, 0.0])  # c->c, c->i, i->i, i->c
    assert torch.equal(
        correction_advantage_shift(rewards, anchors, lambda_risk=1.0), torch.tensor([0.0, -1.0, 0.0, 0.0])
    )
    # Improvement bonus 0.5 * (r - r_anchor): 0, -0.5, 0, +0.5.
    shift = correction_advantage_shift(rewards, anchors, lambda_risk=1.0, alpha=0.5)
    assert torch.equal(shift, torch.tensor([0.0, -1.5, 0.0, 0.5]))
    # Partial credit: with correct_threshold 0.5 an anchor of 0.6 is correct and a correction of 0.4 broke it.
    shift = correction_advantage_shift(torch.tensor([0.4, 0.7]), torch.tensor([0.6, 0.6]), 2.0, correct_threshold=0.5)
    assert torch.equal(shift, torch.tensor([-2.0, 0.0]))


def test_retention_by_hand():
    anchors = torch.tensor([1.0, 1.0, 0.0, 1.0])
    corrections = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert retention_counts(anchors, corrections) == (2, 3)  # retention 2/3
    assert retention_counts(torch.zeros(3), torch.ones(3)) == (0, 0)  # no correct anchor: undefined


def test_rho_update_by_hand():
    # 0.3 * (1 + 0.8 * (0.8 - 0.5) + 0.3 * (0.7 - 0.5)) = 0.3 * 1.30 = 0.39.
    assert update_rho(0.3, 0.5, 0.7) == pytest.approx(0.39)
    # Retention rose: no drop term. 0.3 * (1 + 0.8 * (0.8 - 0.9)) = 0.276.
    assert update_rho(0.3, 0.9, 0.5) == pytest.approx(0.276)
    assert update_rho(0.7, 0.0, None) == 0.8  # 0.7 * 1.64 = 1.148, clipped to rho_max
    assert update_rho(0.2, 1.0, 1.0) == 0.2  # 0.2 * 0.84 = 0.168, clipped to rho_min
    assert update_rho(0.35, None, 0.9) == 0.35  # no correct anchor this step: no update


def test_correction_messages_show_problem_and_attempt_without_verdict():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    messages = correction_messages(prompt, "The answer is 6.")
    assert messages[0] == prompt[0] and messages[1]["role"] == "user" and len(messages) == 2
    text = messages[1]["content"]
    assert "What is 2 + 3?" in text and "The answer is 6." in text
    for verdict in ("incorrect", "attempt is wrong", "attempt is correct", "attempt is right", "wrong answer"):
        assert verdict not in text.lower()
    custom = correction_messages(prompt[1:], "5", template="Q: {problem}\nA: {attempt}\nCheck it.")
    assert custom == [{"role": "user", "content": "Q: What is 2 + 3?\nA: 5\nCheck it."}]
    with pytest.raises(ValueError, match="problem"):
        correction_messages(prompt, "5", template="no fields")


def test_correction_template_keeps_other_braces():
    prompt = [{"role": "user", "content": "Solve {x}: x + 1 = 2"}]
    template = "Problem: {problem}\nAttempt: {attempt}\nPut the final answer in \\boxed{}."
    (message,) = correction_messages(prompt, "x = {1} so {problem}", template)
    assert (
        message["content"]
        == "Problem: Solve {x}: x + 1 = 2\nAttempt: x = {1} so {problem}\nPut the final answer in \\boxed{}."
    )


def test_adaptive_replay_updates_and_checkpoints_rho():
    replay = AdaptiveReplay()  # rho0 0.3, target 0.8, w1 0.8, w2 0.3, bounds [0.2, 0.8]
    replay.observe(0.5)  # 0.3 * (1 + 0.8 * 0.3) = 0.372; no previous retention
    assert replay.rho == pytest.approx(0.372)
    replay.observe(None)  # no correct anchor: unchanged, and the previous retention is kept
    assert replay.rho == pytest.approx(0.372) and replay.retention_prev == 0.5
    replay.observe(0.25)  # 0.372 * (1 + 0.8 * 0.55 + 0.3 * 0.25) = 0.372 * 1.515 = 0.56358
    assert replay.rho == pytest.approx(0.56358)
    restored = AdaptiveReplay()
    restored.load_state_dict(replay.state_dict())
    assert (restored.rho, restored.retention_prev) == (replay.rho, 0.25)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rho_min": 0.9, "rho_max": 0.5, "rho": 0.6}, "rho_min"),
        ({"rho": 0.1}, "replay.rho"),
        ({"w1": -1}, "w1"),
        ({"rho": 0.0, "rho_min": 0.0}, "rho_min must be > 0"),
    ],
)
def test_adaptive_replay_rejects_bad_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        AdaptiveReplay(**kwargs)


def test_fixed_rho_may_be_zero():
    replay = AdaptiveReplay(rho=0.0, rho_min=0.0, w1=0.0, w2=0.0)  # failed anchors only, no adaptive replay
    replay.observe(0.1)
    assert replay.rho == 0.0


def test_risk_shaping_callback_shifts_and_validates():
    shift = RiskShaping(lambda_risk=0.5).advantage_shift(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(shift, torch.tensor([-0.5, 0.0]))
    with pytest.raises(ConfigError, match="shaping.lambda_risk"):
        RiskShaping(lambda_risk=-1.0)
