"""The CPU cores this process may use (torch-free, so the launcher can ask before torch loads)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores in this process's CPU affinity set (a container's or ``taskset``'s limit), else the
    machine's count; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
