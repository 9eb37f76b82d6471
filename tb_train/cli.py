"""The jobs, their console scripts and the command-line plumbing they share.

`JOBS` is the ONE list of jobs: console-script name, module, config dataclass, one-line summary and a
usage example. `setup.cfg`'s console scripts are checked against it (tests/test_structure.py), `tb-submit`
takes its job names from it, and `python -m tb_train JOB` dispatches through it. Modules are named by
string and imported only when their job runs, so `tb-train --help` does not pay for every other job's
dependencies and this base module imports none of the layers above it.

Jobs driven by a config dataclass (precompute, train, sample, eval) run through `job_main`: `--config
FILE` (a path or a packaged name), dotted `key=value` overrides, the `--local_rank` the deepspeed launcher
adds, and a `--help` that lists every key of that job's config (generated from the dataclasses, so it
cannot drift). export, demo and submit take their own options (a positional path, a job name) and use
`run_main` directly. `run_main` is the ONE place where a `TBError` becomes `prog: error: <one line>` on
stderr and the error's exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

from tb_core.config import describe_keys, load_config
from tb_core.errors import FollowerExit, TBError
from tb_train.recipes import config_path

EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Job:
    name: str                 # `tb-<name>` console script, `tb-submit <name>`, `python -m tb_train <name>`
    module: str               # has main(argv) -> int
    summary: str
    example: str              # a command valid for this job (tests/test_cli.py parses it)
    config: str | None = None  # the config dataclass in `module` (None: the job parses its own options)
    on_ranks: bool = False     # runs as one task per GPU (what tb-submit can launch)

    @property
    def prog(self) -> str:
        return f"tb-{self.name}"

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)


JOBS: dict[str, Job] = {j.name: j for j in (
    Job("precompute", "tb_train.data.precompute", "images -> latent shards (posterior moments of image and h-flip)",
        "tb-precompute input=/data/imagenet/train output=/data/in256_kl16 vae.path=/ckpt/kl16.ckpt resolution=256",
        "PrecomputeConfig", True),
    Job("train", "tb_train.train.job", "train a TokenBridge model with DeepSpeed on latent shards",
        "tb-train --config imagenet256_L data.path=/data/in256_kl16 engine.deepspeed=zero3", "TrainJobConfig", True),
    Job("export", "tb_train.engine.export", "a checkpoint's EMA (or raw) weights -> one safetensors file",
        "tb-export runs/imagenet256_L --out L.safetensors"),
    Job("sample", "tb_train.sample.job", "N class-balanced samples split over ranks (PNGs + ADM .npz)",
        "tb-sample model=L.safetensors out=samples/L vae.path=/ckpt/kl16.ckpt num_samples=50000 "
        "sampling.num_iter=256 sampling.guidance=3.1 sampling.temperature=0.97", "SampleJobConfig", True),
    Job("eval", "tb_train.eval.job", "FID / IS / precision-recall / sFID of samples against a reference",
        "tb-eval samples=samples/L reference=VIRTUAL_imagenet256_labeled.npz "
        "inception_weights=pt_inception-2015-12-05.pth protocol=adm", "EvaluateJobConfig", True),
    Job("submit", "tb_train.launch.submit", "run any job on Slurm through submitit",
        "tb-submit train --cluster gpu_4x8 --config imagenet256_L data.path=/data/in256_kl16"),
    Job("demo", "tb_train.demo.job", "the whole chain on the embedded digits, on CPU, with a report",
        "tb-demo --out runs/demo"),
)}


def job_of(prog: str) -> Job:
    return JOBS[prog.removeprefix("tb-")]


def _keys_epilog(job: Job) -> str:
    rows = describe_keys(job.config_class())
    width = min(max(len(r.key) for r in rows), 34)
    lines = ["config keys (dotted key=value, or in the --config YAML):"]
    for r in rows:
        default = "required" if r.required else f"default {r.default}"
        lines.append(f"  {r.key:<{width}}  {r.type} ({default})" + (f"  {r.comment}" if r.comment else ""))
    return "\n".join(lines + ["", f"example:\n  {job.example}"])


def job_parser(job: Job) -> argparse.ArgumentParser:
    """The parser of a config-driven job: the shared options and, in --help, the job's own keys."""
    p = argparse.ArgumentParser(prog=job.prog, description=job.summary, epilog=_keys_epilog(job),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="job YAML file, or the name of a packaged one (tb_train/configs/jobs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (keys below)")
    return p


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a job body; a TBError is printed as one line and turned into its exit status."""
    try:
        return int(body() or 0)
    except FollowerExit as e:  # rank 0 printed the line
        return e.exit_code
    except TBError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def load_job_config(job: Job, args: argparse.Namespace) -> tuple[Any, str]:
    """(the job's config from --config and the overrides, the source named in messages); raises the
    one-line ConfigError on a bad file or key. tb-submit calls it too, before anything is queued."""
    path = config_path(args.config, "jobs") if args.config is not None else None
    return load_config(job.config_class(), path, args.overrides), str(path) if path else "<command line>"


def job_main(prog: str, argv: list[str] | None,
             body: Callable[[Any, str, argparse.Namespace], int | None]) -> int:
    """Parse the command line of config-driven job `prog`, load its config (inside the one error path, so
    a bad key is one line) and run `body(cfg, source, args)`; `source` names the file for messages."""
    job = job_of(prog)
    args = job_parser(job).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(prog, lambda: body(*load_job_config(job, args), args))


def run_job(name: str, argv: list[str] | None = None) -> int:
    """`main(argv)` of job `name`, imported now."""
    if name not in JOBS:
        known = ", ".join(JOBS)
        print(f"tb_train: unknown job {name!r} (known: {known})", file=sys.stderr)
        return 2
    return int(importlib.import_module(JOBS[name].module).main(sys.argv[1:] if argv is None else argv) or 0)


def _entry(name: str) -> Callable[[list[str] | None], int]:
    def main(argv: list[str] | None = None) -> int:
        return run_job(name, argv)
    main.__name__ = main.__qualname__ = f"{name}_main"
    return main


def console_scripts() -> dict[str, str]:
    """{'tb-train': 'tb_train.cli:train_main', ...}: what setup.cfg must declare."""
    return {job.prog: f"{__name__}:{name}_main" for name, job in JOBS.items()}


for _name in JOBS:
    globals()[f"{_name}_main"] = _entry(_name)

__all__ = ["JOBS", "Job", "EXIT_INTERRUPTED", "console_scripts", "job_main", "job_parser", "load_job_config",
           "run_job", "run_main"]
