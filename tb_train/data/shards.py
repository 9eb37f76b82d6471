"""Latent shard format: writer, per-shard member index, and random-access reader.

A precomputed folder holds `shard-000000.tar`, `shard-000001.tar`, … (plain POSIX tars that
webdataset can stream), beside each tar its member index `shard-000000.idx.npy`, and `manifest.json`,
`stats.json` and `rejected.txt`. One sample in a tar is

    <key>.moments.npy   float16 [2, 2C, h, w]   view 0 = image, view 1 = its h-flip; mean ‖ logvar on axis 1
    <key>.cls           ascii int               class id
    <key>.indices.npy   uint8   [2, C, h, w]    optional, quantized scaled posterior means

where `key` is `%09d` of the sample's position in the sorted input list. Shard `s` holds the keys in
`[s·S, (s+1)·S)` minus rejected inputs, so a shard can hold fewer than S samples; the reader's index
is therefore dense over the stored samples (cumulative shard counts), not over keys.

The member index is written by the same call that writes the tar, so no reader ever scans tar headers:
one `INDEX_DTYPE` row per sample, in tar order, with the data offset, size and crc32 of each of its
members (size 0: member absent). A reader checks an index's `.npy` header once (one int per shard kept:
where its rows start) and then reads the one 56-byte row a sample needs, so its memory does not grow
with the number of samples; every read checks the member's crc32, so bytes damaged after precompute are
caught where they are read, whatever the start-up check did.

Tars are written byte-deterministically (fixed mtime/owner/mode, members in key order), so the same
moments always give the same sha256 — which is what lets a killed-and-rerun precompute reproduce the
manifest of an uninterrupted run exactly. The index is a function of the tar, so it is deterministic too.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections import OrderedDict
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
INDEX_SUFFIX = ".idx.npy"

# Members of a sample, with the tar-name extension each is stored under.
MEMBERS = {"moments": "moments.npy", "cls": "cls", "indices": "indices.npy"}
INDEX_DTYPE = np.dtype([("key", "<u8")] + [(f"{m}_{field}", kind) for m in MEMBERS
                                            for field, kind in (("offset", "<u8"), ("size", "<u4"),
                                                                ("crc32", "<u4"))])
_TAR_BLOCK = 512
_REFRESH_HINT = ("rerun tb-precompute with the same settings to write it (finished tars are indexed from "
                "their own bytes, not re-encoded)")


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def index_name(shard: str) -> str:
    """`shard-000000.tar` -> `shard-000000.idx.npy`, the member index beside it."""
    return shard.removesuffix(".tar") + INDEX_SUFFIX


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _key_number(path: Path, key: str) -> int:
    """The input index a key stands for; the index stores it as a number, so a key must be `%09d`."""
    if not key.isdigit() or sample_key(int(key)) != key:
        raise ValueError(f"{path.name}: sample key {key!r} is not %09d of an input index")
    return int(key)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int, int]:
    """Append one file member -> (data offset in the tar, size, crc32 of the data)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK  # tarfile pads the data to whole blocks
    return tar.offset - padded, len(data), zlib.crc32(data)


def _set_span(rows: np.ndarray, i: int, member: str, span: tuple[int, int, int]) -> None:
    """Store (offset, size, crc32) of sample i's `member` in its index row."""
    for field, value in zip(("offset", "size", "crc32"), span):
        rows[f"{member}_{field}"][i] = value


def write_index(tar_path: str | os.PathLike, rows: np.ndarray) -> Path:
    """Write the member index of `tar_path` (INDEX_DTYPE rows) atomically beside it."""
    tar_path = Path(tar_path)
    path = tar_path.with_name(index_name(tar_path.name))
    return atomic_write_with(path, lambda f: np.save(f, rows.astype(INDEX_DTYPE, copy=False), allow_pickle=False))


def write_shard(
    path: str | os.PathLike,
    samples: Sequence[tuple[str, np.ndarray, int]],
    indices: Sequence[np.ndarray] | None = None,
) -> str:
    """Write one shard and its member index atomically and return the tar's sha256 hex digest.

    samples: (key, moments float16 [2, 2C, h, w], class id) in key order; indices (optional): one uint8
    [2, C, h, w] array per sample. The tar is written under a temporary name in the same folder,
    fsynced, then renamed, so `path` either does not exist or is complete; then the index the same way
    (a caller that marks a shard done does so after both).
    """
    path = Path(path)
    if indices is not None and len(indices) != len(samples):
        raise ValueError(f"{path.name}: {len(indices)} index arrays for {len(samples)} samples")
    rows = np.zeros(len(samples), INDEX_DTYPE)

    def write(f: IO[bytes]) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (key, moments, label) in enumerate(samples):
                if moments.dtype != np.float16 or moments.ndim != 4 or moments.shape[0] != 2:
                    raise ValueError(
                        f"{path.name}: sample {key}: moments must be float16 [2, 2C, h, w], "
                        f"got {moments.dtype} {list(moments.shape)}")
                members = {"moments": _npy_bytes(moments), "cls": str(int(label)).encode("ascii")}
                if indices is not None:
                    members["indices"] = _npy_bytes(indices[i].astype(np.uint8))
                rows["key"][i] = _key_number(path, key)
                for member, data in members.items():
                    _set_span(rows, i, member, _add_member(tar, f"{key}.{MEMBERS[member]}", data))

    atomic_write_with(path, write)
    write_index(path, rows)
    return sha256_file(path)


