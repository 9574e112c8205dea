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


# Allocates, writes and frees a 50 MB block 5 times under the fixed 1 MiB threshold, then 5 times inside
# keep_freed_blocks; prints the page faults of each, and the RSS in MB with a freed 200 MB block: inside, after the
# trims a rollout engine runs and a nested keep_freed_blocks (both inside), and on leaving the outer one.
_REUSED = """
import resource
from cipo_lightning.memory import keep_freed_blocks, release_free_heap, resident_memory, return_large_blocks_to_os

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = b"x" * (50 * 2**20)  # written, so every page is touched (calloc would skip fresh mapped pages)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

return_large_blocks_to_os()
mapped = faults(5)
with keep_freed_blocks():
    inside = faults(5)
    big = b"x" * (200 * 2**20)
    pin = b"x" * 2**20  # keeps the freed 200 MB off the heap's top, which free() would trim by itself
    del big
    held = resident_memory()[0] >> 20
    trimmed = release_free_heap() or return_large_blocks_to_os()
    with keep_freed_blocks():
        pass
    still_held = resident_memory()[0] >> 20
    reused = faults(5)
print(mapped, inside, held, int(trimmed), still_held, reused, resident_memory()[0] >> 20)
"""


@needs_glibc
def test_keep_freed_blocks_reuses_memory_inside_and_returns_it_on_exit() -> None:
    result = subprocess.run([sys.executable, "-c", _REUSED], capture_output=True, text=True, check=True)
    mapped, inside, held, trimmed, still_held, reused, released = (int(value) for value in result.stdout.split())
    pages = 50 * MB // 4096
    assert mapped > 5 * pages * 0.9  # each round's block mapped and faulted in anew
    assert inside < 2 * pages  # the first round faults the block in, the next four reuse it
    # Inside, the engine's trims and a nested block's exit give nothing back: the freed 200 MB stays and serves
    # the next blocks without page faults.
    assert not trimmed
    assert still_held > held - 20
    assert reused < pages / 10
    assert held - released > 150  # the freed 200 MB went back when the outer one exited
