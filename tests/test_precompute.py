"""tb-precompute: same shards from 1 and 2 processes, exact resume after SIGKILL, bad input handling,
refusal to mix VAEs, tar input, stored quantizer indices, and the reader over the result."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.precompute import CORRUPT, make_tars, run_cli, tiny_vae
from tb_model.quantizer import DimensionwiseQuantizer, QuantizerConfig
from tb_core.config import load_config
from tb_train.data.precompute import PrecomputeConfig, launcher_ranks, main, run, sidecar_name
from tb_core.errors import InputError
from tb_core.fileio import sha256_file
from tb_train.data.shards import LatentShards, index_from_tar, index_name, shard_name

PER_SHARD = 5
BATCH = 3  # does not divide PER_SHARD: batches must still stop at shard boundaries


def _args(images: Path, out: Path, vae: Path, *extra: str) -> list[str]:
    return [f"input={images}", f"output={out}", f"vae.path={vae}", "resolution=16", f"batch_size={BATCH}",
            f"samples_per_shard={PER_SHARD}", "num_workers=0", "progress=false", *extra]


def _cfg(*args: str) -> PrecomputeConfig:
    return load_config(PrecomputeConfig, None, list(args))


def _all_samples(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    ds = LatentShards(folder)
    return {ds.key(i): ds.read(i) for i in range(len(ds))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_dir, tiny_vae_dir) -> Path:
    """One uninterrupted single-process run, in-process."""
    out = tmp_path_factory.mktemp("ref") / "lat"
    run(_cfg(*_args(image_dir, out, tiny_vae_dir)))
    return out


def test_layout_rejects_and_reader(reference, image_dir):
    manifest = json.loads((reference / "manifest.json").read_text())
    files = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    assert manifest["num_samples"] == len(files) - 2 and manifest["num_rejected"] == 2
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["resolution"] == 16
    assert [s["name"] for s in manifest["shards"]] == [shard_name(i) for i in range(-(-len(files) // PER_SHARD))]
    assert manifest["vae"]["latent_channels"] == 4 and manifest["vae"]["downsample"] == 2
    lines = (reference / "rejected.txt").read_text().splitlines()
    assert [ln.split("\t")[1] for ln in lines] == sorted(CORRUPT)
    assert all(len(ln.split("\t")) == 3 and ln.split("\t")[2] for ln in lines)

    samples = _all_samples(reference)  # every stored sample exactly once, keyed by sorted input position
    bad = {files.index(c) for c in CORRUPT}
    assert sorted(samples) == [f"{i:09d}" for i in range(len(files)) if i not in bad]
    for key, (moments, label) in samples.items():
        assert moments.shape == (2, 8, 8, 8) and moments.dtype == np.float16
        assert label == ["cat", "dog", "eel"].index(files[int(key)].split("/")[0])
    stats = json.loads((reference / "stats.json").read_text())
    means = np.stack([m[:, :4] for m, _ in samples.values()]).astype(np.float64) * 0.5  # scale 0.5
    np.testing.assert_allclose(stats["mean"], means.mean(axis=(0, 1, 3, 4)), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], means.std(axis=(0, 1, 3, 4)), rtol=1e-6)
    assert sorted(stats["channel_order"]) == [0, 1, 2, 3]


def test_flip_view_is_the_flipped_image(reference, tiny_vae_dir):
    """View 1 must be the encoding of the mirrored image (not of the image again)."""
    from tb_model.vae import VAEConfig, load_vae

    vae = load_vae(VAEConfig(path=str(tiny_vae_dir)))
    x = torch.linspace(-1, 1, 16).expand(1, 3, 16, 16)  # left-right asymmetric
    m = vae.encode(torch.cat([x, x.flip(-1)]))
    assert (m[0] - m[1]).abs().max() > 1e-3
    moments, _ = LatentShards(reference).read(0)
    assert (moments[0].astype(np.float32) != moments[1].astype(np.float32)).any()


@pytest.mark.distributed
def test_two_processes_make_the_same_shards(tmp_path, reference, image_dir, tiny_vae_dir):
    out = tmp_path / "lat"
    procs = [run_cli(_args(image_dir, out, tiny_vae_dir), env={"RANK": str(r), "WORLD_SIZE": "2",
                                                               "LOCAL_RANK": str(r)}) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    assert [s["name"] for s in got["shards"]] == [s["name"] for s in ref["shards"]]
    a, b = _all_samples(reference), _all_samples(out)
    assert sorted(a) == sorted(b)
    for key in a:  # same batch grouping and thread count here, so bit-identical is expected
        np.testing.assert_array_equal(a[key][0], b[key][0])
        assert a[key][1] == b[key][1]
    assert got == ref
    assert (out / "rejected.txt").read_text() == (reference / "rejected.txt").read_text()


_SLOW_WRITER = """
import sys, time
import tb_train.data.precompute as p
orig = p._write_shard_files
def slow(*a, **k):
    info = orig(*a, **k)
    time.sleep(1.0)  # the kill below must land while later shards are still pending
    return info
