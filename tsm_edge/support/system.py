"""The machine and this process: CPU name, core count, resident memory, the user cache folder."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def user_cache_dir() -> Path:
    """tsm-edge's folder in the user's cache (XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsm-edge"


def machine() -> dict:
    """The CPU's name and core count, the architecture and system, the Python version."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "arch": platform.machine(),
            "system": platform.system(), "python": platform.python_version()}


def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status in bytes, or None where /proc is not readable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size (VmRSS), or None where /proc is not readable."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (VmHWM; getrusage where /proc has none)."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak
