"""cipo_lightning.memory: resident memory readings, and the glibc settings that return freed memory to the OS.

The allocator checks run in fresh interpreters: mallopt changes the whole process, and a clean heap makes the
numbers predictable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cipo_lightning.memory import _glibc, resident_memory

MB = 2**20
needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

# Fills the heap with 200 MB of 100 KB blocks (below glibc's initial 128 KiB mmap threshold), keeps one block
# allocated after them so the free memory is not at the heap's top (which free() trims by itself), frees the rest,
# then prints RSS in MB: after freeing, and after `then` ran.
_FREED_HEAP = """
import sys
from cipo_lightning.memory import release_free_heap, resident_memory, return_large_blocks_to_os
{setup}
blocks = [bytearray({block}) for _ in range(200 * 2**20 // {block})]
pin = bytearray({block})
del blocks
freed = resident_memory()[0] >> 20
{then}
print(freed, resident_memory()[0] >> 20)
"""


def _freed_and_after(block: int, setup: str = "", then: str = "") -> tuple[int, int]:
    code = _FREED_HEAP.format(block=block, setup=setup, then=then)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    freed, after = result.stdout.split()
    return int(freed), int(after)


def test_resident_memory_sees_an_allocation() -> None:
    rss_before, _ = resident_memory()
    block = torch.ones(200 * MB // 4)  # written, so resident
    rss, peak = resident_memory()
    assert rss - rss_before > 150 * MB
    assert peak >= rss
    del block


@needs_glibc
def test_release_free_heap_returns_freed_heap_memory() -> None:
    kept, _ = _freed_and_after(100_000)
    freed, released = _freed_and_after(100_000, then="release_free_heap()")
    assert kept - released > 150  # MB: the freed blocks were resident until the trim
    assert abs(kept - freed) < 30


@needs_glibc
def test_fixed_mmap_threshold_returns_freed_blocks_without_a_trim() -> None:
    # A freed 20 MB block raises glibc's threshold to 20 MB, so later 2 MB blocks come from the heap and stay resident
    # after free; with the threshold fixed at 1 MiB they are mmapped and unmapped on free.
    raise_threshold = "del_me = bytearray(20 * 2**20); del del_me"
    default_freed, _ = _freed_and_after(2 * MB, setup=raise_threshold)
    fixed_freed, _ = _freed_and_after(2 * MB, setup="return_large_blocks_to_os()\n" + raise_threshold)
    assert default_freed - fixed_freed > 150
