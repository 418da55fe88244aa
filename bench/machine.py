"""What every benchmark shares: the one-line description of the machine, the device it times, and the
process's peak memory."""
from __future__ import annotations

import os
import platform
import resource
import sys

DEVICE_CHOICES = ("cpu", "cuda", "mps", "auto")
MAX_SEED = 2**32 - 1  # NumPy's seeds (utils.MAX_SEED; not imported, so that --help needs no torch)


def int_range(low: int, high: int | None = None):
    """An argparse ``type`` for whole numbers from ``low`` (to ``high``): others are a usage error (exit code 2)."""
    import argparse

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {bounds}")
        return value

    return convert


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def bench_device(name: str):
    """The ``torch.device`` that ``--device`` names (``auto``: CUDA, else MPS, else the CPU).

    A device that this machine lacks ends the script with one line on stderr and exit code 2, as the CLI's
    mistakes do.
    """
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    problem = None
    if name not in DEVICE_CHOICES:
        problem = f"choose one of {', '.join(DEVICE_CHOICES)}"
    elif (name == "cuda" and not cuda) or (name == "mps" and not mps):
        problem = f"this machine (torch {torch.__version__}) has no {name.upper()} device; use --device cpu or auto"
    if problem:
        print(f"Error: --device {name}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call it before reading a clock."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_device_memory(device) -> None:
    """Start :func:`peak_device_memory_mb`'s count afresh (CUDA only)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory_mb(device) -> float:
    """The most memory torch's allocator held for tensors on a CUDA device since the last reset, in MB; NaN
    elsewhere (the CPU's is the process's resident set; MPS has no peak counter)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """The resident-set high-water mark of this process (``RUSAGE_SELF``) or of its largest waited-for child
    (``RUSAGE_CHILDREN``), in MB."""
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def describe_device(device) -> str:
    """``CPU`` or the accelerator's name (CUDA: its name and memory)."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return "Apple MPS" if device.type == "mps" else "CPU"


def describe_machine(threads: int, extra: str = "", device=None) -> str:
    """CPU, cores, load, Python/torch versions and torch threads on one line, then the timed device when it is
    not the CPU (``extra`` appended)."""
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = (f"{cpu_model()}, {os.cpu_count()} logical cores, load average {load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {threads} torch thread(s)")
    if device is not None and device.type != "cpu":
        line += f"; timed on {describe_device(device)}"
    return f"{line}, {extra}" if extra else line
