"""Shared test pieces."""

from __future__ import annotations

from typing import Any


class ParityReward:
    """1.0 when the completion has an even number of characters.

    Tiny random models never answer arithmetic correctly, so the real verifier would give every group zero variance
    and no gradient. This reward follows the same contract and splits random completions about evenly, which is what
    the training-mechanics tests need.
    """

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) for c in completions]


class HalfInformativeReward:
    """ParityReward for problems with an odd answer, 0.0 for every completion of the others (zero-variance groups)."""

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **_: list[Any]) -> list[float]:
        return [float(len(c) % 2 == 0) if int(a) % 2 else 0.0 for c, a in zip(completions, answer, strict=True)]
