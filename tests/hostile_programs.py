"""Hostile programs for the sandbox tests, as data.

Each is run against the test `check(f)`, which passes only when `f()` returns 1. Where a program probes the sandbox,
its `f` returns 1 only if the sandbox leaked (a secret seen, a file written outside, a network peer reached), so a
pass is itself a failure of the sandbox. Placeholders: __MARKER__ (a unique string the test scans processes for),
__ESCAPE_PATHS__ (files outside the sandbox's own directory that must not appear), __PORT__ (a loopback port the test
listens on), __SECRET__ (the name of an environment variable set in the test process).
"""

TEST = "def check(candidate):\n    assert candidate() == 1\n"

HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(3600)\n",
    "sigterm_ignored": (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(0.01)\n"
    ),
    "sigxcpu_ignored_busy": (
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\ndef f():\n    return 1\n"
    ),
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "thread_bomb": (
        "import threading, time\n"
        "while True:\n"
        "    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    ),
    "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
    "deep_recursion": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef down(n):\n    return down(n + 1) + 1\ndown(0)\n"
        "def f():\n    return 1\n"
    ),
    "huge_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "huge_stderr": "import os\nwhile True:\n    os.write(2, b'y' * 65536)\n",
    "disk_filling": (
        "import itertools, os\n"
        "for directory in ('.', '/tmp', '/dev/shm', os.path.expanduser('~')):\n"
        "    try:\n"
        "        for i in itertools.count():\n"
        "            with open(os.path.join(directory, f'fill{i}'), 'wb') as out:\n"
        "                out.write(b'0' * (1 << 20))\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "write_outside": (
        "import os\n"
        "escaped = 0\n"
        "for path in __ESCAPE_PATHS__:\n"
        "    try:\n"
        "        with open(path, 'w') as out:\n"
        "            out.write('escaped')\n"
        "        escaped += not path.startswith('/tmp/')  # the sandbox's own /tmp is private: not an escape\n"
        "    except OSError:\n"
        "        pass\n"
        "def f():\n    return 1 if escaped else 0\n"
    ),
    "network": (
        "import socket\n"
        "def f():\n"
        "    if any(name != 'lo' for _, name in socket.if_nameindex()):\n"
        "        return 1\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', __PORT__), timeout=1).sendall(b'escaped')\n"
        "        return 1\n"
        "    except OSError:\n"
        "        return 0\n"
    ),
    "kill_parent": (
        "import os, signal\n"
        "for kill, target in ((os.kill, os.getppid()), (os.killpg, os.getpgid(os.getppid()))):\n"
        "    try:\n"
        "        kill(target, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "def f():\n    return 0\n"
    ),
    "killpg_own_group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill_everything": (
        "import os, signal\n"
        "for sig in (signal.SIGTERM, signal.SIGKILL):\n"
        "    for target in (-1, 1):\n"
        "        try:\n"
        "            os.kill(target, sig)\n"
        "        except OSError:\n"
        "            pass\n"
        "def f():\n    return 0\n"
    ),
    "setsid_daemon": (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(3600)', '__MARKER__'])\n"
        "    os._exit(0)\n"
        "def f():\n    return 1 if False else 0\n"
    ),
    "sys_exit_zero": "import sys\nsys.exit(0)\n",
    "os_exit_zero": "import os\nos._exit(0)\n",
    "raise_system_exit": "raise SystemExit(0)\n",
    "exit_inside_candidate": "import os\ndef f():\n    os._exit(0)\n",
    "system_exit_inside_candidate": "def f():\n    raise SystemExit(0)\n",
    "fake_success_output": (
        "print('passed')\nprint('OK')\nprint('All tests passed')\nprint('0123456789abcdef0123456789abcdef 1 1')\n"
        "import sys\nsys.stdout.flush()\nimport os\nos._exit(0)\n"
    ),
    "forged_report": (
        "import os\n"
        "for fd in range(3, 1024):\n"
        "    try:\n"
        "        os.write(fd, b'0123456789abcdef0123456789abcdef 1 1\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    "patched_exit_and_builtins": (
        "import builtins, os, sys\n"
        "builtins.exit = builtins.quit = sys.exit = lambda *args: None\n"
        "os._exit = os.write = lambda *args: None\n"
        "def f():\n    return 0\n"
    ),
    "environment_secret": (
        "import os\n"
        "def f():\n"
        "    if '__SECRET__' in os.environ:\n"
        "        return 1\n"
        "    for pid in os.listdir('/proc'):\n"
        "        try:\n"
        "            if b'__SECRET__' in open(f'/proc/{pid}/environ', 'rb').read():\n"
        "                return 1\n"
        "        except OSError:\n"
        "            pass\n"
        "    return 0\n"
    ),
}
