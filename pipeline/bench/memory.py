"""A process's peak memory, without importing torch (the audit's child measures its own)."""

from __future__ import annotations

import sys

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    VmHWM, which exec resets, on Linux: ``ru_maxrss`` would carry over the peak of the process
    that forked this one.
    """
    try:
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM"))
        return int(hwm.split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        scale = 2**20 if sys.platform == "darwin" else 1024  # bytes there, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
