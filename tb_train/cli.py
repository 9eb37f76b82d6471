"""Command-line plumbing shared by every job: one argument parser, one error path, the console scripts.

Each job module has `main(argv) -> int`. It builds its parser with `job_parser` (so every job takes
`--config FILE`, dotted `key=value` overrides and the `--local_rank` that the deepspeed launcher adds)
and runs its body through `run_main`, the ONE place where a `TBError` becomes `prog: error: <one line>`
on stderr and the error's exit status. Console scripts import the job module lazily, so `tb-train
--help` does not pay for importing every other job's dependencies.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from tb_core.errors import TBError

EXIT_INTERRUPTED = 130


def job_parser(prog: str, description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every job shares; the job adds its own after."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=config_required, default=None,
                   help="job YAML file (or the name of a packaged one, see docs/architecture.md)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-4 engine.deepspeed=zero3")
    return p


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a job body; a TBError is printed as one line and turned into its exit status."""
    try:
        return int(body() or 0)
    except TBError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _entry(module: str) -> Callable[[list[str] | None], int]:
    """A console-script function that imports `module` only when called and runs its `main(argv)`."""
    def main(argv: list[str] | None = None) -> int:
        return int(importlib.import_module(module).main(sys.argv[1:] if argv is None else argv) or 0)
    main.__name__ = main.__qualname__ = f"{module.rsplit('.', 1)[-1]}_main"
    return main


precompute_main = _entry("tb_train.precompute")
train_main = _entry("tb_train.train")
export_main = _entry("tb_train.export")
demo_main = _entry("tb_train.demo")
sample_main = _entry("tb_train.sample")
eval_main = _entry("tb_train.evaluate")
submit_main = _entry("tb_train.launch.submit")
