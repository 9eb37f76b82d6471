"""`tb-submit status RUN_DIR`: what happened to the jobs submitted for a run folder, and waiting for them.

State comes from `squeue` while the job is in the queue, then from `sacct` where the cluster keeps
accounting, and otherwise from submitit's per-task result files (a cluster without slurmdbd: sacct
fails, and a finished job has simply left the queue).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tb_core.errors import InputError
from tb_train.engine.checkpoint import CHECKPOINTS, checksum_note, find_damage, read_latest, read_train_state
from tb_train.launch import records

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def queue_state(job_id: str) -> str | None:
    """squeue's state and reason ("PENDING BeginTime"); None when the job is no longer in the queue."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T %r"])
    return out.splitlines()[0].strip() if out else None


def result_state(run_dir: str | Path, job_id: str, num_tasks: int) -> str | None:
    """From submitit's result files: COMPLETED / FAILED (a task raised); None while any file is missing."""
    from submitit.core.utils import pickle_load

    folder = records.submit_dir(run_dir) / "logs" / job_id
    outcomes = []
    for t in range(num_tasks):
        path = folder / f"{job_id}_{t}_result.pkl"
        if not path.exists():
            return "FAILED" if outcomes and "error" in outcomes else None
        outcomes.append(pickle_load(path)[0])
    return "COMPLETED" if all(o == "success" for o in outcomes) else "FAILED"


def job_state(run_dir: str | Path, entry: dict[str, Any]) -> tuple[str, str]:
    """(state, where it came from) of one submitted job."""
    job_id, tasks = entry["job_id"], entry["world"]
    if entry["executor"] == "slurm":
        queued = queue_state(job_id)
        if queued:
            return queued, "squeue"
        acct = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if acct:
            return acct.splitlines()[0], "sacct"
    done = result_state(run_dir, job_id, tasks)
    if done:
        return done, "result files"
    if entry["executor"] == "local":
        return "RUNNING or ended without a result", "local executor"
    return "UNKNOWN (not in the queue, no accounting, no result files: cancelled or killed?)", "-"


def wait_for(run_dir: str | Path, entry: dict[str, Any], timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job has left the queue and its state is known; raises TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        state, _ = job_state(run_dir, entry)
        if state.split()[0] in TERMINAL:
            return state.split()[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {entry['job_id']} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The tag `latest` names, verified as a resume verifies it (sizes and CRC-32 of every file):
    "step_00000020", "step_00000020 (damaged: <what, naming the file>)" (a resume will fall back past it),
    or "step_00000020 (sizes checked; no checksums: written by an older version)"; None: no checkpoint."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    problem = find_damage(ckpt_dir / tag)
    if problem is not None:
        return f"{tag} (damaged: {problem})"
    if checksum_note(ckpt_dir / tag, read_train_state(ckpt_dir, tag)):
        return f"{tag} (sizes checked; no checksums: written by an older version)"
    return tag


def report(run_dir: str | Path) -> str:
    """The text `tb-submit status` prints."""
    jobs = records.read_jobs(run_dir)
    if not jobs:
        raise InputError(f"{run_dir}: no {records.SUBDIR}/jobs.json (not a folder made by tb-submit)")
    lines = [f"run folder {Path(run_dir).resolve()}"]
    code_file = records.submit_dir(run_dir) / "code.json"
    if code_file.exists():
        import json

        code = json.loads(code_file.read_text())
        dirty = f", dirty: {code['diff']}" if code.get("dirty") else ""
        lines.append(f"code {code.get('commit') or code.get('version')}{dirty}")
    for entry in jobs:
        state, source = job_state(run_dir, entry)
        dep = f", after {entry['dependency']}" if entry.get("dependency") else ""
        lines.append(f"{entry['job']}: job {entry['job_id']} ({entry['executor']}, {entry['world']} tasks{dep}): "
                     f"{state} [{source}]")
        for a in records.read_attempts(run_dir, entry["job_id"]):
            end = f"-> {a['ended']} status {a['status']} ({a.get('outcome')})" if a["ended"] else "(running)"
            lines.append(f"  attempt {a['attempt']} on {a['host']}: {a['started']} {end}")
        logs = records.task_logs(run_dir, entry["job_id"], entry["world"])
        lines.append(f"  logs {logs[0]['out']} (+{len(logs) - 1} tasks; .err beside)")
    step = last_checkpoint(run_dir)
    if step:
        lines.append(f"last checkpoint {step}")
    return "\n".join(lines)


__all__ = ["queue_state", "result_state", "job_state", "wait_for", "last_checkpoint", "report", "TERMINAL"]