class PreadFiles:
    """Positioned reads through per-process file descriptors, at most `max_open` of them.

    os.pread has no shared file offset, so forked DataLoader workers can read the same files; a forked
    or unpickled copy notices the new pid and opens its own descriptors. The least recently read file is
    closed beyond `max_open`, so random reads over thousands of shards stay under the open-file limit.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self.max_open = max_open

    def read(self, path: str | os.PathLike, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        key = os.fspath(path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(key, os.O_RDONLY)
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        return {"_fds": OrderedDict(), "_pid": self._pid, "max_open": self.max_open}

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


def index_from_tar(path: str | os.PathLike) -> np.ndarray:
    """The member index of an existing shard tar, from its own bytes (one header scan, every member read
    once for its crc32): how tb-precompute indexes a folder written before indexes existed."""
    path = Path(path)
    entries = index_tar(path)
    rows = np.zeros(len(entries), INDEX_DTYPE)
    files = PreadFiles(max_open=1)
    try:
        for i, e in enumerate(entries):
            rows["key"][i] = _key_number(path, e.key)
            for member, span in (("moments", e.moments), ("cls", e.cls), ("indices", e.indices)):
                if span is not None:
                    _set_span(rows, i, member, (*span, zlib.crc32(files.read(path, *span))))
    finally:
        files.close()
    return rows


def read_manifest(folder: str | os.PathLike) -> tuple[dict, str]:
    """Load and sanity-check manifest.json of a precomputed folder -> (manifest, sha256 of its bytes: what
    a run records it verified); a one-line InputError otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: not found (not a precomputed latent folder, or precompute unfinished)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, hashlib.sha256(raw).hexdigest()


