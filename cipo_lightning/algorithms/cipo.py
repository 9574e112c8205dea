"""CIPO's own math (docs/cipo.md): anchor selection, risk-averse shaping, the adaptive replay ratio.

Pure functions on plain lists and tensors, no engine and no Lightning: the rollout callback calls them with the
step's scored base groups and the verified corrections.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Anchor:
    """A base completion shown back to the model: group (prompt) index, sample index within the group, and why."""

    group: int
    sample: int
    correct: bool
    in_band: bool


def select_anchors(
    group_rewards: list[list[float]],
    num_anchors: int,
    rho: float,
    band: tuple[float, float] = (0.25, 0.75),
    max_per_prompt: int = 1,
    correct_threshold: float = 1.0,
    rng: random.Random | None = None,
) -> list[Anchor]:
    """Choose up to `num_anchors` base completions, a share rho of them correct and the rest failed (docs/cipo.md,
    "Anchor selection").

    How many: K = min(num_anchors, what the candidates allow with at most `max_per_prompt` per prompt). The mix: the
    target number of correct anchors is rho * K rounded stochastically (floor, plus one with probability the
    fraction), so the expected mix is rho even for a handful of anchors (plain rounding with K = 1 and rho < 0.5 would
    never pick a correct anchor, retention would never be measured and rho could never move). It is realised exactly
    whenever the candidates allow it, otherwise as closely as they allow.

    Where from: prompts whose pass rate lies in `band` (intermediate difficulty) first, the others only as fallback.
    Correct and failed anchors are allocated jointly, not one kind after the other: a slot goes to a kind only if the
    remaining counts of both kinds can still be met by the remaining slots (an exact feasibility test, see
    `_can_complete`), so a prompt that is the only source of one kind is kept for it. Slots are visited prompt by
    prompt, in-band prompts first, one anchor per prompt per pass (so anchors spread over prompts before a prompt
    gives a second one), each part in a shuffled order.
    """
    rng = rng or random.Random(0)
    correct = [[i for i, r in enumerate(rewards) if r >= correct_threshold] for rewards in group_rewards]
    failed = [[i for i, r in enumerate(rewards) if r < correct_threshold] for rewards in group_rewards]
    in_band = [band[0] <= len(c) / len(r) <= band[1] for c, r in zip(correct, group_rewards, strict=True)]
    # Per prompt: samples of each kind still free, and anchors it may still give (its slots not yet visited).
    free = [[len(c), len(f)] for c, f in zip(correct, failed, strict=True)]
    slots_left = [min(max_per_prompt, len(r)) for r in group_rewards]

    total = min(num_anchors, sum(min(cap, c + f) for cap, (c, f) in zip(slots_left, free, strict=True)))
    whole, fraction = divmod(round(rho * total, 9), 1.0)  # round: 0.3 * 10 is 3.0000000000000004
    wanted_correct = int(whole) + (rng.random() < fraction)
    # The feasible numbers of correct anchors among `total` form an interval: clamp the target into it.
    most_correct = sum(min(cap, c) for cap, (c, _) in zip(slots_left, free, strict=True))
    most_failed = sum(min(cap, f) for cap, (_, f) in zip(slots_left, free, strict=True))
    wanted_correct = min(max(wanted_correct, total - most_failed), most_correct)
    need = [wanted_correct, total - wanted_correct]  # [correct, failed] still to choose

    order = list(range(len(group_rewards)))
    rng.shuffle(order)
    order.sort(key=lambda g: not in_band[g])
    visits = [g for part in (True, False) for _ in range(max_per_prompt) for g in order if in_band[g] == part]
    pools = [correct, failed]
    taken: set[tuple[int, int]] = set()
    anchors = []
    for group in visits:
        if not any(need):
            break
        if slots_left[group] == 0:
            continue
        slots_left[group] -= 1
        # Kinds this prompt can give now, the one with more still needed first (ties at random).
        kinds = [k for k in (0, 1) if need[k] and free[group][k]]
        rng.shuffle(kinds)
        kinds.sort(key=lambda k: -need[k])
        for kind in kinds:
            need[kind] -= 1
            free[group][kind] -= 1
            if _can_complete(need, free, slots_left):
                sample = rng.choice([i for i in pools[kind][group] if (group, i) not in taken])
                taken.add((group, sample))
                anchors.append(Anchor(group, sample, kind == 0, in_band[group]))
                break
            need[kind] += 1
            free[group][kind] += 1
    return anchors


def _can_complete(need: list[int], free: list[list[int]], slots_left: list[int]) -> bool:
    """Whether `need` = [correct, failed] anchors can still be chosen from prompts with `free` samples of each kind
    and `slots_left` anchors each. This is a flow problem (kinds -> prompts -> anchors); by max-flow/min-cut it is
    feasible exactly when each kind alone and both together fit their capacities."""
    fits_correct = need[0] <= sum(min(s, c) for s, (c, _) in zip(slots_left, free, strict=True))
    fits_failed = need[1] <= sum(min(s, f) for s, (_, f) in zip(slots_left, free, strict=True))
    fits_both = need[0] + need[1] <= sum(min(s, c + f) for s, (c, f) in zip(slots_left, free, strict=True))
    return fits_correct and fits_failed and fits_both


def correction_advantage_shift(
    rewards: Tensor,
    anchor_rewards: Tensor,
    lambda_risk: float,
    alpha: float = 0.0,
    correct_threshold: float = 1.0,
) -> Tensor:
    """Risk-averse shaping of corrections, as a term added to their advantages after the group normalisation
    (docs/cipo.md, "Risk-averse shaping"): -lambda_risk for a correction that turned a correct anchor wrong (c -> i),
    plus the improvement bonus alpha * (r - r_anchor). `anchor_rewards[i]` is the reward of correction i's anchor.

    Not subtracted from the rewards: a correction group holds one anchor's corrections, so with 0/1 rewards the
    penalty is an affine map of the rewards inside the group, which group normalisation removes exactly, and a group
    whose corrections all broke has zero variance and would get no gradient at all.
    """
    anchor_correct = anchor_rewards >= correct_threshold
    broken = anchor_correct & (rewards < correct_threshold)
    return -lambda_risk * broken.float() + alpha * (rewards - anchor_rewards)


def retention_counts(anchor_rewards: Tensor, rewards: Tensor, correct_threshold: float = 1.0) -> tuple[int, int]:
    """(corrections of correct anchors that stay correct, corrections of correct anchors): retention is their
    ratio (c -> c), undefined when no anchor was correct. Counts rather than the ratio, so ranks can sum them."""
    of_correct = anchor_rewards >= correct_threshold
    return int((rewards[of_correct] >= correct_threshold).sum()), int(of_correct.sum())


def update_rho(
    rho: float,
    retention_now: float | None,
    retention_prev: float | None,
    target: float = 0.8,
    w1: float = 0.8,
    w2: float = 0.3,
    rho_min: float = 0.2,
    rho_max: float = 0.8,
) -> float:
    """rho * (1 + w1 * (target - retention) + w2 * max(0, retention_prev - retention)), clipped to [rho_min, rho_max].

    Retention below target (over-editing right answers) raises rho: more correct anchors. A drop since the previous
    step raises it further. No update when this step had no correct anchor (retention None); without a previous
    retention the drop term is 0.
    """
    if retention_now is None:
        return rho
    drop = max(0.0, retention_prev - retention_now) if retention_prev is not None else 0.0
    updated = rho * (1.0 + w1 * (target - retention_now) + w2 * drop)
    return min(max(updated, rho_min), rho_max)


_TEMPLATE_FIELDS = ("problem", "attempt")
_TEMPLATE_FIELD = re.compile(r"\{(problem|attempt)\}")

DEFAULT_CORRECTION_TEMPLATE = (
    "Here is a problem and a previous attempt at it.\n\n"
    "Problem:\n{problem}\n\n"
    "Previous attempt:\n{attempt}\n\n"
    "Review the attempt. If it is wrong, give a corrected solution; if it is right, keep its answer. "
    "End with the final answer in the format the problem asks for."
)


def check_correction_template(template: str) -> None:
    """Raise ValueError unless `template` has both fields {problem} and {attempt}."""
    missing = [field for field in _TEMPLATE_FIELDS if "{" + field + "}" not in template]
    if missing:
        raise ValueError(f"the correction template lacks the field(s) {', '.join('{' + f + '}' for f in missing)}")


def correction_messages(
    prompt: list[dict[str, str]], attempt: str, template: str = DEFAULT_CORRECTION_TEMPLATE
) -> list[dict[str, str]]:
    """The chat messages of a correction prompt: the problem's system turn (if any) and one user turn that shows the
    problem and the model's own attempt. The template never says whether the attempt was right.

    Fields are filled in one pass, not with str.format, so braces elsewhere in the template (\\boxed{}) or inside
    the problem and the attempt stay as they are.
    """
    check_correction_template(template)
    *system, user = prompt
    values = {"problem": user["content"], "attempt": attempt}
    content = _TEMPLATE_FIELD.sub(lambda match: values[match.group(1)], template)
    return [*system, {"role": "user", "content": content}]
