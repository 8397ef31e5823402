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

# allocations of 64 MiB, each written and freed, as a training step's activations are
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from medmeta.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str, blocks: int) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode, str(blocks)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def test_freed_blocks_are_reused_without_page_faults():
    block_pages = (64 << 20) // 4096
    # the faults of 40 more blocks: glibc maps and unmaps every block, so each faults all its pages in ...
    assert _page_faults("default", 60) - _page_faults("default", 20) > 30 * block_pages
    # ... unless the freed blocks stay in the heap: then the first few cost (the heap settles
    # within a block or so more or less from run to run), and the rest nothing
    assert _page_faults("keep", 60) - _page_faults("keep", 20) < 4 * block_pages


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
