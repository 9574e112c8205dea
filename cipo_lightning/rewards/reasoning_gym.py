"""reasoning-gym's own answer check, made a strict binary verifier.

reasoning-gym's default `score_answer` gives partial credit when the oracle answer is a substring of the reply
("42" for the answer "2" scores 0.5), which rewards wrong answers. We extract the final answer from the reply and
count 1.0 only when reasoning-gym scores it fully correct, unless `partial_credit` asks for its raw score.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_final_answer(completion: str) -> str:
    """The text inside the last <answer></answer>, else the last number in the reply, else the stripped reply."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    numbers = _NUMBER.findall(completion)
    if numbers:
        return numbers[-1].replace(",", "")
    return completion.strip()


class ReasoningGymReward:
    """Scores replies to a reasoning-gym dataset with that dataset's `score_answer`.

    Reads columns `answer` and `metadata` (JSON text of the reasoning-gym entry's metadata).
    """

    def __init__(self, dataset: str, partial_credit: bool = False) -> None:
        """
        Args:
            dataset: reasoning-gym dataset name, e.g. "basic_arithmetic".
            partial_credit: return reasoning-gym's raw score (may credit wrong answers) instead of 1.0 / 0.0.
        """
        self.dataset = dataset
        self.partial_credit = partial_credit

    @cached_property
    def _scorer(self):
        import reasoning_gym

        return reasoning_gym.get_score_answer_fn(self.dataset)

    @staticmethod
    def extract_answer(completion: str) -> str | None:
        """The final answer graded (for maj@k votes), whitespace removed; None for an empty reply."""
        return "".join(extract_final_answer(completion).split()) or None

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        answer: list[str],
        metadata: list[str],
        **_: list[Any],
    ) -> list[float]:
        scores = []
        for completion, oracle, meta in zip(completions, answer, metadata, strict=True):
            entry = {"answer": oracle, "metadata": json.loads(meta)}
            score = float(self._scorer(extract_final_answer(completion), entry))
            scores.append(score if self.partial_credit else float(score == 1.0))
        return scores