def _file_size(path: Path, what: str, expected: int | None, missing_hint: str = "") -> None:
    """One stat: `path` must exist and (when the manifest lists it) have the size precompute wrote."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{what} {path}: missing{missing_hint}") from None
    if expected is not None and size != expected:
        raise InputError(f"{what} {path}: {size} bytes, manifest says {expected} (truncated or replaced "
                         "after precompute)")


class LatentShards:
    """Random-access reader over a precomputed latent folder.

    Index i (0 <= i < len) runs densely over the stored samples in key order; (shard, position) comes from
    the cumulative shard counts (O(shards) memory). Opening checks that every tar and index exists with
    the size the manifest lists (one stat each, no reading); `verify_share` hashes. A read is one
    positioned read of the sample's index row (the index header is checked on the shard's first read)
    and one per member, each checked against the member's crc32, through at most `open_files` descriptors
    (`PreadFiles`, safe in forked DataLoader workers).
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = True, manifest: dict | None = None,
                 open_files: int = 64):
        """verify: hash every shard and index now (`verify_share(0, 1)`); a job splits this over its ranks
        instead. manifest: use this dict instead of reading manifest.json (precompute reads its shards
        back before it publishes the manifest; `manifest_sha256` is then None)."""
        self.folder = Path(folder)
        if manifest is None:
            manifest, self.manifest_sha256 = read_manifest(self.folder)
        else:
            self.manifest_sha256 = None
        self.manifest = manifest
        stats_path = self.folder / STATS
        self.stats: dict | None = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        self.shards: list[dict] = self.manifest["shards"]
        self._ends = list(np.cumsum([s["count"] for s in self.shards], dtype=np.int64).tolist())
        if self._ends and self._ends[-1] != self.manifest["num_samples"]:
            raise InputError(f"{self.folder / MANIFEST}: shard counts sum to {self._ends[-1]}, "
                             f"num_samples says {self.manifest['num_samples']}")
        for s in self.shards:
            _file_size(self.folder / s["name"], "shard", s.get("size"))
            _file_size(self.folder / index_name(s["name"]), "shard index", s.get("index_size"),
                       " (this folder was written before member indexes, or the file was deleted); "
                       + _REFRESH_HINT)
        self._rows_start: dict[int, int] = {}   # shard -> byte offset of its index's first row
        self._files = PreadFiles(open_files)
        if verify:
            self.verify_share(0, 1)

    def verify_share(self, rank: int, world: int) -> int:
        """sha256 of shards rank, rank + world, … (tar, and index where the manifest lists its sha256)
        against the manifest -> bytes hashed; a mismatch is a one-line InputError naming the file. The
        ranks of a job together hash every shard exactly once."""
        hashed = 0
        for s in self.shards[rank::world]:
            files = [("shard", self.folder / s["name"], s["sha256"])]
            if "index_sha256" in s:
                files.append(("shard index", self.folder / index_name(s["name"]), s["index_sha256"]))
            for what, path, want in files:
                got = sha256_file(path)
                hashed += path.stat().st_size
                if got != want:
                    raise InputError(f"{what} {path}: sha256 mismatch (manifest {want[:12]}…, "
                                     f"file {got[:12]}…): corrupt or modified")
        return hashed

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """Dense sample index -> (shard id, offset within that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return shard, index - start

    def _index_start(self, shard: int, path: Path) -> int:
        """Where the rows of the shard's index start; its header is read and checked on first use."""
        start = self._rows_start.get(shard)
        if start is not None:
            return start
        count = self.shards[shard]["count"]
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version != (1, 0):
                    raise ValueError(f"npy format {version}, expected (1, 0)")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                start = f.tell()
        except (OSError, ValueError) as e:
            raise InputError(f"shard index {path}: unreadable ({e}); {_REFRESH_HINT}") from None
        if dtype != INDEX_DTYPE or shape != (count,) or fortran:
            raise InputError(f"shard index {path}: {dtype} {list(shape)} is not the member index of {count} "
                             f"samples; {_REFRESH_HINT}")
        self._rows_start[shard] = start
        return start

    def _row(self, index: int) -> tuple[int, tuple[int, ...]]:
        """-> (shard, the sample's index row as ints: key, then offset, size, crc32 of each member)."""
        shard, offset = self.locate(index)
        path = self.folder / index_name(self.shards[shard]["name"])
        start = self._index_start(shard, path)
        raw = self._files.read(path, start + offset * INDEX_DTYPE.itemsize, INDEX_DTYPE.itemsize)
        if len(raw) != INDEX_DTYPE.itemsize:
            raise InputError(f"shard index {path}: row {offset} cut short (truncated after precompute); "
                             + _REFRESH_HINT)
        return shard, np.frombuffer(raw, INDEX_DTYPE)[0].tolist()

    @staticmethod
    def _span(row: tuple[int, ...], member: str) -> tuple[int, int, int]:
        """(offset, size, crc32) of `member` in an index row (size 0: the sample has no such member)."""
        first = 1 + 3 * list(MEMBERS).index(member)
        return row[first], row[first + 1], row[first + 2]

    def _member(self, shard: int, row: tuple[int, ...], member: str) -> bytes:
        """The member's bytes, checked against the size and crc32 precompute recorded."""
        offset, size, crc = self._span(row, member)
        path = self.folder / self.shards[shard]["name"]
        data = self._files.read(path, offset, size)
        if len(data) != size or zlib.crc32(data) != crc:
            what = (f"{len(data)} of {size} bytes (truncated after precompute)" if len(data) != size
                    else "crc32 mismatch (damaged after precompute)")
            raise InputError(f"{path}: member {sample_key(row[0])}.{MEMBERS[member]}: {what}")
        return data

    def key(self, index: int) -> str:
        """The sample's key (`%09d` of its position in the sorted input list)."""
        return sample_key(self._row(index)[1][0])

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """-> (moments float16 [2, 2C, h, w], class id) of dense sample `index`."""
        shard, row = self._row(index)
        moments = np.load(io.BytesIO(self._member(shard, row, "moments")), allow_pickle=False)
        return moments, int(self._member(shard, row, "cls"))

    def image_mean(self, index: int) -> np.ndarray:
        """-> posterior mean of the image view (not the flip), float32 [C, h, w], unscaled: the one place
        that knows the moments layout (view 0 = image; mean ‖ logvar on the channel axis)."""
        moments = self.read(index)[0]
        return moments[0, :moments.shape[1] // 2].astype(np.float32)

    def read_indices(self, index: int) -> np.ndarray | None:
        """-> stored quantizer indices uint8 [2, C, h, w] of `index`, or None if none were stored."""
        shard, row = self._row(index)
        if self._span(row, "indices")[1] == 0:
            return None
        return np.load(io.BytesIO(self._member(shard, row, "indices")), allow_pickle=False)

    def close(self) -> None:
        self._files.close()


__all__ = [
    "FORMAT", "MANIFEST", "STATS", "REJECTED", "INDEX_SUFFIX", "INDEX_DTYPE", "MEMBERS", "shard_name",
    "index_name", "sample_key", "PreadFiles", "write_shard", "write_index", "tar_members", "group_members",
    "index_tar", "index_from_tar", "read_manifest", "LatentShards",
]
