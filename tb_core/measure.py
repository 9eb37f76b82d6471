"""What a measurement is printed with: the machine it ran on, and markdown tables.

Benchmarks (tools/) and the demo report quote the same facts about the machine, so they are read in one
place: the CPU model from /proc/cpuinfo, the cores this process may use, torch's thread count and
version, the GPU, and the load average (a loaded machine makes every time longer).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Sequence


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on (torch is imported here: tb_core's base modules do not need it)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu_model(), "cores usable": str(usable), "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)"
    try:
        info["load average (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["cpu_model", "machine_info", "markdown_table"]
