"""Resident memory of the training process, and keeping glibc's allocator from holding on to freed memory.

A colocated run keeps the vLLM engine, the policy, its gradients and AdamW state in one process, and every step
allocates and frees tensors of new shapes (rollout batches, activations, per-layer buffers of vLLM's weight reload)
from several threads. glibc's malloc serves small and mid-sized blocks from per-thread arenas and, for blocks above
its mmap threshold (which it raises at run time, up to 32 MiB), from mmap; freed arena memory mostly stays mapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
from collections.abc import Iterator

_STATUS_KEYS = ("VmRSS", "VmHWM")


def resident_memory() -> tuple[int, int]:
    """(resident set, its peak since start or the last reset) of this process in bytes, from /proc/self/status."""
    with open("/proc/self/status") as status:
        text = status.read()
    rss, peak = (int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in _STATUS_KEYS)
    return rss, peak


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has mallopt and malloc_trim), else None (musl, macOS: nothing to tune); loaded
    once, since the RL step calls it several times."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


# mallopt's parameter numbers, from glibc's malloc.h, and glibc's default trim threshold.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_TRIM_THRESHOLD = 128 * 1024
# Blocks from this size up are mmapped and go back to the OS when freed: activations (a 16 x 94-token micro-batch
# of SmolLM2-135M has hidden states of 3.5 MB and MLP states of 9 MB), per-layer buffers of vLLM's weight reload.
MMAP_THRESHOLD_BYTES = 1 << 20
# How many keep_freed_blocks are active: the setting is the process's, so only the outermost one restores it.
_kept = 0


def return_large_blocks_to_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES (for the rest of the process); False where glibc is absent
    or while keep_freed_blocks is active (it is set again when the last one exits).

    glibc starts at 128 KiB but raises the threshold to the size of each mmapped block that is freed, up to 32 MiB;
    after the first training step nearly every activation then comes from the heap, and freed heap memory stays
    resident. Measured on the quickstart (2026-11-27, benchmarks/memory_probe.py): 2.1-3.6 GB held free in malloc's
    arenas from the first backward pass on, the whole gap between the parts and the peak. A fixed threshold also
    turns off the dynamic adjustment.
    """
    libc = _glibc()
    return libc is not None and not _kept and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc's malloc_trim); False where glibc is absent or
    while keep_freed_blocks is active (the rollout engine trims around each generation and weight sync; a CPU
    training run keeps those pages for its next micro-batches instead)."""
    libc = _glibc()
    return libc is not None and not _kept and bool(libc.malloc_trim(0))


# Within keep_freed_blocks: blocks up to this size come from the heap (a step's largest, the logits over a few hundred
# positions of a 150k vocabulary, are ~200 MB), and the heap is not trimmed below this much free memory.
KEEP_BLOCKS_UP_TO_BYTES = 256 << 20


@contextlib.contextmanager
def keep_freed_blocks() -> Iterator[None]:
    """Inside: memory freed stays in malloc's heap and serves the next allocations, and release_free_heap does
    nothing. When the outermost one exits, the free heap's pages go back to the OS and the thresholds to
    return_large_blocks_to_os's, whatever they were before (a later block is still carved from a free heap chunk
    where one fits). Nothing happens where glibc is absent.

    For a training run on CPU (CIPOModule keeps it from fit start to fit end): every micro-batch allocates and frees
    tensors of the sizes of the last one's (weight gradients, logits, activations), and every step those of the last
    step's rollout and weight sync. Mapped afresh, each page of them is faulted in and zeroed by the kernel again; on
    the 2-core CPU machine that was ~1 million page faults a quickstart step with a fixed 1 MiB threshold, and 0.3
    million with the heap kept through the update alone but trimmed around each generation and weight sync (measured
    in docs/benchmarks.md). The price is the heap's fragmentation at the run's peak.
    """
    global _kept
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BLOCKS_UP_TO_BYTES)
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1
        if not _kept:
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
            return_large_blocks_to_os()
            release_free_heap()
