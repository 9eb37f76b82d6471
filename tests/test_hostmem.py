"""tb_core.hostmem: with a fixed mmap threshold, freed multi-megabyte blocks leave the resident set.

The pattern is a ZeRO-3 rank's in miniature: a 16 MiB block is freed (glibc then raises its dynamic mmap
threshold to 16 MiB), 64 blocks of 8 MiB are allocated and all but the last freed. With glibc's default
they came from the heap, whose top is still in use: ~512 MiB stay resident. With the threshold fixed at
4 MiB each block was its own mapping: only the live one stays. Each arm runs in a fresh interpreter
(the threshold is process state)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
from tb_core.hostmem import fix_mmap_threshold
print(fix_mmap_threshold(int(sys.argv[1])))
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
first = torch.ones(4 << 20)
del first
base = rss()
blocks = [torch.ones(2 << 20) for _ in range(64)]
last = blocks[-1]
del blocks
print((rss() - base) / 2 ** 20)
"""


def retained_mib(threshold: int) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_fixed_threshold_returns_freed_blocks():
    applied, kept_default = retained_mib(0)
    assert applied == "False" and kept_default > 400, kept_default   # the fragmentation this module prevents
    applied, kept_fixed = retained_mib(4 << 20)
    assert applied == "True" and kept_fixed < 40, kept_fixed         # the one live 8 MiB block (+ noise)


def test_out_of_range_threshold_is_refused():
    from tb_train.engine.engine import EngineConfig

    with pytest.raises(ValueError, match="host_mmap_threshold_mb"):
        EngineConfig(host_mmap_threshold_mb=64)
