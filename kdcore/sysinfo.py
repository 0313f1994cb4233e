"""What a process costs the machine, for the logs and the benchmarks (docs/performance.md)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    VmHWM is the high-water mark of this process's own memory map, which is what sizing a
    worker needs. ru_maxrss (the fallback off Linux) keeps the pre-exec value of a forked
    parent, so a benchmark's child would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
