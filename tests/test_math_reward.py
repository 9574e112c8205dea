"""The math final-answer verifier: extraction, math-verify equivalence, the per-item timeout, threads, pickling."""

import pickle
import threading
import time

import pytest
from jsonargparse import ArgumentParser

from cipo_lightning.rewards.base import RewardFunction
from cipo_lightning.rewards.math_answer import MathAnswerReward, extract_math_answer


@pytest.fixture(scope="module")
def reward():
    reward = MathAnswerReward(timeout_s=5.0, num_workers=2)
    yield reward
    reward.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{3} first, then \\boxed{4}", "4"),
        ("\\boxed{5} and Answer: 6", "5"),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed{5} then \\boxed{", None),
        ("\\boxed{ }", None),
        ("\\boxed{18 dollars}", "18"),
        ("\\boxed{xyz}", "xyz"),
        ("\\boxed{xy + 1}", "xy + 1"),
        ("\\boxed{18 \\text{ dollars}}", "18 \\text{ dollars}"),
        ("Answer: 42.", "42"),
        ("answer:  -3\nbecause ...", "-3"),
        ("**Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Answer:\n$$\n\\frac{1}{2}\n$$", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $42$. I hope it is correct.", "42"),
        ("The final answer is 2.5.", "2.5"),
        ("Answer: The total is 18 apples", "18"),
        ("Answer: \\frac{1}{2} cup", "\\frac{1}{2}"),
        ("Answer: 1 then Answer: 2", "2"),
        ("Answer: \\frac{1}{2", None),
        ("48 / 2 = 24\n#### 1,234", "1,234"),
        ("I get 7 and then 2.5.", "2.5"),
        ("The total is $1,234.", "1234"),
        ("x = -5", "-5"),
        ("3-5", "5"),
        ("", None),
        ("no digits here", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


# (completion, gold, expected reward)
CASES = [
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("So it is \\boxed{\\dfrac{1}{2}}.", "1/2", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),
    ("\\boxed{3.50}", "3.5", 1.0),
    ("\\boxed{18.0}", "18", 1.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),  # floats are compared to 6 decimal places
    # LaTeX
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),  # equal only to 5 places
    ("\\boxed{10^{3}}", "1000", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    # expressions and equations
    ("\\boxed{2x+1}", "1+2x", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{xy}", "yx", 1.0),
    ("\\boxed{2x+2}", "1+2x", 0.0),
    ("\\boxed{x=5}", "5", 1.0),
    # sets, tuples, intervals
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{{1,2}}", "\\{2,1\\}", 1.0),
    ("\\boxed{\\{1,2,3\\}}", "\\{1,2\\}", 0.0),
    ("\\boxed{(1,2)}", "(2,1)", 0.0),
    ("\\boxed{[0,1)}", "[0,1)", 1.0),
    ("\\boxed{[0,1]}", "[0,1)", 0.0),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", 1.0),
    # percentages: math-verify counts 50\% equal to both 50 and 0.5
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{50}", "50\\%", 1.0),
    ("\\boxed{40\\%}", "50", 0.0),
    # negative numbers
    ("\\boxed{-7}", "-7", 1.0),
    ("So x = -7.", "-7", 1.0),
    ("3-5 = -2", "-2", 1.0),
    ("\\boxed{7}", "-7", 0.0),
    # GSM8K
    ("She pays 1234 dollars.\n#### 1234", "#### 1,234", 1.0),
    ("The total is $1,234.", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1234", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("#### 1,235", "#### 1,234", 0.0),
    # units and text around the answer
    ("Answer: 18 apples", "18", 1.0),
    ("**Answer:** 12 dollars", "12", 1.0),
    ("\\boxed{18 \\text{ cm}}", "18", 1.0),
    ("\\boxed{12 cookies}", "12", 1.0),
    ("She has 5 apples, gives 2 away and keeps 3 apples.", "3", 1.0),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", 1.0),
    # gold wrappers
    ("\\boxed{4}", "$4$", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\boxed{\\frac12}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\(\\frac{1}{2}\\)", 1.0),
    # several answers: the last boxed wins, and boxed beats "Answer:"
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),
    ("First \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("\\boxed{5}. Answer: 6", "5", 1.0),
    # wrong, malformed or missing answers
    ("Answer: 41", "42", 0.0),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),
    ("\\boxed{5} then \\boxed{", "5", 0.0),
    ("Answer: \\frac{1}{2", "\\frac{1}{2}", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("", "5", 0.0),
    ("I am not sure how to solve this.", "5", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), CASES)
def test_math_answer_reward_table(reward, completion, gold, expected):
    assert reward(["q"], [completion], answer=[gold]) == [expected]


def test_whole_table_as_one_batch_with_unknown_columns(reward):
    completions, golds, expected = map(list, zip(*CASES, strict=True))
    scores = reward(["q"] * len(CASES), completions, answer=golds, metadata=["{}"] * len(CASES))
    assert scores == expected


def test_pathological_answer_times_out_and_the_worker_is_replaced():
    reward = MathAnswerReward(timeout_s=1.0, num_workers=1)
    try:
        assert reward(["q"], ["\\boxed{1}"], answer=["1"]) == [1.0]  # starts the pool
        stuck_pid = reward._pool._workers[0].process.pid
        start = time.monotonic()
        assert reward(["q"], ["\\boxed{9^{9^{9^{9^{9}}}}}"], answer=["1"]) == [0.0]
        assert time.monotonic() - start < 1.0 + 1.0
        assert reward._pool._workers[0].process.pid != stuck_pid
        # The same batch goes on past a stuck item; the next item waits only for the replacement worker.
        assert reward(["q"] * 2, ["\\boxed{(10^{10})!}", "\\boxed{0.5}"], answer=["1", "\\frac{1}{2}"]) == [0.0, 1.0]
    finally:
        reward.close()


def test_called_from_other_threads():
    # A fresh reward, so that the pool itself is started off the main thread.
    reward = MathAnswerReward(timeout_s=5.0, num_workers=2)
    results: dict[int, list[float]] = {}

    def score(key: int) -> None:
        results[key] = reward(["q"] * 2, ["\\boxed{2x+1}", "\\boxed{3}"], answer=["1+2x", f"{key}"])

    try:
        threads = [threading.Thread(target=score, args=(key,)) for key in (3, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        reward.close()
    assert results == {3: [1.0, 1.0], 4: [1.0, 0.0]}


def test_pickles_and_builds_from_config(reward):
    reward(["q"], ["\\boxed{1}"], answer=["1"])  # a running pool must not stop it pickling
    copy = pickle.loads(pickle.dumps(reward))
    try:
        assert copy(["q"], ["\\boxed{1}"], answer=["1"]) == [1.0]
    finally:
        copy.close()
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardFunction)
    config = parser.parse_args(
        [
            "--reward",
            '{"class_path": "cipo_lightning.rewards.math_answer.MathAnswerReward", "init_args": {"timeout_s": 2}}',
        ]
    )
    built = parser.instantiate_classes(config).reward
    assert isinstance(built, MathAnswerReward)
    assert built.timeout_s == 2.0
    assert built._pool is None  # nothing starts before the first call
