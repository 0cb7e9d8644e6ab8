"""What the benchmarks that measure in child processes share: a child's peak memory, a guard that ends a child
past a memory limit, and how a child hands its result to the parent."""

from __future__ import annotations

import os
import sys
import threading
import time

RESULT_PREFIX = "RESULT "  # a child's last line starting with this carries its JSON result
MEMORY_LIMIT_STATUS = 3  # a child's exit status when the guard stopped it


def rss_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def guard_memory(limit_mib: float) -> None:
    """End this process as soon as its resident memory passes the limit (polled every 10 ms)."""
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def watch() -> None:
        with open("/proc/self/statm") as statm:
            while True:
                statm.seek(0)
                if int(statm.read().split()[1]) * page_mib > limit_mib:
                    print(f"over the memory limit of {limit_mib:.0f} MiB: measurement stopped", file=sys.stderr)
                    os._exit(MEMORY_LIMIT_STATUS)
                time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
