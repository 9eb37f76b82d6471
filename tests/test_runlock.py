"""One writer per run folder: a second job fails with the holder's details, a killed holder never blocks,
a requeued attempt of the same Slurm job waits for its predecessor, and the holder's info is exact.

The holders are real processes (`flock` is per open file description, so only another process or another
open of the file is a faithful second job). Everything runs on the local disk in well under 15 s.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tb_core.errors import InputError
from tb_core.runlock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
CHILD = """
import sys, time
from tb_core.runlock import RunLock
RunLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """Tests run inside Slurm jobs too: start every test outside one."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def holder():
    """Start a process that takes the lock and holds it for `hold_s`; returns once it holds it."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path, job: str, hold_s: float, slurm_job: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if slurm_job is not None:
            env["SLURM_JOB_ID"] = slurm_job
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), job, str(hold_s)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().strip() == "locked", "the holder process did not lock"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _holder_info(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def test_second_job_fails_naming_the_holder(tmp_path, holder):
    folder = tmp_path / "runs" / "x"
    child = holder(folder, "tb-child", 30)
    with pytest.raises(InputError) as e:
        RunLock(folder, "tb-train").acquire()
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert msg.startswith(f"{folder}: another job writes here (tb-child, ")
    assert f"host {socket.gethostname()}," in msg and f"pid {child.pid}," in msg
    assert "Slurm job" not in msg  # the child runs outside Slurm
    # the failed attempt must not have truncated or rewritten the holder's record
    assert _holder_info(folder)["pid"] == child.pid


def test_killed_holder_never_blocks(tmp_path, holder):
    child = holder(tmp_path, "tb-child", 30)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    t0 = time.monotonic()
    with RunLock(tmp_path, "tb-train") as lock:
        assert time.monotonic() - t0 < 1.0 and lock.held
        assert _holder_info(tmp_path)["pid"] == os.getpid()


def test_same_slurm_job_waits_for_its_previous_attempt(tmp_path, holder, monkeypatch):
    holder(tmp_path, "tb-train", 2.0, slurm_job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: fails at once
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"writes here \(tb-train, .*Slurm job 4242, since "):
        RunLock(tmp_path, "tb-train").acquire()
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()  # an explicit wait_s waits for any holder, then fails
    with pytest.raises(InputError, match="another job writes here"):
        RunLock(tmp_path, "tb-train", wait_s=0.3).acquire()
    assert 0.3 <= time.monotonic() - t0 < 0.9
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the requeued attempt: waits for the holder to exit
    t0 = time.monotonic()
    with RunLock(tmp_path, "tb-train"):
        waited = time.monotonic() - t0
        info = _holder_info(tmp_path)
    assert 1.0 <= waited < 10, waited  # the holder had ~1.6 s left of its 2 s
    assert info["pid"] == os.getpid() and info["slurm_job_id"] == "4242"


def test_holder_info_is_this_process_and_release_keeps_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "53")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "50")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    folder = tmp_path / "new" / "run"  # created by the lock
    before = datetime.now(timezone.utc).replace(microsecond=0)
    lock = RunLock(folder, "tb-precompute").acquire()
    info = _holder_info(folder)
    assert {k: info[k] for k in ("host", "pid", "job", "slurm_job_id", "slurm_restart_count")} == {
        "host": socket.gethostname(), "pid": os.getpid(), "job": "tb-precompute",
        "slurm_job_id": "50_3", "slurm_restart_count": 2}
    started = datetime.fromisoformat(info["started"])
    assert started.utcoffset().total_seconds() == 0 and 0 <= (started - before).total_seconds() < 5
    with pytest.raises(RuntimeError):
        lock.acquire()  # the same object twice
    inode = (folder / LOCK_NAME).stat().st_ino
    lock.release()
    lock.release()  # a second release is harmless
    assert (folder / LOCK_NAME).stat().st_ino == inode  # neither deleted nor replaced
    with RunLock(folder, "tb-train"):  # really unlocked
        assert (folder / LOCK_NAME).stat().st_ino == inode
        assert _holder_info(folder)["job"] == "tb-train"  # rewritten in place, no trailing old bytes


def test_two_locks_in_one_process_exclude_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # same job as the holder: must not wait for itself
    first = RunLock(tmp_path, "tb-train").acquire()
    t0 = time.monotonic()
    with pytest.raises(InputError, match="this process already holds"):
        RunLock(tmp_path, "tb-train").acquire()
    assert time.monotonic() - t0 < 0.5
    first.release()
    with RunLock(tmp_path, "tb-train") as second:
        assert second.held


def test_a_second_tb_train_on_the_same_run_folder_stops_with_one_line(tmp_path, holder):
    """The jobs take the lock: a tb-train started on a folder that a live process holds exits 2 at once,
    naming the holder, and writes nothing (no config.yaml)."""
    from fixtures.engine import write_latent_folder

    data = write_latent_folder(tmp_path / "data", num_samples=64, per_shard=32, channels=4, hw=8)
    run = tmp_path / "run"
    proc = holder(run, "tb-train", 120)
    res = subprocess.run([sys.executable, "-m", "tb_train.train", "--config", "demo", f"run.dir={run}",
                          f"data.path={data}", "eval.every_steps=0", "data.num_workers=0"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    err = [line for line in res.stderr.splitlines() if line.startswith("tb-train")]  # torch may warn first
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("tb-train: error: ") and f"pid {proc.pid}" in err[0] and "another job writes here" in err[0]
    assert not (run / "config.yaml").exists()


def test_precompute_ranks_lock_their_own_files(tmp_path):
    from tb_core.runlock import rank_lock_name

    assert rank_lock_name(0) == LOCK_NAME and rank_lock_name(3) == LOCK_NAME + ".rank00003"
    with RunLock(tmp_path, "tb-precompute", name=rank_lock_name(1)):
        with RunLock(tmp_path, "tb-precompute", name=rank_lock_name(0)):  # another rank's file: no conflict
            with pytest.raises(InputError, match="already holds its lock"):
                RunLock(tmp_path, "tb-precompute", name=rank_lock_name(1)).acquire()
