"""One writer per run folder: an exclusive `flock` on `<folder>/.tb.lock`, held for the life of a job.

Two jobs writing checkpoints and logs into the same folder corrupt each other's resume state without any
error, so a job takes this lock before it writes and a second job fails at once with one line that names
the holder (job, host, pid, Slurm job, start time). The lock is a kernel `flock`, not the existence of a
file: the kernel drops it when the holding process dies, `kill -9` and node-local OOM kills included, so
a stale lock never blocks the next run and there is nothing to clean up.

Rules that follow from `flock` semantics:

- The lock belongs to an open file description, not to a path or a process. Two `RunLock` objects in one
  process on the same folder therefore exclude each other like two processes do. Children made by
  `fork` (DataLoader workers) share the description and keep the lock alive until they exit too.
- The file is opened without truncation and never replaced or deleted: a waiter may already hold the
  old inode open, and a rename or unlink would hand a second job a fresh inode to lock. The holder's
  details are rewritten in place (truncate, write, fsync) only after the lock is taken. Do not delete
  the lock file by hand while a job runs.
- The process that calls `acquire` holds the lock; callers decide which process that is. In a
  multi-process job only global rank 0 takes it (the other ranks write nothing of their own).
- A requeued Slurm job keeps its job id, and its previous attempt may still be exiting (on this node or
  another) when the new one starts. When the holder recorded the same Slurm job id as ours, `acquire`
  waits up to `REQUEUE_WAIT_S` for it to let go; another job id fails at once. `wait_s` sets the wait
  explicitly for any holder.

File systems: on a local disk the lock is exact. On Linux NFS (v4, and v3 with lockd) `flock` is emulated
with POSIX byte-range locks held by the server, so it works across nodes if the server supports locking;
a server without it fails `flock` with ENOLCK, which is reported as an `InputError`. A client that loses
its lease (network partition) can lose the lock without its process dying. Lustre grants `flock` across
nodes only when mounted with `-o flock` (`localflock` makes it node-local, which does not stop a second
node); without either, `flock` fails with ENOSYS, also reported as an `InputError`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tb_core.errors import InputError
from tb_core.launcher import slurm_job_id, slurm_restart_count

LOCK_NAME = ".tb.lock"
REQUEUE_WAIT_S = 120.0  # how long a requeued attempt waits for its previous attempt to exit
POLL_S = 0.1  # how often a waiting acquire retries
READ_RETRY_S = 1.0  # how long to retry reading holder info that is being (re)written

# (st_dev, st_ino) of lock files this process holds, so that a second RunLock on the same folder fails at
# once instead of waiting (as a same-Slurm-job holder would be waited for) on a lock it holds itself.
_HELD: set[tuple[int, int]] = set()


def holder_info(job: str) -> dict[str, Any]:
    """What the lock file records about the process that holds it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "slurm_job_id": slurm_job_id(),
        "slurm_restart_count": slurm_restart_count(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder's info, retried briefly: a holder that just took the lock may not have written it yet."""
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return f"holder unknown: {LOCK_NAME} is empty or unreadable"
    parts = [str(info.get("job", "?")), f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    parts.append(f"since {info.get('started', '?')}")
    return ", ".join(parts)


class RunLock:
    """An exclusive lock on a run folder, taken by the calling process (use it on global rank 0 only).

    `RunLock(folder, "tb-train").acquire()` or `with RunLock(folder, "tb-train"):`. Raises `InputError`
    (exit status 2) when another job holds the folder; see the module docstring for when it waits first.
    """

    def __init__(self, folder: str | os.PathLike, job: str, wait_s: float | None = None,
                 name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.job = job
        self.wait_s = wait_s
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._pid: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.folder}: this RunLock already holds the lock")
        own_job = slurm_job_id()
        start = time.monotonic()
        while True:
            fd = self._open()
            try:
                state = self._try_lock(fd)
                if state == "locked":
                    self._fd, self._pid, self._key = fd, os.getpid(), self._inode(fd)
                    _HELD.add(self._key)
                    self._write_info()
                    return self
                mine = self._inode(fd) in _HELD
                info = None if mine or state == "stale" else _read_holder(fd)
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                else:
                    self.release()
                raise
            os.close(fd)
            if state == "stale":  # the file was replaced while we opened it: lock the new one
                continue
            if mine:
                raise InputError(f"{self.folder}: this process already holds its lock ({LOCK_NAME}); "
                                 "release it before locking the folder again")
            wait = self.wait_s
            if wait is None and own_job and info is not None and info.get("slurm_job_id") == own_job:
                wait = REQUEUE_WAIT_S
            waited = time.monotonic() - start
            if wait is None or waited >= wait:
                still = f"still writes here after {waited:.0f} s" if waited >= 1 else "writes here"
                raise InputError(f"{self.folder}: another job {still} ({_describe(info)}); "
                                 "stop it or choose another folder")
            time.sleep(min(POLL_S, wait - waited))

    def release(self) -> None:
        """Unlock and close; the file stays (deleting it would race with a waiter holding its inode)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._pid == os.getpid():  # a forked child must not unlock its parent's lock
                _HELD.discard(self._key)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _open(self) -> int:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # never O_TRUNC: the holder's info
        except OSError as e:
            raise InputError(f"{self.path}: cannot open the run folder's lock file: {e.strerror}") from e

    def _inode(self, fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def _try_lock(self, fd: int) -> str:
        """Take the lock without blocking: "locked", "busy" (someone else has it) or "stale" (see below)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return "busy"
            hint = " (Lustre needs the `flock` mount option; NFS needs server lock support)" \
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP) else ""
            raise InputError(f"{self.path}: cannot lock the run folder: {e.strerror}{hint}") from e
        try:  # the file may have been deleted (by hand) and recreated since we opened it: a dead inode
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino) == self._inode(fd)
        except FileNotFoundError:
            current = False
        if not current:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return "stale"
        return "locked"

    def _write_info(self) -> None:
        assert self._fd is not None
        data = (json.dumps(holder_info(self.job)) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)


def rank_lock_name(rank: int) -> str:
    """The lock file of one rank of a job that has no process group to agree in (precompute splits the
    shards by rank alone): rank 0 takes the folder's lock, rank r > 0 its own, so a second job's ranks
    each meet a holder instead of only its rank 0 stopping."""
    return LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank:05d}"


__all__ = ["LOCK_NAME", "REQUEUE_WAIT_S", "RunLock", "holder_info", "rank_lock_name"]
