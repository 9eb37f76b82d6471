"""Console entry points. Each parses nothing itself: it hands argv to the job module's `main`,
imported lazily so that `tb-train --help` does not pay for importing every job's dependencies."""
from __future__ import annotations

import importlib
import sys


def _run(module: str, argv: list[str] | None = None) -> int:
    return int(importlib.import_module(module).main(sys.argv[1:] if argv is None else argv) or 0)


def precompute_main(argv: list[str] | None = None) -> int:
    return _run("tb_train.precompute", argv)


def train_main(argv: list[str] | None = None) -> int:
    return _run("tb_train.train", argv)


def export_main(argv: list[str] | None = None) -> int:
    return _run("tb_train.export", argv)


def demo_main(argv: list[str] | None = None) -> int:
    return _run("tb_train.demo", argv)
