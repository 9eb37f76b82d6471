"""Rank/world detection and the process group, for every way a job is started.

One function, `init_distributed()`, makes the same training code run under `torchrun`, the `deepspeed`
launcher, Slurm/submitit tasks, or as a plain single process (no launcher, no environment): it fills
the `env://` variables torch expects from whatever the launcher provided, picks the backend (nccl when a
GPU is visible, gloo on CPU) and creates the process group through DeepSpeed so its communication layer
is initialised too. The rest of the code only reads `DistInfo` and calls the small collectives below.

Launcher variables are read through `tb_core.launcher` (the one reader); this module WRITES the `env://`
ones torch needs and is the ONE home of the job-level collectives (`agree`, `agreed`, `any_flag`,
`on_ranks`).
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as tdist

from tb_core.errors import FollowerExit, TBError
from tb_core.launcher import (is_slurm_task, launcher_ranks, slurm_job_id, slurm_nodelist,
                              slurm_tasks_per_node)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str          # "nccl" or "gloo"
    device: torch.device  # this rank's compute device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def for_rank(cls, rank: int, world: int, device: str | torch.device) -> "DistInfo":
        """This process's place for the collectives (`agree`), given by a job that was handed its rank."""
        device = torch.device(device)
        return cls(rank, world, 0, world, "nccl" if device.type == "cuda" else "gloo", device)


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started by this process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    """First host of the Slurm allocation (what submitit and srun-based recipes use as rendezvous)."""
    nodelist = slurm_nodelist()
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def job_port(job_id: str) -> int:
    """Rendezvous port of a scheduler job: a function of its id, so every task of the job (on any node)
    computes the same one without talking to the others, and a requeued job reuses it (Slurm starts the
    next attempt only after the previous one has released it)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def export_task_env(rank: int, world: int, local_rank: int, local_world: int, master_addr: str,
                    job_id: str) -> None:
    """Set the `env://` variables for one task of a scheduler job, overwriting inherited ones.

    A submitit task inherits the environment of the shell that ran `tb-submit` (sbatch's default
    `--export=ALL`), which may hold another job's RANK or MASTER_PORT; the task's own values must win.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR=master_addr,
                      MASTER_PORT=str(job_port(job_id)))


def export_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for `env://` from the launcher's variables.

    torchrun and the deepspeed launcher already set them; Slurm sets SLURM_* only; a bare process sets
    nothing and becomes rank 0 of 1 on a free local port.
    """
    env = os.environ
    rank, world, local_rank = launcher_ranks(env)
    if is_slurm_task(env):
        env.setdefault("LOCAL_WORLD_SIZE", str(slurm_tasks_per_node(env)))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(job_port(slurm_job_id(env) or "0")))
    if "RANK" not in env and world == 1:
        env.setdefault("LOCAL_WORLD_SIZE", "1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local_rank)
    env.setdefault("MASTER_ADDR", "127.0.0.1")


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Create (or reuse) the default process group; returns this process's place in it."""
    export_env()
    import deepspeed  # heavy import, only for jobs that need it

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # fp32 matmuls and convolutions (precision=fp32 runs, the ops autocast keeps in fp32) in TF32:
        # ~7x the fp32 rate on H100/H200 at a 10-bit mantissa, still finer than the bf16 that training
        # uses elsewhere. The Inception extractor turns it off inside its own forward and restores it
        # (eval/inception.py strict_fp32), so metrics keep full fp32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        backend, device = "gloo", torch.device("cpu")
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (all_reduce MAX); the step-boundary agreement."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over ranks (for logging losses that every rank computed on its own slice)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return values
    values = values.clone()
    tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values / tdist.get_world_size()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def shutdown() -> None:
    """Barrier, then destroy the group once (a missing destroy aborts the process at exit with gloo)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def agree(dist: DistInfo, error: TBError | None) -> None:
    """Collective: raise on every rank if any rank hit `error` (else return).

    Rank 0 raises the failing rank's error (its own, or one carrying the lowest failing rank's message
    and exit status), so the CLI prints one line; other ranks raise `FollowerExit` with that exit status,
    which the CLI does not print. A rank that fails alone would otherwise leave the others waiting in
    their next collective.
    """
    if not any_flag(error is not None, dist.device):
        return
    reports = [(dist.rank, str(error), error.exit_code) if error is not None else None]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, reports[0])
        reports = gathered
    rank, message, code = next(r for r in reports if r is not None)
    if not dist.is_main:
        raise FollowerExit(code)
    if error is not None:
        raise error
    failure = TBError(f"rank {rank}: {message}")
    failure.exit_code = code
    raise failure


def agreed(dist: DistInfo, fn: Callable[[], T]) -> T:
    """`fn()` on every rank; a TBError on any rank is raised on all of them (see `agree`)."""
    try:
        result = fn()
    except TBError as e:
        agree(dist, e)
        raise  # unreachable: agree raised
    agree(dist, None)
    return result


def on_ranks(job: Callable[..., T], cfg: Any) -> T:
    """`job(cfg, rank, world, device)` inside this process's place in the process group (torchrun, Slurm,
    or a single process without a launcher); the group is torn down even when the job raises."""
    dist = init_distributed()
    try:
        return job(cfg, dist.rank, dist.world, dist.device)
    finally:
        shutdown()