p._write_shard_files = slow
sys.exit(p.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_identical_folder(tmp_path, capsys, reference, image_dir, tiny_vae_dir):
    out = tmp_path / "lat"
    args = _args(image_dir, out, tiny_vae_dir)
    proc = run_cli(args, code=_SLOW_WRITER)
    deadline = time.time() + 180
    while len(list(out.glob("shard-*.json"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob("shard-*.json")))
    assert 2 <= done < len(json.loads((reference / "manifest.json").read_text())["shards"])
    # What a kill can leave behind besides finished shards: a half-written tar under its temporary name,
    # and a tar renamed just before the kill whose sidecar was never written.
    (out / f".{shard_name(done)}.99999.tmp").write_bytes(b"partial")
    (out / shard_name(done)).write_bytes(b"not a complete tar")
    assert main(args) == 0
    assert f"{done} of" in capsys.readouterr().out  # finished shards were skipped, not redone
    assert (out / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    assert (out / "stats.json").read_text() == (reference / "stats.json").read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_with_another_vae_or_setting_is_refused(tmp_path, reference, image_dir, tiny_vae_dir):
    other = tiny_vae(tmp_path / "other_vae")
    weights = other / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one weight changed → new identity
    with pytest.raises(InputError, match="VAE") as e:
        run(_cfg(*_args(image_dir, reference, other)))
    assert "\n" not in str(e.value) and str(reference) in str(e.value)
    with pytest.raises(InputError, match="resolution 16, this run has 32"):
        run(_cfg(*_args(image_dir, reference, tiny_vae_dir, "resolution=32")))


@pytest.mark.parametrize("case,expect", [("missing", "input not found"), ("empty", "no images found"),
                                         ("bad_key", "unknown key 'batchsize'"), ("bad_vae", "not found")])
def test_cli_one_line_errors(tmp_path, capsys, image_dir, tiny_vae_dir, case, expect):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    images = {"missing": tmp_path / "nope", "empty": tmp_path / "empty"}.get(case, image_dir)
    vae = tmp_path / "no_vae" if case == "bad_vae" else tiny_vae_dir
    extra = ["batchsize=2"] if case == "bad_key" else []
    assert main(_args(images, tmp_path / "out", vae, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tb-precompute: error:") and expect in err, err


def test_tar_input_matches_image_folder(tmp_path, reference, image_dir, tiny_vae_dir):
    tars = make_tars(image_dir, tmp_path / "tars")
    out = tmp_path / "lat"
    run(_cfg(*_args(tars, out, tiny_vae_dir, "num_workers=2")))  # tar members read in forked workers
    a, b = _all_samples(reference), _all_samples(out)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        assert a[key][1] == b[key][1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["0", "1", "2"] and manifest["num_rejected"] == 2
    names = [ln.split("\t")[1] for ln in (out / "rejected.txt").read_text().splitlines()]
    assert len(names) == 2 and all(n.startswith("part-") and ".tar:" in n for n in names)


def test_stored_indices_quantize_the_stored_means(tmp_path, image_dir, tiny_vae_dir):
    out = tmp_path / "lat"
    run(_cfg(*_args(image_dir, out, tiny_vae_dir, "store_indices=true", "quantizer.levels=16",
                    "samples_per_shard=100")))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantizer"] == {"levels": 16, "qmin": -5.0, "qmax": 5.0, "scheme": "gaussian"}
    q = DimensionwiseQuantizer.from_config(QuantizerConfig(levels=16))
    ds = LatentShards(out)
    for i in range(len(ds)):
        moments, _ = ds.read(i)
        idx = ds.read_indices(i)
        assert idx.dtype == np.uint8 and idx.shape == (2, 4, 8, 8)
        expect = q.quantize(torch.from_numpy(moments[:, :4]).float() * 0.5)
        np.testing.assert_array_equal(idx, expect.numpy())


def test_tampered_output_shard_is_named(tmp_path, reference):
    out = tmp_path / "copy"
    out.mkdir()
    for p in reference.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    data = bytearray((out / shard_name(2)).read_bytes())
    data[1024] ^= 1
    (out / shard_name(2)).write_bytes(bytes(data))
    with pytest.raises(InputError, match=shard_name(2)) as e:
        LatentShards(out)
    assert "\n" not in str(e.value)
    assert (out / sidecar_name(2)).is_file()


def test_main_leaves_environ_alone_and_files_follow_the_umask(tmp_path, image_dir, tiny_vae_dir):
    """A library caller's environment is not the job's to change; every file is as readable as the
    umask allows (JSON used to be 0600 beside 0644 tars). 027 is not the usual 022, so a hard-coded
    0644 would fail here."""
    before = dict(os.environ)
    old_mask = os.umask(0o027)
    try:
        assert main(_args(image_dir, tmp_path / "lat", tiny_vae_dir)) == 0
    finally:
        os.umask(old_mask)
    assert dict(os.environ) == before
    files = sorted(p for p in (tmp_path / "lat").iterdir())
    assert {p.name for p in files} >= {"manifest.json", "stats.json", "precompute.json", "rejected.txt",
                                       sidecar_name(0), shard_name(0)}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o640 for p in files}


@pytest.mark.parametrize("env,expect", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}, (5, 6, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "7", "SLURM_NTASKS": "9"}, (1, 2, 1)),
])
def test_launcher_ranks(env, expect):
    assert launcher_ranks(env) == expect


def test_bad_launcher_rank_is_one_line(tmp_path, capsys, monkeypatch, image_dir, tiny_vae_dir):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_args(image_dir, tmp_path / "lat", tiny_vae_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tb-precompute: error: launcher variables give rank 2 of world size 2"
    assert not (tmp_path / "lat").exists()


def test_config_by_packaged_name(tmp_path, capsys):
    """`--config precompute_demo` is the packaged job (works from any folder and from a plain install):
    the run gets past the config and stops at the input named by the override."""
    assert main(["--config", "precompute_demo", f"input={tmp_path / 'none'}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tb-precompute: error: {tmp_path / 'none'}: input not found (want an ImageFolder tree or webdataset tars)"
    assert main(["--config", "no_such_job", f"output={tmp_path / 'o'}"]) == 2
    assert "not a packaged name" in capsys.readouterr().err


def test_manifest_lists_each_index_and_the_sizes(reference):
    """Precompute writes each shard's member index beside it and lists sizes and sha256s in the manifest:
    what a restarted training job checks (sizes) and what verification hashes (both files)."""
    manifest = json.loads((reference / "manifest.json").read_text())
    for entry in manifest["shards"]:
        tar, index = reference / entry["name"], reference / index_name(entry["name"])
        assert entry["size"] == tar.stat().st_size and entry["sha256"] == sha256_file(tar)
        assert entry["index_size"] == index.stat().st_size and entry["index_sha256"] == sha256_file(index)
        np.testing.assert_array_equal(np.load(index), index_from_tar(tar))  # the index says what the tar says
        assert len(np.load(index)) == entry["count"]


def test_folder_from_before_indexes_is_refused_then_indexed_by_a_rerun(tmp_path, reference, image_dir,
                                                                      tiny_vae_dir):
    """A folder of the previous layout (no index files, manifest and sidecars without their fields) is
    refused in one line that names the fix; rerunning tb-precompute indexes the finished tars without
    encoding anything and gives the folder an uninterrupted run makes."""
    out = tmp_path / "old"
    out.mkdir()
    for p in reference.iterdir():
        if not p.name.endswith(".idx.npy"):
            (out / p.name).write_bytes(p.read_bytes())
    new_fields = ("size", "index_sha256", "index_size")
    for side in out.glob("shard-*.json"):
        info = json.loads(side.read_text())
        side.write_text(json.dumps({k: v for k, v in info.items() if k not in new_fields}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = [{k: v for k, v in e.items() if k not in new_fields} for e in manifest["shards"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError) as e:
        LatentShards(out)
    assert "rerun tb-precompute with the same settings" in str(e.value) and "\n" not in str(e.value)

    summary = run(_cfg(*_args(image_dir, out, tiny_vae_dir)))
    assert summary["encoded"] == 0 and summary["indexed_shards"] == summary["shards"] == len(manifest["shards"])
    assert (out / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    for entry in manifest["shards"]:
        name = index_name(entry["name"])
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert run(_cfg(*_args(image_dir, out, tiny_vae_dir)))["indexed_shards"] == 0  # once
