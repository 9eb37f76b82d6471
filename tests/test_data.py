"""The world-size-independent data cursor: coverage per epoch, equal global batches across world/accum,
exact resume (also at another world size or global batch), epoch rollover, view choice, bad input;
verification once per run split over the ranks, and training stopped by a member damaged after it."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.data import NUM_CLASSES, SCALE, decode_rows, write_latent_folder
from fixtures.precompute import counting_sha256
from tb_core.errors import ConfigError, InputError
from tb_train.data.loader import VERIFIED_MARKER, DataConfig, LatentLoader, epoch_order, epoch_views
from tb_train.data.shards import index_name, sample_key, shard_name

N = 50  # samples in the folder; not a multiple of the global batches below, so tails are dropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(write_latent_folder(tmp_path_factory.mktemp("latents"), N, samples_per_shard=8))


def loaders(folder, world, accum, micro=3, seed=0, workers=0, hflip=True):
    cfg = DataConfig(path=folder, micro_batch=micro, num_workers=workers, seed=seed, verify=False, hflip=hflip)
    return [LatentLoader(cfg, r, world, accum) for r in range(world)]


def global_step(ranks) -> list[tuple[int, int]]:
    """One step on every rank -> [(sample index, view)] of the global batch in micro_id order."""
    micro = sorted((mb for lo in ranks for mb in lo.next_step()), key=lambda mb: mb.micro_id)
    assert [mb.micro_id for mb in micro] == list(range(len(micro)))
    rows = []
    for mb in micro:
        idx, views = decode_rows(mb.moments)
        assert mb.moments.dtype == torch.float32 and mb.labels.dtype == torch.int64
        assert mb.labels.tolist() == [i % NUM_CLASSES for i in idx]
        rows += list(zip(idx, views))
    return rows


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_every_sample_once_per_epoch_across_ranks(folder, world, accum):
    ranks = loaders(folder, world, accum)
    g = 3 * world * accum
    assert all(lo.steps_per_epoch == N // g and lo.scale == SCALE for lo in ranks)
    seen = [i for _ in range(N // g) for i, _ in global_step(ranks)]
    assert len(seen) == len(set(seen)) == (N // g) * g
    assert seen == epoch_order(0, 0, N)[:len(seen)].tolist()   # the global order, not a per-rank one
    assert {lo.epoch for lo in ranks} == {1} and {lo.consumed for lo in ranks} == {0}


def test_same_global_batches_for_world2_accum1_and_world1_accum2(folder):
    a, b = loaders(folder, world=2, accum=1), loaders(folder, world=1, accum=2)
    for _ in range(12):  # crosses the epoch boundary (8 steps per epoch)
        assert global_step(a) == global_step(b)


def test_workers_return_batches_in_order(folder):
    plain, workers = loaders(folder, 2, 1), loaders(folder, 2, 1, workers=2)
    for _ in range(10):
        assert global_step(plain) == global_step(workers)
    for lo in workers:
        lo.close()


def test_state_round_trip_mid_epoch(folder):
    ref = loaders(folder, 2, 1)
    for _ in range(3):
        global_step(ref)
    states = [lo.state_dict() for lo in ref]
    assert states[0] == states[1] == {"epoch": 0, "consumed": 18, "seed": 0}
    resumed = loaders(folder, 2, 1)
    for lo, sd in zip(resumed, json.loads(json.dumps(states))):
        lo.load_state_dict(sd)
    for _ in range(7):
        assert global_step(resumed) == global_step(ref)


@pytest.mark.parametrize("world_after,accum_after,micro_after", [(1, 2, 3), (4, 1, 3), (1, 1, 5)])
def test_resume_at_another_world_size_neither_repeats_nor_skips(folder, world_after, accum_after,
                                                                micro_after):
    before = loaders(folder, 2, 1)
    seen = [i for _ in range(3) for i, _ in global_step(before)]
    after = loaders(folder, world_after, accum_after, micro=micro_after)
    for lo in after:
        lo.load_state_dict(before[0].state_dict())
    while after[0].epoch == 0:
        seen += [i for i, _ in global_step(after)]
    assert len(seen) == len(set(seen))
    assert seen == epoch_order(0, 0, N)[:len(seen)].tolist()        # continued exactly where it stopped
    g = micro_after * world_after * accum_after
    assert N - g < len(seen) <= N                                     # only a tail smaller than G dropped
    if g == 6:  # same global batch: identical to a run that never changed world size
        ref = loaders(folder, 2, 1)
        assert [i for _ in range(N // 6) for i, _ in global_step(ref)] == seen


def test_load_with_larger_global_batch_that_no_longer_fits_rolls_over(folder):
    lo = loaders(folder, 1, 1, micro=20)[0]
    lo.load_state_dict({"epoch": 2, "consumed": 36, "seed": 0})   # 36 + 20 > 50
    assert lo.state_dict() == {"epoch": 3, "consumed": 0, "seed": 0}


def test_epoch_rollover_gives_a_new_order_and_views(folder):
    (lo,) = loaders(folder, 1, 1, micro=10)
    epochs = []
    for _ in range(2):
        epochs.append([row for _ in range(lo.steps_per_epoch) for row in global_step([lo])])
        assert lo.consumed == 0
    assert lo.epoch == 2 and lo.samples_seen == 2 * 50
    global_step([lo])
    assert lo.samples_seen == 110 and lo.state_dict() == {"epoch": 2, "consumed": 10, "seed": 0}
    assert [i for i, _ in epochs[1]] == epoch_order(0, 1, N)[:50].tolist()
    assert [i for i, _ in epochs[0]] != [i for i, _ in epochs[1]]
    for e, rows in enumerate(epochs):
        assert [v for _, v in rows] == epoch_views(0, e, N)[[i for i, _ in rows]].tolist()


def test_view_choice_is_balanced_deterministic_and_seeded():
    v = epoch_views(0, 0, 20000)
    assert abs(v.mean() - 0.5) < 0.015
    assert np.array_equal(v, epoch_views(0, 0, 20000))
    assert np.array_equal(v[:100], epoch_views(0, 0, 100))    # a sample's view does not depend on N
    assert 0.4 < (v != epoch_views(0, 1, 20000)).mean() < 0.6  # independent across epochs
    assert 0.4 < (v != epoch_views(1, 0, 20000)).mean() < 0.6  # and seeds
    assert not np.array_equal(epoch_order(0, 0, 100), epoch_order(1, 0, 100))


def test_hflip_off_shows_only_the_image_in_the_same_order(folder):
    flipped, plain = loaders(folder, 1, 1, micro=10)[0], loaders(folder, 1, 1, micro=10, hflip=False)[0]
    a = [row for _ in range(10) for row in global_step([flipped])]
    b = [row for _ in range(10) for row in global_step([plain])]
    assert [i for i, _ in a] == [i for i, _ in b]            # the order does not depend on the views
    assert {v for _, v in a} == {0, 1} and {v for _, v in b} == {0}


def test_changed_seed_on_resume_is_an_error(folder):
    (lo,) = loaders(folder, 1, 1, seed=1)
    with pytest.raises(ConfigError, match="seed"):
        lo.load_state_dict({"epoch": 0, "consumed": 3, "seed": 0})


def test_bad_input_gives_one_line_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="not found") as e:
        LatentLoader(DataConfig(path=str(tmp_path / "nope")), 0, 1, 1)
    with pytest.raises(ConfigError, match="exceeds the 50 samples") as e:
        loaders(folder, world=4, accum=2, micro=7)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="manifest.json"):
        LatentLoader(DataConfig(path=str(tmp_path)), 0, 1, 1)
    bad = write_latent_folder(tmp_path / "bad", 10, samples_per_shard=4)
    (bad / "shard-000001.tar").write_bytes(b"x" * 512)
    with pytest.raises(InputError, match="shard-000001.tar.*sha256"):
        LatentLoader(DataConfig(path=str(bad)), 0, 1, 1)
    with pytest.raises(ValueError, match="micro_batch"):
        DataConfig(path=folder, micro_batch=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_without_verify_is_one_line_naming_the_shard(tmp_path, workers):
    """data.verify=false skips the sha256 check; a truncated shard must still surface as one InputError
    line naming it, also when it is read inside a DataLoader worker process."""
    bad = write_latent_folder(tmp_path / "bad", 24, samples_per_shard=8)
    shard = bad / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    (lo,) = loaders(str(bad), 1, 1, micro=24 // 2, workers=workers)
    with pytest.raises(InputError, match="shard-000001.tar") as e:
        for _ in range(4):
            lo.next_step()
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    lo.close()


def test_verification_once_per_run_split_over_ranks(tmp_path, monkeypatch):
    data = write_latent_folder(tmp_path / "data", 40, samples_per_shard=5)   # 8 shards
    run = tmp_path / "run"
    hashed = counting_sha256(monkeypatch)
    tars = [shard_name(s) for s in range(8)]

    def start(world: int, verify: bool = True) -> tuple[list[LatentLoader], list[list[str]]]:
        """One start of the run: every rank's loader -> (loaders, files each rank hashed)."""
        cfg = DataConfig(path=str(data), micro_batch=2, num_workers=0, verify=verify)
        loaders, shares = [], []
        for rank in range(world):
            hashed.clear()
            loaders.append(LatentLoader(cfg, rank, world, 1, run_dir=run))
            shares.append(list(hashed))
        return loaders, shares

    loaders, shares = start(2)
    assert shares == [tars[0::2], tars[1::2]]                       # each rank half, together all, once
    assert [lo.verified_bytes for lo in loaders] == [sum((data / t).stat().st_size for t in share)
                                                     for share in shares]
    loaders[1].next_step()
    assert not (run / VERIFIED_MARKER).exists()                    # rank 0 records it, at its first step
    loaders[0].next_step()
    marker = json.loads((run / VERIFIED_MARKER).read_text())
    assert marker["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    assert marker["num_shards"] == 8

    for world in (2, 1):                                            # restart, requeue at another world size
        loaders, shares = start(world)
        assert shares == [[]] * world and [lo.verified_bytes for lo in loaders] == [0] * world
        for lo in loaders:
            lo.next_step()

    manifest = json.loads((data / "manifest.json").read_text())
    manifest["classes"][0] = "renamed"                              # another manifest: verify again
    (data / "manifest.json").write_text(json.dumps(manifest))
    loaders, shares = start(2)
    assert shares == [tars[0::2], tars[1::2]]
    loaders[0].next_step()
    assert json.loads((run / VERIFIED_MARKER).read_text())["manifest_sha256"] == loaders[0].shards.manifest_sha256
    assert start(2)[1] == [[], []]

    (run / VERIFIED_MARKER).unlink()
    loaders, shares = start(1, verify=False)                        # data.verify=false: no hashing, no marker
    loaders[0].next_step()
    assert shares == [[]] and not (run / VERIFIED_MARKER).exists()


def test_damaged_share_fails_on_its_rank_only(tmp_path):
    """Each rank finds the damage in its own share; the job combines them (`agreed` around `prepare`)."""
    data = write_latent_folder(tmp_path / "data", 20, samples_per_shard=5)
    shard = data / shard_name(3)
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cfg = DataConfig(path=str(data), micro_batch=2, num_workers=0)
    LatentLoader(cfg, 0, 2, 1, run_dir=tmp_path / "run")
    with pytest.raises(InputError, match=f"shard {shard}: sha256 mismatch"):
        LatentLoader(cfg, 1, 2, 1, run_dir=tmp_path / "run")


def _flip_payload_byte(folder: Path, index: int, samples_per_shard: int) -> str:
    """Flip the last byte of sample `index`'s moments inside its tar (same size) -> the tar's name."""
    name = shard_name(index // samples_per_shard)
    row = np.load(folder / index_name(name))[index % samples_per_shard]
    assert row["key"] == index
    raw = bytearray((folder / name).read_bytes())
    raw[int(row["moments_offset"] + row["moments_size"]) - 1] ^= 0x01
    (folder / name).write_bytes(bytes(raw))
    return name


@pytest.mark.slow
@pytest.mark.distributed
def test_member_damaged_after_a_verified_start_stops_training_in_one_line(train_setup):
    """A run's first start hashes its data and records it; the data is then damaged in place (same size).
    The restart hashes nothing, and the read in a DataLoader worker stops the job: exit 2 on both ranks,
    one line naming shard and member."""
    from fixtures.engine import SAMPLES

    setup = train_setup
    data = setup.root / "data_damaged_later"
    shutil.copytree(setup.data, data)
    first = setup.start("damaged_later", 2, f"data.path={data}", "data.num_workers=1", "run.max_steps=2",
                        name="damaged_later_1")
    assert first.wait(300) == [0, 0], first.log_text()
    assert (setup.root / "damaged_later" / VERIFIED_MARKER).is_file()
    victim = int(epoch_order(0, 0, SAMPLES)[40])                    # read at step 6 (global batch 8)
    name = _flip_payload_byte(data, victim, samples_per_shard=20)
    again = setup.start("damaged_later", 2, f"data.path={data}", "data.num_workers=1", name="damaged_later_2")
    assert again.wait(300) == [2, 2], again.log_text()
    log = again.logs[0].read_text()
    errors = [line for line in log.splitlines() if line.startswith("tb-train: error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f"{data / name}: member {sample_key(victim)}.moments.npy: crc32 mismatch (damaged after precompute)"), log
    assert "Traceback" not in log and "sha256" not in log
    assert "tb-train: error:" not in again.logs[1].read_text()
    assert sorted(setup.steps("damaged_later_2")) == [3, 4, 5]      # resumed at 2, stopped before step 6


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_shard_damaged_in_rank_1_share_stops_both_ranks_before_any_step(train_setup, with_checkpoint):
    """Also with checkpoints to resume from: rank 1 failing its data check must not leave rank 0 waiting
    in the checkpoint verification's collective (that pairing hung before resume planning was split out
    of `prepare`)."""
    setup, name = train_setup, f"bad_share_{int(with_checkpoint)}"
    data = setup.root / f"data_{name}"
    shutil.copytree(setup.data, data)
    if with_checkpoint:
        shutil.copytree(setup.reference / "checkpoints", setup.root / name / "checkpoints")
    shard = data / shard_name(1)                                    # shards 1, 3: rank 1's share
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    job = setup.start(name, 2, f"data.path={data}")
    assert job.wait(300) == [2, 2], job.log_text()
    errors = [line for line in job.logs[0].read_text().splitlines() if line.startswith("tb-train: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"tb-train: error: rank 1: shard {shard}: sha256 mismatch"), \
        job.log_text()
    assert setup.steps(name) == {} and not (setup.root / name / VERIFIED_MARKER).exists()
