"""keep_freed_memory: large blocks freed by one step are reused by the next, without page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from medmeta.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's (Linux)"
)

# allocations of 64 MiB, each written and freed, as a training step's activations are: the
# page faults of each block in turn, in one process
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from medmeta.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
BLOCK_PAGES = (64 << 20) // 4096


def _page_faults(mode: str, blocks: int) -> list[int]:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode, str(blocks)], capture_output=True, text=True, check=True)
    return [int(n) for n in done.stdout.split()]


def test_freed_blocks_are_reused_without_page_faults():
    # the first blocks fault in while the heap grows to its working size (seen here: 6 or 7
    # blocks; on CI once 1, once 5); the last 40 of 60 are what a long run pays per step
    default, keep = _page_faults("default", 60), _page_faults("keep", 60)
    # glibc maps and unmaps every block, so each faults all its pages in ...
    assert sum(default[20:]) > 30 * BLOCK_PAGES, default
    # ... unless the freed blocks stay in the heap, where the next one finds them (seen here: no
    # fault at all; the bound leaves room for a heap that settles late)
    assert sum(keep[20:]) < sum(default[20:]) / 5, keep


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
