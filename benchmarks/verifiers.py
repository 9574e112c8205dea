"""Verified completions per second of the math and code verifiers on this machine.

Math: the bundled GSM8K sample's 100 gold answers as replies in four styles (boxed, "Answer:" with a LaTeX
fraction, "####" with a decimal, the last number), half of them wrong, 400 replies in one call after a warm-up call
that starts the worker pool. Integer golds are among the cheapest checks (the math tests' LaTeX answers cost up to
~50 ms each), so this is an upper end. Code: every
HumanEval canonical solution and a broken copy of each (328 sandboxed programs with their tests) in one call.
Each side is checked against its expected scores before its rate is printed.

    python benchmarks/verifiers.py
"""

from __future__ import annotations

import os
import platform
import time

from cipo_lightning.data.formats import gsm8k_answer
from cipo_lightning.data.tasks import bundled_records
from cipo_lightning.rewards import CodeTestsReward, MathAnswerReward


def math_replies() -> tuple[list[str], list[str], list[float]]:
    golds = [int(float(gsm8k_answer(record["answer"]))) for record in bundled_records("gsm8k")]
    # Plain and LaTeX forms (a fraction, a decimal), so the check does sympy work, not only string matching.
    styles = [
        lambda v: f"So the result is \\boxed{{{v}}}.",
        lambda v: f"Answer: $\\frac{{{2 * v}}}{{2}}$",
        lambda v: f"#### {v}.0",
        lambda v: f"She ends up with {v} in total.",
    ]
    replies, answers, expected = [], [], []
    for i, gold in enumerate(golds):
        for j, style in enumerate(styles):
            wrong = (i + j) % 2 == 1
            replies.append(style(gold + 7 if wrong else gold))
            answers.append(str(gold))
            expected.append(0.0 if wrong else 1.0)
    return replies, answers, expected


def code_replies() -> tuple[list[str], list[str], list[str], list[float]]:
    replies, tests, entry_points, expected = [], [], [], []
    for record in bundled_records("humaneval"):
        header = record["prompt"]
        for body, score in ((record["canonical_solution"], 1.0), ("    raise NotImplementedError\n", 0.0)):
            replies.append(f"```python\n{header}{body}```")
            tests.append(record["test"])
            entry_points.append(record["entry_point"])
            expected.append(score)
    return replies, tests, entry_points, expected


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    replies, answers, expected = math_replies()
    reward = MathAnswerReward()
    reward(["warm-up"], ["\\boxed{1}"], answer=["1"])
    start = time.perf_counter()
    scores = reward([""] * len(replies), replies, answer=answers)
    elapsed = time.perf_counter() - start
    assert scores == expected, "math scores differ from the expected ones"
    print(f"math: {len(replies)} replies in {elapsed:.2f} s = {len(replies) / elapsed:.0f} verified completions/s")
    reward.close()

    replies, tests, entry_points, expected = code_replies()
    reward = CodeTestsReward()
    start = time.perf_counter()
    scores = reward([""] * len(replies), replies, test=tests, entry_point=entry_points)
    elapsed = time.perf_counter() - start
    assert scores == expected, "code scores differ from the expected ones"
    print(f"code: {len(replies)} programs in {elapsed:.2f} s = {len(replies) / elapsed:.1f} verified completions/s")


if __name__ == "__main__":
    main()
