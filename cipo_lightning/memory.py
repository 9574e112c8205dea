"""Resident memory of the training process.

A colocated run keeps the vLLM engine, the policy, its gradients and AdamW state in one process, and every step
allocates and frees tensors of new shapes (rollout batches, activations, per-layer buffers of vLLM's weight reload)
from several threads. glibc's malloc serves small and mid-sized blocks from per-thread arenas and, for blocks above
its mmap threshold (which it raises at run time, up to 32 MiB), from mmap; freed arena memory mostly stays mapped.
"""

from __future__ import annotations

import re

_STATUS_KEYS = ("VmRSS", "VmHWM")


def resident_memory() -> tuple[int, int]:
    """(resident set, its peak since start or the last reset) of this process in bytes, from /proc/self/status."""
    with open("/proc/self/status") as status:
        text = status.read()
    rss, peak = (int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in _STATUS_KEYS)
    return rss, peak

