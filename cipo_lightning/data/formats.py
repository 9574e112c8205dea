"""Benchmark record formats -> task rows: the prompt (chat messages) and the columns the verifiers read.

Each public math or code dataset names its fields its own way (MATH500 `problem`/`answer`, AIME `Problem`/`Answer`,
GSM8K `question`/`answer` with "#### 42", HumanEval `prompt`/`test`/`entry_point`, MBPP `text`/`test_list`,
LiveCodeBench `question_content` with JSON-encoded functional tests, DebugBench `question`/`buggy_code`). A format
turns one record into our row, so a hub dataset, a local file in that format and a bundled copy all load the same:
math rows carry `answer` (MathAnswerReward), code rows carry `test` and `entry_point` (CodeTestsReward; `test` is
HumanEval check code, or a list of assert statements with entry_point None). DebugBench rows also carry `attempt`,
the given buggy solution (a fix-given-solution set). Unknown fields ride along for verifiers that want them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

Record = dict[str, Any]
Format = Literal["math500", "aime", "gsm8k", "humaneval", "mbpp", "livecodebench", "debugbench"]

MATH_INSTRUCTION = "\n\nSolve the problem step by step, then give the final answer in \\boxed{}."
CODE_INSTRUCTION = "\n\nReply with the complete Python solution (with its imports) in one ```python code block."
# LeetCode-style starter code annotates with typing names without importing them.
TYPING_PREAMBLE = "from typing import *\n\n"


def _math(problem: str, answer: Any) -> Record:
    return {"problem": problem + MATH_INSTRUCTION, "answer": str(answer)}


def _code(problem: str, test: str | list[str], entry_point: str | None) -> Record:
    return {"problem": problem + CODE_INSTRUCTION, "test": test, "entry_point": entry_point}


def gsm8k_answer(solution: str) -> str:
    """The number after GSM8K's final "####", without thousands separators."""
    if "####" not in solution:
        raise ValueError("no '####' final answer")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k(record: Record) -> Record:
    answer = record["answer"] if "####" not in str(record["answer"]) else gsm8k_answer(record["answer"])
    return _math(record["question"], answer)


def _humaneval(record: Record) -> Record:
    problem = "Complete the following Python function.\n\n```python\n" + record["prompt"] + "```"
    return _code(problem, record["test"], record["entry_point"])


def _mbpp(record: Record) -> Record:
    tests = list(record["test_list"])
    setup = record.get("test_setup_code") or ""
    problem = f"{record['text']}\nYour code should pass this test:\n{tests[0]}"
    return _code(problem, [setup, *tests] if setup else tests, None)


def _functional_asserts(cases_json: str, func_name: str) -> list[str]:
    """LiveCodeBench functional cases (one JSON argument per input line, JSON output) as assert statements."""
    asserts = []
    for case in json.loads(cases_json or "[]"):
        if case.get("testtype") != "functional":
            raise ValueError(f"only functional test cases are supported, got {case.get('testtype')!r}")
        args = ", ".join(repr(json.loads(line)) for line in case["input"].split("\n") if line.strip())
        asserts.append(f"assert Solution().{func_name}({args}) == {json.loads(case['output'])!r}")
    return asserts


def _livecodebench(record: Record) -> Record:
    func_name = json.loads(record["metadata"])["func_name"]
    tests = _functional_asserts(record["public_test_cases"], func_name)
    tests += _functional_asserts(record.get("private_test_cases") or "[]", func_name)
    problem = (
        f"{record['question_content']}\n\nStarter code:\n```python\n{TYPING_PREAMBLE}{record['starter_code']}\n```"
    )
    return _code(problem, tests, None)


def _debugbench(record: Record) -> Record:
    # A fix-given-solution set: the problem plus the given wrong solution as `attempt`, which evaluation shows back
    # with the correction template (the prompt CIPO trains corrections on).
    if "test" not in record:
        raise ValueError("DebugBench records carry no tests; add a `test` column (assert statements)")
    attempt = f"```python\n{TYPING_PREAMBLE}{record['buggy_code']}\n```"
    return _code(record["question"], record["test"], None) | {"attempt": attempt}


CONVERTERS: dict[str, Callable[[Record], Record]] = {
    "math500": lambda r: _math(r["problem"], r["answer"]),
    "aime": lambda r: _math(r["Problem"], r["Answer"]),
    "gsm8k": _gsm8k,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "livecodebench": _livecodebench,
    "debugbench": _debugbench,
}


def convert(record: Record, format: str) -> Record:
    """The row fields of `record` in `format` (the problem text under "problem"); KeyError names a missing field."""
    return CONVERTERS[format](record)
