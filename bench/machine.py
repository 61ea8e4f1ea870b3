"""What machine a benchmark ran on, printed at the top of every benchmark's output."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> str:
    mem_gib = psutil.virtual_memory().total / 2**30
    return (f"machine: {os.cpu_count()} cores, {cpu_model()}, {mem_gib:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
