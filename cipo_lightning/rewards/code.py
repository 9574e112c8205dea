"""Code verifier: runs the program of each reply against its row's tests in a sandbox (see `sandbox`).

Two test formats, both as the `test` column (with `entry_point`):
- HumanEval: `test` defines `check(candidate)` and the program passes when `check(<entry_point>)` returns;
- assert statements (MBPP, LiveCodeBench): `test` is a list of assert strings, or one string of assert lines, and
  `entry_point` is None, empty or absent. Each assert is one test; entries without an assert (MBPP's setup code)
  run in their place as setup, which must not fail.

The program is the last fenced code block of the reply, else the whole reply. Programs and tests of a batch run in
parallel, each in its own sandbox; a reply scores 1.0 only when every test ran to the end and passed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

from cipo_lightning.rewards.sandbox import Sandbox, Step

# An opening fence with an optional info string ("```python", "```py", "```"), then the block up to the closing fence
# or, for a reply cut off by a "```" stop sequence or the token limit, up to the end.
_FENCED = re.compile(r"^```[^\n`]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)


def extract_program(text: str) -> str:
    """The last fenced code block of `text`, else `text` itself."""
    blocks = _FENCED.findall(text)
    return blocks[-1] if blocks else text


def build_steps(test: str | Sequence[str], entry_point: str | None) -> list[Step]:
    """The sandbox steps of one row's tests (formats in the module doc)."""
    if entry_point:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python name, got {entry_point!r}")
        return [Step(f"{test}\ncheck({entry_point})\n")]
    if isinstance(test, str):
        try:
            test = [ast.unparse(node) for node in ast.parse(test).body]
        except SyntaxError:
            # Broken test code cannot be split; as one scored step it fails in the sandbox like any broken test.
            test = [test]
    return [Step(code, scored=_has_assert(code)) for code in test]


def _has_assert(code: str) -> bool:
    try:
        return any(isinstance(node, ast.Assert) for node in ast.parse(code).body)
    except SyntaxError:
        return True


class CodeTestsReward:
    """1.0 when the reply's program passes all of its row's tests in the sandbox, else 0.0.

    Reads columns `test` and `entry_point` (optional). Sandbox limits apply per program.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        cpu_time_s: int = 10,
        memory_mb: int = 1024,
        max_processes: int = 32,
        max_output_bytes: int = 1_000_000,
        max_file_mb: int = 16,
        max_workers: int | None = None,
        use_bwrap: bool | None = None,
        partial_credit: bool = False,
        prepend_prompt: bool = False,
    ) -> None:
        """
        Args:
            timeout_s: wall-clock limit per program (with its tests); then its whole process tree is killed.
            cpu_time_s: CPU-time limit per process (RLIMIT_CPU).
            memory_mb: address-space limit per process (RLIMIT_AS), in MiB.
            max_processes: process and thread limit (RLIMIT_NPROC), per program under bubblewrap, per user without.
            max_output_bytes: stdout plus stderr beyond this kills the program and fails it.
            max_file_mb: largest file a program may write (RLIMIT_FSIZE), in MiB; under bubblewrap also the size of
                its writable /tmp (its working directory) and of its /dev/shm.
            max_workers: programs run at the same time (default: the number of CPUs).
            use_bwrap: isolate with bubblewrap (read-only filesystem, no network, own PID namespace). None: when it
                works here, else fall back to limits only, with a warning; True: fail when it does not work; False:
                limits only (for trusted code).
            partial_credit: score the fraction of passed asserts instead of 1.0 / 0.0 (assert-list tests; a
                HumanEval `check` is one test).
            prepend_prompt: put the prompt's program (its last code block, else its text) before the reply's,
                for replies that only continue the prompt's code (e.g. a HumanEval function body). A reply with the
                full function still works: its definition replaces the prompt's.
        """
        self.sandbox = Sandbox(
            timeout_s=timeout_s,
            cpu_time_s=cpu_time_s,
            memory_mb=memory_mb,
            max_processes=max_processes,
            max_output_bytes=max_output_bytes,
            max_file_mb=max_file_mb,
            max_workers=max_workers,
            use_bwrap=use_bwrap,
        )
        self.partial_credit = partial_credit
        self.prepend_prompt = prepend_prompt

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        test: list[str | list[str]],
        entry_point: list[str | None] | None = None,
        **_: list[Any],
    ) -> list[float]:
        entry_points = entry_point or [None] * len(completions)
        jobs = []
        for prompt, completion, tests, entry in zip(prompts, completions, test, entry_points, strict=True):
            program = extract_program(completion)
            if self.prepend_prompt:
                program = f"{extract_program(prompt)}\n{program}"
            jobs.append((program, build_steps(tests, entry)))
        results = self.sandbox.run_many(jobs)
        if self.partial_credit:
            return [r.passed / r.total if r.completed and r.total else 0.0 for r in results]
        return [float(r.all_passed) for r in results]
