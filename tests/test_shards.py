"""Latent shard format: deterministic writer, per-shard member index, dense random-access reader that never
scans tar headers, crc32 of every member read, sizes at open, sha256 verification split over ranks."""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import tb_train.data.shards as shards_module
from tb_core.errors import InputError
from tb_core.fileio import sha256_file
from tb_train.data.shards import (
    FORMAT, INDEX_DTYPE, MEMBERS, LatentShards, PreadFiles, index_from_tar, index_name, sample_key, shard_name,
    write_shard,
)

from fixtures.precompute import counting_sha256


def _moments(key: int) -> np.ndarray:
    rng = np.random.default_rng(key)
    return rng.standard_normal((2, 8, 2, 2)).astype(np.float16)


def _write_folder(folder, keys_per_shard: list[list[int]], with_indices: bool = False) -> dict:
    """Shards holding the given global keys (gaps = rejected inputs) + a manifest over them, with the
    sizes and index sha256s tb-precompute lists."""
    shards = []
    for s, keys in enumerate(keys_per_shard):
        samples = [(sample_key(k), _moments(k), k % 3) for k in keys]
        idx = [np.full((2, 4, 2, 2), k % 256, np.uint8) for k in keys] if with_indices else None
        tar, index = folder / shard_name(s), folder / index_name(shard_name(s))
        sha = write_shard(tar, samples, idx)
        shards.append({"name": shard_name(s), "count": len(keys), "sha256": sha, "size": tar.stat().st_size,
                       "index_sha256": sha256_file(index), "index_size": index.stat().st_size})
    manifest = {"format": FORMAT, "num_samples": sum(len(k) for k in keys_per_shard),
                "samples_per_shard": 4, "shards": shards,
                "vae": {"identity": "x", "scale": 1.0, "latent_channels": 4, "downsample": 4},
                "resolution": 8, "classes": ["a", "b", "c"], "num_rejected": 0, "quantizer": None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_every_sample_read_once_in_key_order(tmp_path):
    keys = [[0, 1, 2, 3], [4, 6, 7], [8, 9]]  # key 5 was rejected: shard 1 is short
    _write_folder(tmp_path, keys, with_indices=True)
    ds = LatentShards(tmp_path)
    flat = [k for ks in keys for k in ks]
    assert len(ds) == len(flat)
    assert [ds.locate(i) for i in range(len(ds))] == [(s, o) for s, ks in enumerate(keys) for o in range(len(ks))]
    for i in np.random.default_rng(0).permutation(len(ds)):  # random access order
        moments, label = ds.read(int(i))
        k = flat[i]
        assert ds.key(int(i)) == sample_key(k)
        np.testing.assert_array_equal(moments, _moments(k))
        assert moments.dtype == np.float16 and label == k % 3
        assert (ds.read_indices(int(i)) == k % 256).all()
    with pytest.raises(IndexError):
        ds.read(len(ds))


def test_tars_are_webdataset_readable_and_deterministic(tmp_path):
    samples = [(sample_key(k), _moments(k), k) for k in range(3)]
    a = write_shard(tmp_path / "a.tar", samples)
    b = write_shard(tmp_path / "b.tar", samples)
    assert a == b == sha256_file(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [f"{sample_key(k)}.{ext}" for k in range(3) for ext in ("moments.npy", "cls")]
    streamed = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in streamed] == [sample_key(k) for k in range(3)]
    for k, s in enumerate(streamed):
        np.testing.assert_array_equal(s["moments.npy"], _moments(k))
        assert s["cls"] == k
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_tampered_shard_is_named_in_one_line(tmp_path):
    _write_folder(tmp_path, [[0, 1], [2, 3]])
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        LatentShards(tmp_path)
    msg = str(e.value)
    assert shard_name(1) in msg and "sha256" in msg and "\n" not in msg
    LatentShards(tmp_path, verify=False)  # opt-out still opens


def test_missing_manifest_and_missing_shard(tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        LatentShards(tmp_path)
    _write_folder(tmp_path, [[0], [1]])
    (tmp_path / shard_name(0)).unlink()
    with pytest.raises(InputError, match=shard_name(0)):
        LatentShards(tmp_path, verify=False)


def test_bad_moments_rejected_and_no_partial_file(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        write_shard(tmp_path / "x.tar", [("000000000", np.zeros((2, 8, 2, 2), np.float32), 0)])
    assert list(tmp_path.iterdir()) == []


def test_member_index_round_trip(tmp_path):
    keys = [0, 1, 5]
    samples = [(sample_key(k), _moments(k), k % 3) for k in keys]
    quantized = [np.full((2, 4, 2, 2), k, np.uint8) for k in keys]
    write_shard(tmp_path / "a.tar", samples, quantized)
    rows = np.load(tmp_path / "a.idx.npy", allow_pickle=False)
    assert rows.dtype == INDEX_DTYPE and rows["key"].tolist() == keys
    np.testing.assert_array_equal(rows, index_from_tar(tmp_path / "a.tar"))  # what the tar's own headers say
    raw = (tmp_path / "a.tar").read_bytes()
    for row, (key, moments, label), q in zip(rows, samples, quantized):
        def member(name: str) -> bytes:
            data = raw[row[f"{name}_offset"]:row[f"{name}_offset"] + row[f"{name}_size"]]
            assert zlib.crc32(data) == row[f"{name}_crc32"]
            return data
        np.testing.assert_array_equal(np.load(io.BytesIO(member("moments"))), moments)
        assert int(member("cls")) == label
        np.testing.assert_array_equal(np.load(io.BytesIO(member("indices"))), q)
    write_shard(tmp_path / "b.tar", samples, quantized)  # deterministic, like the tar
    assert (tmp_path / "b.idx.npy").read_bytes() == (tmp_path / "a.idx.npy").read_bytes()
    write_shard(tmp_path / "c.tar", samples)
    assert (np.load(tmp_path / "c.idx.npy")["indices_size"] == 0).all()
    with pytest.raises(ValueError, match="not %09d"):
        write_shard(tmp_path / "d.tar", [("cat-1", _moments(0), 0)])


def _open_under(folder: Path) -> list[str]:
    """Names of the files under `folder` this process holds open."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor of the listing itself, closed by now
            continue
        if target.startswith(str(folder)):
            names.append(Path(target).name)
    return sorted(names)


def test_reads_never_scan_tar_headers_and_hold_few_files(tmp_path, monkeypatch):
    keys = [list(range(4 * s, 4 * s + 4)) for s in range(12)]
    _write_folder(tmp_path, keys, with_indices=True)

    def scan(*args, **kwargs):
        raise AssertionError("the reader scanned tar headers")

    monkeypatch.setattr(shards_module, "tar_members", scan)
    monkeypatch.setattr(tarfile, "open", scan)
    ds = LatentShards(tmp_path, open_files=3)
    for i in np.random.default_rng(0).permutation(len(ds)):
        moments, label = ds.read(int(i))
        np.testing.assert_array_equal(moments, _moments(int(i)))
        assert label == i % 3 and ds.key(int(i)) == sample_key(int(i)) and (ds.read_indices(int(i)) == i).all()
    assert len(_open_under(tmp_path)) == 3  # the most recently read files only, not two per shard
    assert str(tmp_path) not in Path("/proc/self/maps").read_text()  # nothing mapped either


def test_open_files_are_bounded(tmp_path):
    for k in range(5):
        (tmp_path / f"{k}.bin").write_bytes(bytes([k]) * 8)
    files = PreadFiles(max_open=2)
    assert [files.read(tmp_path / f"{k}.bin", 3, 2) for k in range(5)] == [bytes([k]) * 2 for k in range(5)]
    assert _open_under(tmp_path) == ["3.bin", "4.bin"]
    files.close()


@pytest.mark.parametrize("member", list(MEMBERS))
def test_damaged_member_is_one_line_naming_shard_and_member(tmp_path, member):
    """One payload byte flipped (same size, so opening's size check passes) is found by the read."""
    _write_folder(tmp_path, [[0, 1], [2, 3]], with_indices=True)
    tar = tmp_path / shard_name(1)
    row = np.load(tmp_path / index_name(shard_name(1)))[1]
    raw = bytearray(tar.read_bytes())
    raw[int(row[f"{member}_offset"] + row[f"{member}_size"]) - 1] ^= 0x01
    tar.write_bytes(bytes(raw))
    ds = LatentShards(tmp_path, verify=False)
    ds.read(2), ds.read_indices(2)  # the other sample of that shard is intact
    with pytest.raises(InputError) as e:
        ds.read_indices(3) if member == "indices" else ds.read(3)
    assert str(e.value) == f"{tar}: member 000000003.{MEMBERS[member]}: crc32 mismatch (damaged after precompute)"


def test_sizes_are_checked_at_open_without_hashing(tmp_path, monkeypatch):
    _write_folder(tmp_path, [[0, 1], [2, 3]])
    hashed = counting_sha256(monkeypatch)
    LatentShards(tmp_path, verify=False)
    assert hashed == []
    for name in (shard_name(1), index_name(shard_name(0))):
        path = tmp_path / name
        intact = path.read_bytes()
        path.write_bytes(intact[:-100])
        with pytest.raises(InputError) as e:
            LatentShards(tmp_path, verify=False)
        assert str(e.value).endswith(f"{path}: {len(intact) - 100} bytes, manifest says {len(intact)} (truncated "
                                     "or replaced after precompute)") and hashed == []
        path.write_bytes(intact)


def test_folder_without_member_index_is_refused_with_the_fix(tmp_path):
    _write_folder(tmp_path, [[0, 1], [2, 3]])
    index = tmp_path / index_name(shard_name(1))
    intact = index.read_bytes()
    index.unlink()
    with pytest.raises(InputError) as e:
        LatentShards(tmp_path, verify=False)
    msg = str(e.value)
    assert msg.startswith(f"shard index {index}: missing") and "rerun tb-precompute" in msg and "\n" not in msg
    index.write_bytes(b"\x00" * len(intact))  # same size, not an index
    ds = LatentShards(tmp_path, verify=False)
    ds.read(0)
    with pytest.raises(InputError, match=f"shard index {index}: unreadable.*rerun tb-precompute"):
        ds.read(2)
    index.write_bytes(intact[:-10])  # a manifest without sizes (hand-written): found at the read
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["size"], entry["index_size"], entry["index_sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = LatentShards(tmp_path, verify=False)
    ds.read(2)
    with pytest.raises(InputError, match=f"shard index {index}: row 1 cut short.*rerun tb-precompute"):
        ds.read(3)


def test_verify_share_hashes_every_file_once_across_ranks(tmp_path, monkeypatch):
    manifest = _write_folder(tmp_path, [[k] for k in range(7)])
    ds = LatentShards(tmp_path, verify=False)
    hashed = counting_sha256(monkeypatch)
    shares = []
    for rank in range(3):
        hashed.clear()
        nbytes = ds.verify_share(rank, 3)
        shares.append(list(hashed))
        assert nbytes == sum((tmp_path / name).stat().st_size for name in hashed)
    names = [[s["name"], index_name(s["name"])] for s in manifest["shards"]]
    assert shares == [[n for pair in names[rank::3] for n in pair] for rank in range(3)]
    index = tmp_path / index_name(shard_name(4))
    raw = bytearray(index.read_bytes())
    raw[-1] ^= 0x01
    index.write_bytes(bytes(raw))
    ds.verify_share(0, 3)  # shard 4 is rank 1's
    with pytest.raises(InputError, match=f"shard index {index}: sha256 mismatch"):
        ds.verify_share(1, 3)
