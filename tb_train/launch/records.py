"""What a submission leaves in its run folder, so that every result can be traced to code and attempts.

    RUN_DIR/submit/jobs.json                  one entry per submitted job: job id, module, argv, executor,
                                              dependency, the resolved cluster config, sbatch script, logs
    RUN_DIR/submit/cluster_<job>.yaml         the resolved ClusterConfig of that job
    RUN_DIR/submit/code.json (+ code.diff)    git commit, branch and dirty flag at submit time; the diff
                                              against HEAD (and the untracked file names) when dirty
    RUN_DIR/submit/logs/<jobid>/              submitit's folder: <jobid>_submission.sh (the sbatch script),
                                              <jobid>_<task>_log.out/.err (all attempts, appended), pickles
    RUN_DIR/submit/attempts/<jobid>_<n>.json  attempt n (Slurm's restart count) of a job: start/end time,
                                              host, world size, exit status, and the byte offsets at which
                                              this attempt's lines start in each task log

Every file is written atomically (tb_core.fileio), so `tb-submit status` never reads half a record.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tb_core.config import dump_config
from tb_core.fileio import atomic_write_json, atomic_write_text

SUBDIR = "submit"
REPO_ROOT = Path(__file__).resolve().parents[2]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def submit_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SUBDIR


def submitit_folder(run_dir: str | os.PathLike) -> Path:
    """submitit's job folder pattern; `%j` becomes the Slurm job id (one folder per job, all attempts)."""
    return submit_dir(run_dir) / "logs" / "%j"


def task_logs(run_dir: str | os.PathLike, job_id: str, num_tasks: int) -> list[dict[str, str]]:
    """stdout/stderr paths of every task of `job_id` (submitit's naming)."""
    folder = submit_dir(run_dir) / "logs" / job_id
    return [{"out": str(folder / f"{job_id}_{t}_log.out"), "err": str(folder / f"{job_id}_{t}_log.err")}
            for t in range(num_tasks)]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def write_code_revision(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Record the code this submission runs: commit + dirty flag, and the diff when the tree is dirty."""
    folder = submit_dir(run_dir)
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("tokenbridge")
        except PackageNotFoundError:
            ver = None
        info: dict[str, Any] = {"commit": None, "source": str(REPO_ROOT), "version": ver,
                                "note": "not a git checkout; only the package version is known"}
    else:
        status = _git("status", "--porcelain", "--untracked-files=all") or ""
        untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
        dirty = bool(status.strip())
        info = {"commit": commit.strip(), "branch": (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip(),
                "dirty": dirty, "source": str(REPO_ROOT), "untracked": untracked}
        if dirty:
            diff = _git("diff", "HEAD", "--no-color", "--no-ext-diff") or ""
            atomic_write_text(folder / "code.diff", diff)
            info["diff"] = str(folder / "code.diff")
    info["recorded"] = now()
    atomic_write_json(folder / "code.json", info)
    return info


def read_jobs(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = submit_dir(run_dir) / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


def add_job(run_dir: str | os.PathLike, entry: dict[str, Any], cluster: Any) -> None:
    """Append one submitted job to jobs.json and write its resolved cluster config beside it."""
    folder = submit_dir(run_dir)
    cluster_file = folder / f"cluster_{entry['job']}.yaml"
    dump_config(cluster, cluster_file)
    jobs = read_jobs(run_dir)
    jobs.append(dict(entry, cluster_file=str(cluster_file), submitted=now()))
    atomic_write_json(folder / "jobs.json", jobs)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def attempt_path(run_dir: str | os.PathLike, job_id: str, attempt: int) -> Path:
    return submit_dir(run_dir) / "attempts" / f"{job_id}_{attempt}.json"


def start_attempt(run_dir: str | os.PathLike, job: str, job_id: str, attempt: int, world: int) -> Path:
    """Rank 0, before the job's main: mark where this attempt's lines begin in every task log."""
    logs = task_logs(run_dir, job_id, world)
    record = {"job": job, "job_id": job_id, "attempt": attempt, "host": socket.gethostname(), "world": world,
              "started": now(), "ended": None, "status": None,
              "log_offsets": [{"out": _size(t["out"]), "err": _size(t["err"])} for t in logs]}
    return atomic_write_json(attempt_path(run_dir, job_id, attempt), record)


def end_attempt(path: Path, status: int | None, outcome: str) -> None:
    """Rank 0, after the job's main returned: its exit status and what the launcher did about it."""
    record = json.loads(path.read_text())
    record.update(ended=now(), status=status, outcome=outcome)
    atomic_write_json(path, record)


def read_attempts(run_dir: str | os.PathLike, job_id: str) -> list[dict[str, Any]]:
    folder = submit_dir(run_dir) / "attempts"
    found = [json.loads(p.read_text()) for p in folder.glob(f"{job_id}_*.json")] if folder.exists() else []
    return sorted(found, key=lambda r: r["attempt"])


__all__ = ["submit_dir", "submitit_folder", "task_logs", "write_code_revision", "read_jobs", "add_job",
           "start_attempt", "end_attempt", "read_attempts", "attempt_path"]
