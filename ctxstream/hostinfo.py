"""What machine a benchmark ran on, and how loaded it was: one place for every result file.

Timings here come from shared machines (other jobs steal time slices), so every JSON under
``bench/results/`` records the CPU model, core count, memory, load average and library versions
at the time it was measured.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

__all__ = ["cpu_model", "host_info", "machine"]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def host_info() -> dict:
    """The machine and its load right now: cpu, cpus, mem_gib, loadavg (1/5/15 min), platform,
    python and torch versions, local time."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # the description must not need torch
        torch_version = None
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "mem_gib": _mem_gib(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch_version,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def machine() -> str:
    """One line: ``"<cpu>, <n> cores, <system> <arch>, torch <version>"``."""
    h = host_info()
    return f"{h['cpu']}, {h['cpus']} cores, {platform.system()} {platform.machine()}, torch {h['torch']}"
