"""The callable that submitit runs once per task (one task per GPU): set up the rank, run the job, requeue.

A job is any module with `main(argv) -> int`; it runs in-process (no torchrun or deepspeed launcher inside
the allocation). `tb_train.dist.init_distributed()` inside the job then reads the `env://` variables set
here from submitit's view of the allocation: RANK = global task id, WORLD_SIZE = tasks of the job,
LOCAL_RANK, MASTER_ADDR = first node (127.0.0.1 on a one-node job), MASTER_PORT from the job id.

Preemption and time limits. Slurm sends SIGUSR2 `signal_grace_s` before the time limit
(`--signal=USR2@N`), SIGTERM on preemption or `scancel`. A job's own handlers only set a flag; every rank
saves at the next step boundary, restores the handlers it found (submitit's) and returns 75
(EX_TEMPFAIL). Then, outside any signal handler and after the job has left its process group:
  - ranks > 0 exit at once (status 75, no result file: a requeued job must not leave stale results);
  - rank 0 asks Slurm whether the job is still RUNNING. A plain `scancel` shows it COMPLETING/CANCELLED:
    the job is not requeued and the task fails with a one-line reason (the checkpoint is kept).
    Otherwise rank 0 calls submitit's own SIGUSR2 handler, which pickles `checkpoint()`'s answer (this
    same callable: the next attempt resumes from the job's `latest`), runs `scontrol requeue` and exits.
    submitit counts each of these as a timeout against `max_requeues` (jobs under 10 min always do);
    when they are used up it records the job as failed instead.
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from typing import Any, Callable

import submitit
from submitit.core.utils import UncompletedJobError

from tb_core.launcher import slurm_job_id, slurm_restart_count
from tb_train.dist import export_task_env
from tb_train.launch import records

EXIT_PREEMPTED = os.EX_TEMPFAIL  # 75: the job saved at a step boundary and wants to be requeued


class JobFailed(RuntimeError):
    """The job's main returned a non-zero status (the task logs hold its one-line error)."""


class NotRequeued(RuntimeError):
    """The job stopped for a signal and saved, but the launcher did not requeue it (reason in the message)."""


def slurm_state(job_id: str) -> str | None:
    """The job's state as squeue shows it now (RUNNING, COMPLETING, ...); None if squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


class JobTask(submitit.helpers.Checkpointable):
    """`main(argv)` of `module`, run once per task of a submitit job; records attempts in `run_dir`."""

    def __init__(self, job: str, module: str, argv: list[str], run_dir: str):
        self.job, self.module, self.argv, self.run_dir = job, module, list(argv), str(run_dir)

    def __repr__(self) -> str:
        return f"JobTask({self.job}: {self.module}.main({' '.join(self.argv)}))"

    def command(self) -> str:
        """What each task runs, for `--dry-run` and the records."""
        return f"{self.module}.main({self.argv!r})"

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue this same callable: the job's state lives in its run folder, not in this object."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        rank, world = env.global_rank, env.num_tasks
        master = env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1"
        export_task_env(rank, world, env.local_rank, world // env.num_nodes, master, env.job_id)
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's; the job restores it before returning
        record = None
        if rank == 0:
            done = len(records.read_attempts(self.run_dir, env.job_id))
            restarts = slurm_restart_count()
            attempt = done if restarts is None else restarts
            record = records.start_attempt(self.run_dir, self.job, env.job_id, attempt, world)
        try:
            status = int(importlib.import_module(self.module).main(list(self.argv)) or 0)
        except BaseException as e:  # noqa: B902 - record, then let submitit see it as before
            if record is not None:  # SystemExit here: submitit's own handler requeued before any save
                records.end_attempt(record, None, f"ended by {type(e).__name__}: {str(e)[:200]}")
            raise
        if status == EXIT_PREEMPTED:
            self._requeue(rank, env.job_id, requeue_handler, record)
        if record is not None:
            records.end_attempt(record, status, "finished" if status == 0 else "failed")
        if status != 0:
            raise JobFailed(f"{self.module}.main exited with status {status} (its error is in the task log)")
        return status

    def _requeue(self, rank: int, job_id: str, handler: Callable | int | None, record: Any) -> None:
        """After a save-and-exit (status 75): rank 0 requeues unless the user cancelled. Never returns."""
        if rank != 0:
            sys.exit(EXIT_PREEMPTED)
        state = slurm_state(job_id) if slurm_job_id() else None
        if state is not None and state != "RUNNING":
            records.end_attempt(record, EXIT_PREEMPTED, f"not requeued: job is {state}")
            raise NotRequeued(f"stopped by the scheduler while {state} (scancel?): saved, not requeued")
        if not callable(handler):
            records.end_attempt(record, EXIT_PREEMPTED, "not requeued: no submitit handler")
            raise NotRequeued("preempted and saved, but submitit's requeue handler is not installed")
        records.end_attempt(record, EXIT_PREEMPTED, "requeued")
        try:
            handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + sys.exit, or raises when used up
        except SystemExit:
            sys.exit(EXIT_PREEMPTED)
        except UncompletedJobError:
            records.end_attempt(record, EXIT_PREEMPTED, "not requeued: max_requeues used up")
            raise
        raise NotRequeued("submitit's handler returned without requeueing")


__all__ = ["JobTask", "JobFailed", "NotRequeued", "slurm_state", "EXIT_PREEMPTED"]
