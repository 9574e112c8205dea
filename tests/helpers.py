"""Shared test pieces."""

from __future__ import annotations

from typing import Any

from cipo_lightning.rollout import Sample, SamplingSettings, collate_rollouts

# Seeded sampling for prompts_beyond_one_step.
SEEDED_PAIRS = SamplingSettings(n=2, max_new_tokens=2, temperature=1.0, seed=3)


def prompts_beyond_one_step(step_tokens: int) -> list[list[int]]:
    """Distinct 300-token prompts, more of them in all than a vLLM scheduler step of `step_tokens` prefills."""
    return [[100 + row] + [5] * 299 for row in range(step_tokens // 300 + 2)]


class ParityReward:
    """1.0 when the completion has an even number of characters.

    Tiny random models never answer arithmetic correctly, so the real verifier would give every group zero variance
    and no gradient. This reward follows the same contract and splits random completions about evenly, which is what
    the training-mechanics tests need.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) for c in completions]


class PartialCreditReward:
    """ParityReward scaled to partial credit: 0.6 for an even length, 0.2 for an odd one (never 1.0)."""

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [0.6 if len(c) % 2 == 0 else 0.2 for c in completions]


class HalfInformativeReward:
    """ParityReward for problems with an odd answer, 0.0 for every completion of the others (zero-variance groups)."""

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **_: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) if int(a) % 2 else 0.0 for c, a in zip(completions, answer, strict=True)]


def tiny_grpo_fit_args(tiny_model: str) -> list[str]:
    """CLI arguments of a quickstart-config GRPO fit on the tiny model with the transformers engine (no vLLM start)."""
    return ["fit", "--config", "configs/quickstart.yaml", "--algorithm", "grpo", "--model.model", tiny_model,
            "--rollout.engine", "cipo_lightning.rollout.HFEngine"]  # fmt: skip


def two_group_batch():
    """Two groups of four with different rewards and lengths (rank r of 2 gets group r)."""
    prompts = [[1, 9690, 198], [1, 4093], [1, 4093, 198, 6004], [1, 520]] * 2
    completions = [[42], [43, 44], [45, 46, 47], [48, 2], [50, 51, 52, 53], [54], [55, 56], [57, 58, 59]]
    samples = [Sample(c, [0.0] * len(c), truncated=False) for c in completions]
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    return collate_rollouts(prompts, samples, rewards, [0] * 4 + [1] * 4, 2, temperature=0.7, max_completion_len=6)


def two_stream_batch():
    """Four groups of four, a base group then a correction group, twice (rank r of 2 gets rows 8r..8r+7: one group of
    each stream), with mixed prompt and completion lengths and a risk-shaping shift on the broken corrections."""
    prompts = [[1, 9690, 198], [1, 4093], [1, 4093, 198, 6004], [1, 520]] * 2
    prompts += [[1, 9690, 198, 700, 701, 702, 703], [1, 4093, 704, 705, 706]] * 4
    completions = [[42], [43, 44], [45, 46, 47], [48, 2], [60, 61], [62], [63, 64, 65], [66, 67, 68, 2]]
    completions += [[50, 51, 52, 53], [54], [55, 56], [57, 58, 59], [70], [71, 72, 73, 74, 75], [76, 2], [77, 78]]
    order = [*range(0, 4), *range(8, 12), *range(4, 8), *range(12, 16)]  # base, correction, base, correction
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    shifts = [0.0] * 4 + [0.0, 0.0, -1.0, -1.0] + [0.0] * 4 + [-1.0] * 4
    samples = [Sample(completions[i], [-0.1 * (i % 3)] * len(completions[i]), truncated=False) for i in order]
    return collate_rollouts(
        [prompts[i] for i in order],
        samples,
        rewards,
        [row // 4 for row in range(16)],
        2,
        temperature=0.7,
        max_completion_len=6,
        streams=[0] * 4 + [1] * 4 + [0] * 4 + [1] * 4,
        advantage_shift=shifts,
    )


def grouped_two_stream_batch():
    """Four real groups (each group's rows share their prompt, as sampled groups do), two base and two correction
    groups with longer prompts, mixed completion lengths, a risk-shaping shift on two corrections."""
    prompts = [[1, 9690, 198]] * 4 + [[1, 4093, 198, 6004, 520]] * 3
    prompts += [[1, 9690, 198, 700, 701, 702, 703]] * 3 + [[1, 4093, 704, 705, 706, 707]] * 2
    completions = [[42], [43, 44], [45, 46, 47], [48, 2], [60, 61], [62], [63, 64, 65, 66, 2]]
    completions += [[50, 51, 52, 53], [54], [55, 56], [57, 58, 59], [70]]
    samples = [Sample(c, [-0.1 * (i % 3)] * len(c), truncated=False) for i, c in enumerate(completions)]
    return collate_rollouts(
        prompts,
        samples,
        rewards=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0],
        group_ids=[0] * 4 + [1] * 3 + [2] * 3 + [3] * 2,
        pad_token_id=2,
        temperature=0.7,
        max_completion_len=6,
        streams=[0] * 7 + [1] * 5,
        advantage_shift=[0.0] * 7 + [0.0, -1.0, 0.0, 0.0, -1.0],
    )
