"""What a measurement is printed with: the machine it ran on, and markdown tables.

Benchmarks (tools/) and the demo report quote the same facts about the machine, so they are read in one
place: the CPU model from /proc/cpuinfo, the cores this process may use, torch's thread count and
version, the GPU, and the load average (a loaded machine makes every time longer). `RankPeakMemory` watches
the peak resident memory of every rank of a job from outside (tools/bench_memory.py, tools/rehearse_L.py).
"""
from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported where used: tb_core's base modules do not need it
    import torch


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a CUDA call returns before its kernels have run, so a timer
    read without this measures the launch, not the work. No-op elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _proc_status_bytes(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_rank(pid: int) -> int | None:
    """The RANK variable a launcher gave process `pid` (None if it has none or is not readable)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc; whatever session or group they
    put themselves in (torchrun starts each rank in a new session)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir()
                    for k in (t / "children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _is_multiprocessing(pid: int) -> bool:
    """A forkserver or spawn process of `multiprocessing` (DataLoader workers and their server). Other children
    of a rank are short-lived commands (git, ...): between their fork and exec /proc reports the rank's own
    pages (VmHWM of 7.8 GiB for a git started by an L rank), which are shared, not added."""
    try:
        return b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class RankPeakMemory:
    """Peak resident memory (VmHWM) per rank of a job started as process `root` (itself a rank, or e.g.
    torchrun and its children), polled from /proc every `interval` seconds in a thread. A rank is a descendant process
    whose environment has RANK and that is not a child of another rank (DataLoader workers — multiprocessing
    processes below a rank — are reported apart, summed per rank, as `workers`). VmHWM is kept by the kernel, so the peak between two polls is
    not lost; only what a process does after the last poll before it exits is."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.ranks: dict[int, int] = {}      # rank -> peak bytes of the rank process
        self.workers: dict[int, int] = {}    # rank -> summed peak bytes of its child processes
        self._worker_peaks: dict[int, tuple[int, int]] = {}  # pid -> (rank, peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RankPeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        for pid in [self.root, *descendants(self.root)]:
            rank = _proc_rank(pid)
            peak = _proc_status_bytes(pid, "VmHWM")
            if rank is None or peak is None:
                continue
            parent_rank = None
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parent_rank = _proc_rank(ppid)
            except (OSError, ValueError, IndexError):
                pass
            if parent_rank is None:
                self.ranks[rank] = max(self.ranks.get(rank, 0), peak)
            elif _is_multiprocessing(pid):
                self._worker_peaks[pid] = (rank, max(peak, self._worker_peaks.get(pid, (rank, 0))[1]))
        self.workers = {}
        for rank, peak in self._worker_peaks.values():
            self.workers[rank] = self.workers.get(rank, 0) + peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(self.interval)


__all__ = ["RankPeakMemory", "cpu_model", "descendants", "machine_info", "markdown_table", "synchronize"]
