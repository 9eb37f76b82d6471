"""Latent shard format: writer and random-access reader.

A precomputed folder holds `shard-000000.tar`, `shard-000001.tar`, … (plain POSIX tars that
webdataset can stream), `manifest.json`, `stats.json` and `rejected.txt`. One sample in a tar is

    <key>.moments.npy   float16 [2, 2C, h, w]   view 0 = image, view 1 = its h-flip; mean ‖ logvar on axis 1
    <key>.cls           ascii int               class id
    <key>.indices.npy   uint8   [2, C, h, w]    optional, quantized scaled posterior means

where `key` is `%09d` of the sample's position in the sorted input list. Shard `s` holds the keys in
`[s·S, (s+1)·S)` minus rejected inputs, so a shard can hold fewer than S samples; the reader's index
is therefore dense over the stored samples (cumulative shard counts), not over keys.

Tars are written byte-deterministically (fixed mtime/owner/mode, members in key order), so the same
moments always give the same sha256 — which is what lets a killed-and-rerun precompute reproduce the
manifest of an uninterrupted run exactly.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from tb_core.errors import InputError
from tb_core.fileio import atomic_write_with, sha256_file

FORMAT = "tokenbridge-latents/1"
MANIFEST = "manifest.json"
STATS = "stats.json"
REJECTED = "rejected.txt"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | os.PathLike,
    samples: Sequence[tuple[str, np.ndarray, int]],
    indices: Sequence[np.ndarray] | None = None,
) -> str:
    """Write one shard atomically and return its sha256 hex digest.

    samples: (key, moments float16 [2, 2C, h, w], class id) in key order; indices (optional): one uint8
    [2, C, h, w] array per sample. The tar is written under a temporary name in the same folder,
    fsynced, then renamed, so `path` either does not exist or is complete.
    """
    path = Path(path)
    if indices is not None and len(indices) != len(samples):
        raise ValueError(f"{path.name}: {len(indices)} index arrays for {len(samples)} samples")
    def write(f: IO[bytes]) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (key, moments, label) in enumerate(samples):
                if moments.dtype != np.float16 or moments.ndim != 4 or moments.shape[0] != 2:
                    raise ValueError(
                        f"{path.name}: sample {key}: moments must be float16 [2, 2C, h, w], "
                        f"got {moments.dtype} {list(moments.shape)}")
                _add_member(tar, f"{key}.moments.npy", _npy_bytes(moments))
                _add_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
                if indices is not None:
                    _add_member(tar, f"{key}.indices.npy", _npy_bytes(indices[i].astype(np.uint8)))

    atomic_write_with(path, write)
    return sha256_file(path)


class PreadFiles:
    """Positioned reads through per-process file descriptors.

    os.pread has no shared file offset, so forked DataLoader workers can read the same files; a forked
    or unpickled copy notices the new pid and opens its own descriptors.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def read(self, path: str | os.PathLike, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        key = os.fspath(path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(key, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {"_fds": {}, "_pid": self._pid}

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class _Entry:
    """Byte ranges of one sample's members inside its tar (offset, size); indices may be absent."""
    key: str
    moments: tuple[int, int]
    cls: tuple[int, int]
    indices: tuple[int, int] | None


def tar_members(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Scan a tar's headers once (no member data is read) -> [(name, data offset, size)] of its files."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"tar {path}: unreadable ({e})") from None


def group_members(members: list[tuple[str, int, int]]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Group tar members into webdataset samples: key = name up to the first dot of the base name,
    extension = the rest -> [(key, {ext: (offset, size)})] in tar order."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in members:
        head, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        groups.setdefault(f"{head}/{stem}" if head else stem, {})[ext] = (offset, size)
    return list(groups.items())


def index_tar(path: str | os.PathLike) -> list[_Entry]:
    """A shard's samples with their members' byte ranges, in tar order (headers scanned once)."""
    entries = []
    for key, g in group_members(tar_members(path)):
        if "moments.npy" not in g or "cls" not in g:
            raise InputError(f"shard {path}: sample {key} lacks moments.npy or cls")
        entries.append(_Entry(key, g["moments.npy"], g["cls"], g.get("indices.npy")))
    return entries


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load and sanity-check manifest.json of a precomputed folder (one-line InputError otherwise)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: not found (not a precomputed latent folder, or precompute unfinished)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class LatentShards:
    """Random-access reader over a precomputed latent folder.

    Index i (0 <= i < len) runs densely over the stored samples in key order. Each shard's tar headers
    are scanned once, on first access to that shard; a read is then one positioned read per member
    (`PreadFiles`, safe in forked DataLoader workers).
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = True, manifest: dict | None = None):
        """manifest: use this dict instead of reading manifest.json (precompute reads its shards back
        before it publishes the manifest)."""
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        stats_path = self.folder / STATS
        self.stats: dict | None = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        self.shards: list[dict] = self.manifest["shards"]
        self._ends = list(np.cumsum([s["count"] for s in self.shards], dtype=np.int64).tolist())
        if self._ends and self._ends[-1] != self.manifest["num_samples"]:
            raise InputError(f"{self.folder / MANIFEST}: shard counts sum to {self._ends[-1]}, "
                             f"num_samples says {self.manifest['num_samples']}")
        for s in self.shards:
            path = self.folder / s["name"]
            if not path.is_file():
                raise InputError(f"shard {path}: missing")
            if verify:
                got = sha256_file(path)
                if got != s["sha256"]:
                    raise InputError(f"shard {path}: sha256 mismatch (manifest {s['sha256'][:12]}…, "
                                     f"file {got[:12]}…): corrupt or modified")
        self._index: dict[int, list[_Entry]] = {}
        self._files = PreadFiles()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """Dense sample index -> (shard id, offset within that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return shard, index - start

    def _entries(self, shard: int) -> list[_Entry]:
        if shard not in self._index:
            path = self.folder / self.shards[shard]["name"]
            entries = index_tar(path)
            if len(entries) != self.shards[shard]["count"]:
                raise InputError(f"shard {path}: holds {len(entries)} samples, manifest says "
                                 f"{self.shards[shard]['count']}")
            self._index[shard] = entries
        return self._index[shard]

    def _pread(self, shard: int, span: tuple[int, int]) -> bytes:
        return self._files.read(self.folder / self.shards[shard]["name"], *span)

    def key(self, index: int) -> str:
        """The sample's key (`%09d` of its position in the sorted input list)."""
        shard, offset = self.locate(index)
        return self._entries(shard)[offset].key

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """-> (moments float16 [2, 2C, h, w], class id) of dense sample `index`."""
        shard, offset = self.locate(index)
        e = self._entries(shard)[offset]
        moments = np.load(io.BytesIO(self._pread(shard, e.moments)), allow_pickle=False)
        return moments, int(self._pread(shard, e.cls))

    def image_mean(self, index: int) -> np.ndarray:
        """-> posterior mean of the image view (not the flip), float32 [C, h, w], unscaled: the one place
        that knows the moments layout (view 0 = image; mean ‖ logvar on the channel axis)."""
        moments = self.read(index)[0]
        return moments[0, :moments.shape[1] // 2].astype(np.float32)

    def read_indices(self, index: int) -> np.ndarray | None:
        """-> stored quantizer indices uint8 [2, C, h, w] of `index`, or None if none were stored."""
        shard, offset = self.locate(index)
        e = self._entries(shard)[offset]
        if e.indices is None:
            return None
        return np.load(io.BytesIO(self._pread(shard, e.indices)), allow_pickle=False)

    def close(self) -> None:
        self._files.close()


__all__ = [
    "FORMAT", "MANIFEST", "STATS", "REJECTED", "shard_name", "sample_key",
    "PreadFiles", "write_shard", "tar_members", "group_members", "index_tar", "read_manifest", "LatentShards",
]
