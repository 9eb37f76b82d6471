"""Latent shard format: deterministic writer, dense random-access reader, sha256 verification."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds


from tb_core.errors import InputError
from tb_core.fileio import sha256_file
from tb_train.data.shards import (
    FORMAT, LatentShards, sample_key, shard_name, write_shard,
)


def _moments(key: int) -> np.ndarray:
    rng = np.random.default_rng(key)
    return rng.standard_normal((2, 8, 2, 2)).astype(np.float16)


def _write_folder(folder, keys_per_shard: list[list[int]], with_indices: bool = False) -> dict:
    """Shards holding the given global keys (gaps = rejected inputs) + a manifest over them."""
    shards = []
    for s, keys in enumerate(keys_per_shard):
        samples = [(sample_key(k), _moments(k), k % 3) for k in keys]
        idx = [np.full((2, 4, 2, 2), k % 256, np.uint8) for k in keys] if with_indices else None
        sha = write_shard(folder / shard_name(s), samples, idx)
        shards.append({"name": shard_name(s), "count": len(keys), "sha256": sha})
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
