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


__all__ = ["atomic_write_with", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "sha256_file", "sha256_files", "default_file_mode"]
