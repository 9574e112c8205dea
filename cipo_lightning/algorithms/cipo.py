"""CIPO's own math (../shared/CIPO.md): anchor selection, risk-averse shaping, the adaptive replay ratio.

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
    """Choose `num_anchors` base completions: rho * num_anchors correct ones, the rest failed.

    A fractional rho * num_anchors is rounded stochastically (floor, plus one with probability the fraction), so the
    expected mix is rho even for a handful of anchors: with plain rounding, K = 1 and rho < 0.5 would never pick a
    correct anchor, retention would never be measured and rho could never move.

    Prompts whose pass rate lies in `band` (intermediate difficulty) are used first, the others only as fallback.
    Each prompt gives at most `max_per_prompt` anchors in total. When one kind runs out (say, no correct completion
    anywhere), the remaining places go to the other kind, so the correction stream keeps its size; fewer than
    `num_anchors` are returned only when the candidates run out altogether.
    """
    rng = rng or random.Random(0)
    pass_rates = [sum(r >= correct_threshold for r in rewards) / len(rewards) for rewards in group_rewards]
    in_band = [band[0] <= p <= band[1] for p in pass_rates]
    # Candidate order: in-band prompts first, then the rest, each part shuffled.
    order = list(range(len(group_rewards)))
    rng.shuffle(order)
    order.sort(key=lambda g: not in_band[g])
    used = [0] * len(group_rewards)
    taken: set[tuple[int, int]] = set()

    def take(correct: bool, count: int) -> list[Anchor]:
        chosen = []
        for group in order:
            if len(chosen) == count:
                break
            if used[group] >= max_per_prompt:
                continue
            samples = [
                i
                for i, r in enumerate(group_rewards[group])
                if (r >= correct_threshold) == correct and (group, i) not in taken
            ]
            if samples:
                sample = rng.choice(samples)
                used[group] += 1
                taken.add((group, sample))
                chosen.append(Anchor(group, sample, correct, in_band[group]))
        return chosen

    whole, fraction = divmod(round(rho * num_anchors, 9), 1.0)  # round: 0.3 * 10 is 3.0000000000000004
    num_correct = int(whole) + (rng.random() < fraction)
    anchors = take(True, num_correct)
    anchors += take(False, num_anchors - len(anchors))
    anchors += take(True, num_anchors - len(anchors))  # too few failed ones: fill with correct ones
    return anchors


def shape_correction_rewards(
    rewards: Tensor,
    anchor_rewards: Tensor,
    lambda_risk: float,
    alpha: float = 0.0,
    correct_threshold: float = 1.0,
) -> Tensor:
    """Risk-averse correction rewards: r - lambda_risk when a correct anchor was turned wrong (c -> i), plus the
    optional improvement bonus alpha * (r - r_anchor). `anchor_rewards` is the reward of each correction's anchor."""
    anchor_correct = anchor_rewards >= correct_threshold
    broken = anchor_correct & (rewards < correct_threshold)
    return rewards - lambda_risk * broken.float() + alpha * (rewards - anchor_rewards)


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
