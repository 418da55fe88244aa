"""The one-line description of the machine that every benchmark prints above its figures."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(threads: int, extra: str = "") -> str:
    """CPU, cores, load, Python/torch versions and torch threads on one line (``extra`` appended)."""
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = (f"{cpu_model()}, {os.cpu_count()} logical cores, load average {load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {threads} torch thread(s)")
    return f"{line}, {extra}" if extra else line
