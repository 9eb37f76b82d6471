"""Atomic file writes and file hashing, shared by every job.

A long job is killed at arbitrary moments (preemption, time limits); a reader must then see either the
old file or the new one, never half of one. Every write goes to a temporary file in the target folder,
is flushed to disk and renamed over the target. `tempfile.mkstemp` creates files with mode 0600; the
result is given the mode a plain `open()` would have produced (0666 minus the umask), so that JSON
written here is as readable to a group as the tar shards beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, IO

HASH_CHUNK = 1 << 22


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The permission bits `open(path, "w")` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, fsync, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class _ErrorKeepingFile:
    """A binary file's `write` and `flush`, remembering the first OSError they raised."""

    def __init__(self, f: IO[bytes]):
        self._f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """`atomic_write_with` for a serializer that hides the file's OSError: torch.save's zip writer turns a
    full disk into `RuntimeError: [enforce fail at inline_container.cc] unexpected pos …`, with no errno.
    The first OSError the file raised (ENOSPC, EIO, …) is raised instead of what the serializer made of
    it, so the caller can report the errno. `write` gets an object with `write` and `flush` only."""
    def guarded(f: IO[bytes]) -> None:
        kept = _ErrorKeepingFile(f)
        try:
            write(kept)  # type: ignore[arg-type]  (the two methods a serializer's buffer needs)
        except Exception:
            if kept.error is not None:
                raise kept.error from None
            raise

    return atomic_write_with(path, guarded)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` with the same all-or-nothing guarantee (torch is imported only when used)."""
    import torch

    return atomic_write_with(path, lambda f: torch.save(obj, f))


def sha256_file(path: str | os.PathLike, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in chunks so that multi-GB shards and weights never sit in memory."""
    return sha256_files([path], chunk)


def sha256_files(paths: list[str | os.PathLike], chunk: int = HASH_CHUNK) -> str:
    """One sha256 over the bytes of several files in the given order (e.g. a sharded weights folder)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
    return digest.hexdigest()


def crc32_file(path: str | os.PathLike, chunk: int = HASH_CHUNK) -> str:
    """CRC-32 of a file as 8 hex digits, read in chunks: the fast checksum that tells a checkpoint file
    damaged after it was written (why CRC-32 and not a cryptographic hash: tb_train/engine/checkpoint.py).
    zlib releases the GIL while it hashes, so several files can be verified by threads in parallel."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


__all__ = ["atomic_write_with", "atomic_write_stream", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "sha256_file", "sha256_files", "crc32_file", "default_file_mode"]
