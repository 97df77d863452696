"""Peak resident memory of a stretch of work in this process (Linux ``/proc``), for CPU benchmarks."""

from __future__ import annotations


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (``VmRSS``) or peak (``VmHWM``) resident set of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
