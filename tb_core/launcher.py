"""The ONE reader of launcher variables: what torchrun, the deepspeed launcher and Slurm tell a process.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK(/LOCAL_WORLD_SIZE); a Slurm task has
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NTASKS_PER_NODE, the job's SLURM_JOB_ID (array tasks:
SLURM_ARRAY_JOB_ID + SLURM_ARRAY_TASK_ID), its node list and SLURM_RESTART_COUNT; a bare process has
none and is rank 0 of 1. Everything that needs one of these facts (the process group, precompute's
shard split, the run lock, submitit tasks) reads it here, never from `os.environ` directly.
"""
from __future__ import annotations

import os
from typing import Mapping

# The `env://` variables of torch.distributed: set by torchrun, or written by tb_train.dist.export_env.
# A child job started from a process that has them must not inherit them (it would join the parent's group).
TORCH_DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def launcher_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world, local rank) from a launcher's variables, without changing them (a bare process:
    0, 1, 0). Jobs that need no process group (precompute splits the shards by index) use this alone."""
    env = _env(env)
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def is_slurm_task(env: Mapping[str, str] | None = None) -> bool:
    """A task started by srun/sbatch (and not already given torchrun's variables)."""
    env = _env(env)
    return "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env


def slurm_tasks_per_node(env: Mapping[str, str] | None = None) -> int:
    """SLURM_NTASKS_PER_NODE ('8' or '8(x4)'), 1 when unset."""
    return int(_env(env).get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def slurm_nodelist(env: Mapping[str, str] | None = None) -> str | None:
    env = _env(env)
    return env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or None


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This process's Slurm job id — `<array job>_<task>` for an array task (submitit's form) — or None."""
    env = _env(env)
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def slurm_restart_count(env: Mapping[str, str] | None = None) -> int | None:
    """How many times Slurm requeued this job (SLURM_RESTART_COUNT), None outside Slurm."""
    value = _env(env).get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else None


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child job that must choose its own ranks (no torch.distributed variables)."""
    return {k: v for k, v in _env(env).items() if k not in TORCH_DIST_VARIABLES}


__all__ = ["TORCH_DIST_VARIABLES", "child_env", "is_slurm_task", "launcher_ranks", "slurm_job_id", "slurm_nodelist", "slurm_restart_count",
           "slurm_tasks_per_node"]
