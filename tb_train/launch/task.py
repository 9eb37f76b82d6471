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

Jobs without a step boundary (precompute, sample, eval) keep submitit's SIGUSR2 handler: rank 0 requeues
at once and exits, and the next attempt reruns the call, which skips every output already complete.
Two things keep that exact and visible:
  - processes forked inside a task (DataLoader workers) ignore SIGUSR2. They inherit the task's Python
    handlers, and Slurm signals every process of the step, so without this each worker of rank 0 ran
    submitit's checkpoint-and-requeue as if it were the task, racing the task on the same pickle file
    (the task died on submitit's "A temporary saved file already exists") and calling `scontrol requeue`
    once per process. Workers stop with their task anyway.
  - rank 0 records the attempt as requeued from inside submitit's handler, before the job unwinds (a job
    whose cleanup waits for the other ranks may be killed before it returns); an attempt that ended
    without any record (killed after KillWait) is closed as such when the next attempt starts.
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


REQUEUED_ON_USR2 = "requeued on SIGUSR2 by submitit (no save: the next attempt reruns and skips what is done)"
KILLED = "ended without an exit record (killed: KillWait after a requeue or cancel, or a node failure)"
_FORK_HOOK = []  # register_at_fork has no unregister: once per process


def _ignore_usr2_in_child() -> None:
    """After a fork inside a task: the scheduler's warning is for the task, not for its workers."""
    try:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    except ValueError:  # forked from a thread that is not the child's main thread: nothing to reset
        pass


def _close_killed_attempts(run_dir: str, job_id: str, attempt: int) -> None:
    """Earlier attempts of this job that never recorded an end were killed: say so instead of '(running)'."""
    for old in records.read_attempts(run_dir, job_id):
        if old["attempt"] < attempt and old.get("ended") is None:
            records.end_attempt(records.attempt_path(run_dir, job_id, old["attempt"]), None, KILLED)


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
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_ignore_usr2_in_child)
            _FORK_HOOK.append(True)
        record, ended = None, []
        if rank == 0:
            done = len(records.read_attempts(self.run_dir, env.job_id))
            restarts = slurm_restart_count()
            attempt = done if restarts is None else restarts
            _close_killed_attempts(self.run_dir, env.job_id, attempt)
            record = records.start_attempt(self.run_dir, self.job, env.job_id, attempt, world)
            if callable(requeue_handler):
                signal.signal(signal.SIGUSR2, self._recording(requeue_handler, record, ended))
        try:
            status = int(importlib.import_module(self.module).main(list(self.argv)) or 0)
        except BaseException as e:  # noqa: B902 - record, then let submitit see it as before
            if record is not None and not ended:
                records.end_attempt(record, None, f"ended by {type(e).__name__}: {str(e)[:200]}")
            raise
        finally:
            if record is not None and callable(requeue_handler):
                signal.signal(signal.SIGUSR2, requeue_handler)
        if status == EXIT_PREEMPTED:
            self._requeue(rank, env.job_id, requeue_handler, record)
        if record is not None:
            records.end_attempt(record, status, "finished" if status == 0 else "failed")
        if status != 0:
            raise JobFailed(f"{self.module}.main exited with status {status} (its error is in the task log)")
        return status

    @staticmethod
    def _recording(handler: Callable, record: Any, ended: list) -> Callable:
        """submitit's SIGUSR2 handler, recording on rank 0 how it ended this attempt as it happens."""
        def on_usr2(signum: int, frame: Any) -> None:
            try:
                handler(signum, frame)  # checkpoint() + scontrol requeue + sys.exit(-1), or raises
            except SystemExit:
                ended.append(True)
                records.end_attempt(record, None, REQUEUED_ON_USR2)
                raise
            except UncompletedJobError as e:
                ended.append(True)
                records.end_attempt(record, None, f"not requeued: {str(e)[:200]}")
                raise
        return on_usr2

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


__all__ = ["JobTask", "JobFailed", "NotRequeued", "slurm_state", "EXIT_PREEMPTED", "REQUEUED_ON_USR2", "KILLED"]
