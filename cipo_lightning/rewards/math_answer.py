"""Math final-answer verifier: extract the reply's final answer and check it against the gold with math-verify.

Why it is built this way:

- math-verify's own timeouts use `signal.alarm`, which works only in a process's main thread (off it, `parse` and
  `verify` raise ValueError; the trainer may score from another thread), and a signal handler runs only between
  bytecodes, never inside one long C call such as a big-integer power. Yet sympy will happily try to evaluate
  `9^{9^{9^{9}}}`. So the checks run with math-verify's timeouts off, in worker processes, and the caller enforces
  each item's wall-clock budget from outside: an item past `timeout_s` scores 0.0 and its worker is killed (SIGKILL
  lands even in C code) and replaced.
- The pool is our own (a few `multiprocessing.Process` workers with a pipe each) because neither
  `concurrent.futures` nor `multiprocessing.Pool` can kill one stuck task. A worker takes ~0.7 s to start (the
  sympy/math-verify import), the time of dozens of checks, so the pool is created on the first call and reused
  across calls; the object itself holds only plain settings, so jsonargparse can build it and it pickles.
- Workers are spawned, not forked: the trainer process holds CUDA state and threads, which a fork copies unsafely.
- A worker runs one item at a time, so an item's deadline starts when it is sent. A replacement worker gets work
  only once it reports ready, so its imports never eat an item's budget.
- Extraction is pure Python in the caller: it is cheap and testable, and a reply without an answer costs no round
  trip. Identical (gold, answer) pairs in a batch are checked once: samples of one prompt often agree.
- The extracted answer and the gold are both given to math-verify's `parse` as "\\boxed{...}": boxed content has the
  top match priority, so the whole answer is read as one expression. Bare, math-verify reads "2x+1" as "2" and finds
  no answer in "\\sqrt{2}/2"; as "$...$", prose-free answers parse the same as boxed ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_MARKER = re.compile(r"answer(?:\*\*)?\s*:|final answer is", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
# A minus sign only when it cannot be subtraction ("3-5" is 3 and 5; "x = -5" is -5).
_NUMBER = re.compile(r"(?<![\w)])-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")

_READY = "ready"
_STARTUP_TIMEOUT_S = 120.0
_SHUTDOWN_GRACE_S = 1.0


def _braced(text: str, open_brace: int) -> str | None:
    """The text inside the brace group that opens at `open_brace`, or None when the group never closes."""
    depth = 0
    i = open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            # An escaped character (\{ and \} are set braces) is never grouping.
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
        i += 1
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def _math_content(span: re.Match[str]) -> str:
    return next(group for group in span.groups() if group is not None).strip()


def _answer_segment(text: str) -> str | None:
    """The answer at the start of `text` (what follows an answer marker or "####"); None when it has unbalanced braces.

    A math span that opens the text is the answer; else the first sentence of its first line, reduced to its first
    math span if it has one.
    """
    text = text.lstrip(" \t\n*:")
    span = _MATH_SPAN.match(text)
    if span:
        answer = _math_content(span)
    else:
        sentence = _SENTENCE_END.split(text.split("\n", 1)[0], maxsplit=1)[0]
        span = _MATH_SPAN.search(sentence)
        answer = _math_content(span) if span else sentence.strip(" \t*,;:")
    # Balanced iff the group opened by a brace put in front closes exactly at the end. math-verify would repair an
    # unclosed "\frac{1}{2", but a malformed answer is a wrong one.
    return answer if _braced("{" + answer + "}", 0) == answer else None


def _drop_prose(answer: str) -> str:
    """`answer` without its plain words when it has a word of 3+ letters: "The total is 18 apples." -> "18".

    math-verify drops known units and \\text{...}, but reads other words as products of variables (18*a*p*l*e*s).
    Words of one letter stay (variables, choices), as does an answer that would be left empty ("xyz").
    """
    tokens = answer.split()
    bare = [token.strip(".,;:!?") for token in tokens]
    is_word = [word.isalpha() and len(word) >= 2 for word in bare]
    if all(is_word) or not any(word.isalpha() and len(word) >= 3 for word in bare):
        return answer
    return " ".join(token for token, word in zip(tokens, is_word, strict=True) if not word).strip(" .,;:")


def extract_math_answer(text: str) -> str | None:
    """The reply's final answer, or None when it gives none.

    In order: the content of the last \\boxed{...} (nested braces handled; an unclosed last \\boxed gives None, not a
    fallback, as the reply was cut off mid-answer), else the answer after the last "Answer:" or "final answer is"
    (case-insensitive), else after the last "####", else the last number in the text (thousands commas removed).
    After a marker, the answer is the leading math span ($...$, $$...$$, \\(...\\), \\[...\\]), else the first
    sentence; unbalanced braces there give None. Prose words are dropped from a boxed or marked answer.
    """
    if boxed := _last_match(_BOXED, text):
        answer = _braced(text, boxed.end() - 1)
    elif marker := _last_match(_ANSWER_MARKER, text):
        answer = _answer_segment(text[marker.end() :])
    elif "####" in text:
        answer = _answer_segment(text.rsplit("####", 1)[1])
    else:
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    return (_drop_prose(answer.strip()) or None) if answer else None


def _gold_answer(gold: str) -> str | None:
    """The gold as an answer: the last \\boxed{...} content, else what follows "####" (a GSM8K solution), unwrapped
    from "$...$" (or \\(...\\), \\[...\\]) when it is one math span."""
    boxed = _last_match(_BOXED, gold)
    if boxed:
        return _braced(gold, boxed.end() - 1)
    gold = gold.rsplit("####", 1)[-1].strip()
    span = _MATH_SPAN.fullmatch(gold)
    return (_math_content(span) if span else gold) or None


@lru_cache(maxsize=4096)
def _parse(answer: str) -> list[Any]:
    from math_verify import parse

    # The caller's clock bounds the time; math-verify's signal-based timeout is off (it also fails off-main-thread).
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def _check(gold: str, answer: str) -> float:
    from math_verify import verify

    gold_parsed, answer_parsed = _parse(gold), _parse(answer)
    if not gold_parsed or not answer_parsed:
        return 0.0
    return float(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _serve(conn: Connection) -> None:
    """A worker: check (gold, answer) pairs from `conn` until the caller closes it. Runs in a spawned process."""
    # Ctrl-C reaches the whole process group; the caller decides what stops, and closes the pipe to stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # math-verify's only warnings say its timeouts are off, which is the point: ours is outside.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Warm up (imports, the LaTeX grammar) before reporting ready, so an item's budget is spent on the item.
    _parse("1")
    try:
        conn.send(_READY)
        while True:
            gold, answer = conn.recv()
            try:
                result: float | str = _check(gold, answer)
            except Exception as error:  # reported to the caller, which scores it 0.0
                result = f"{type(error).__name__}: {error}"
            conn.send(result)
    except (EOFError, BrokenPipeError):
        return  # the caller closed the pipe: time to exit


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    """Close the pipes (idle workers exit on EOF), then kill whatever has not exited after a grace period."""
    # A forked child inherits the pool object; the workers belong to the parent, which shuts them down itself.
    if os.getpid() != owner_pid:
        return
    for worker in workers:
        worker.conn.close()
    deadline = time.monotonic() + _SHUTDOWN_GRACE_S
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()


class _WorkerPool:
    """`size` spawned checker processes; runs a list of jobs with a wall-clock budget per job."""

    def __init__(self, size: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self.owner_pid = os.getpid()
        self._workers = [self._start() for _ in range(size)]
        # Runs when the pool is garbage-collected or at interpreter exit, whichever comes first.
        self.close = weakref.finalize(self, _shutdown, self._workers, self.owner_pid)

    def _start(self) -> _Worker:
        conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child_conn,), name="math-answer-check", daemon=True)
        process.start()
        child_conn.close()
        return _Worker(process, conn)

    def _replace(self, slot: int) -> None:
        worker = self._workers[slot]
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[slot] = self._start()

    def run(self, jobs: list[tuple[str, str]], timeout_s: float) -> list[float | str | None]:
        """One result per job: the score, an error message, or None when the job ran past `timeout_s`."""
        results: list[float | str | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        running: dict[int, tuple[int, float]] = {}  # worker slot -> (job index, deadline)
        while queue or running:
            for slot, worker in enumerate(self._workers):
                if queue and worker.ready and slot not in running:
                    index = queue.popleft()
                    try:
                        worker.conn.send(jobs[index])
                    except OSError:  # the worker died while idle (e.g. the OOM killer): retry on its replacement
                        queue.appendleft(index)
                        self._replace(slot)
                        continue
                    running[slot] = (index, time.monotonic() + timeout_s)
            listening = {w.conn: slot for slot, w in enumerate(self._workers) if slot in running or not w.ready}
            next_deadline = min((deadline for _, deadline in running.values()), default=None)
            wait_s = _STARTUP_TIMEOUT_S if next_deadline is None else max(0.0, next_deadline - time.monotonic())
            ready = wait(list(listening), timeout=wait_s)
            if not ready and not running:
                raise RuntimeError(f"math-verify workers did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            for conn in ready:
                slot = listening[conn]
                try:
                    message = conn.recv()
                except EOFError:
                    if slot not in running:
                        raise RuntimeError(
                            "a math-verify worker exited while starting; see its traceback above"
                        ) from None
                    index, _ = running.pop(slot)
                    results[index] = "the worker process died"
                    self._replace(slot)
                    continue
                if slot in running:
                    index, _ = running.pop(slot)
                    results[index] = message
                else:
                    self._workers[slot].ready = message == _READY
            now = time.monotonic()
            for slot, (_, deadline) in list(running.items()):
                if deadline <= now:
                    del running[slot]
                    self._replace(slot)
        return results


class MathAnswerReward:
    """1.0 when the reply's final answer is mathematically equal to the gold (checked by math-verify), else 0.0.

    Reads column `answer`: the gold as a string, e.g. "\\frac{1}{2}", "0.5", "$x+1$", "\\boxed{3}" or a GSM8K
    solution ending in "#### 1,234". The reply's answer is found by `extract_math_answer`. Equality is math-verify's:
    "1/2" = "0.5" = "\\frac{1}{2}", "2x+1" = "1+2x", "{1,2}" = "\\{2,1\\}", "x=5" = "5", floats compared to 6 decimal
    places; "50\\%" equals both "50" and "0.5" (a gold "50" for a percentage question is answered "50\\%"). Text
    answers ("yes", "no solution") are out of scope.

    Checks run in a lazily started pool of worker processes, each item under a wall-clock budget: one that runs past
    `timeout_s` scores 0.0 and its worker is killed and replaced. The pool is reused across calls; `close()` stops
    it (it is also stopped when the object is garbage-collected, and at interpreter exit). The workers are spawned,
    so a script that calls this needs the `if __name__ == "__main__":` guard.
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int | None = None) -> None:
        """
        Args:
            timeout_s: wall-clock seconds one answer check may take; past it the answer scores 0.0.
            num_workers: checker processes (default: min(4, CPU count)).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self._pool: _WorkerPool | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Processes, pipes and locks do not pickle; a copy starts its own pool on its first call.
        state = self.__dict__.copy()
        state["_pool"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the worker processes now (the next call starts new ones)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    @staticmethod
    def extract_answer(completion: str) -> str | None:
        """The final answer graded (for maj@k votes), whitespace removed: "x + 1" and "x+1" vote together."""
        answer = extract_math_answer(completion)
        return "".join(answer.split()) if answer else None

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **_: list[Any]) -> list[float]:
        golds = [_gold_answer(gold) for gold in answer]
        replies = [extract_math_answer(completion) for completion in completions]
        rows_of_job: dict[tuple[str, str], list[int]] = {}
        for row, (gold, reply) in enumerate(zip(golds, replies, strict=True)):
            if gold and reply:
                rows_of_job.setdefault((gold, reply), []).append(row)
        scores = [0.0] * len(completions)
        if not rows_of_job:
            return scores
        jobs = list(rows_of_job)
        # One batch at a time: the pool's workers each hold one item, and callers may come from several threads.
        with self._lock:
            if self._pool is None or self._pool.owner_pid != os.getpid():
                self._pool = _WorkerPool(self.num_workers or min(4, os.cpu_count() or 1))
            try:
                results = self._pool.run(jobs, self.timeout_s)
            except BaseException:
                # A batch cut short (Ctrl-C, a worker that failed to start) may leave answers in flight that the next
                # batch would read as its own: start afresh next time.
                self._pool.close()
                self._pool = None
                raise
        timed_out = 0
        for job, result in zip(jobs, results, strict=True):
            if result is None:
                timed_out += 1
            elif isinstance(result, str):
                logger.warning("math answer check failed, scoring 0.0: %s (gold %r, answer %r)", result, *job)
            else:
                for row in rows_of_job[job]:
                    scores[row] = result
        if timed_out:
            logger.warning("%d math answer check(s) ran past %.1f s and scored 0.0", timed_out, self.timeout_s)
        return scores
