"""Whether a process of this machine still runs: one answer for every check that asks."""

from __future__ import annotations

import psutil


def is_running(pid: int) -> bool:
    """True while process `pid` runs; an exited process and a zombie (exited, not yet reaped by
    its parent) do not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
