"""Checkpoint integrity: bytes changed after a save are found by their CRC-32, and a save that cannot
be written (a full disk) keeps `latest` and the previous checkpoint and stops every rank with one line.

The checkpoints are copies of the 2-rank ZeRO-3 reference run's (steps 5 and 10, fixtures/engine.py).
A flip is 4 bytes XOR 0xFF inside the data of one tensor, located in the file by its bytes, so the
file keeps its size and torch.load still reads it (only the checksum can tell). Losses after a fallback
or a rerun must equal the uninterrupted reference's bit for bit (same world size).

This file is also the worker script of the fault-injection run: `python tests/test_checkpoint_integrity.py
ARGS_JSON` trains like fixtures/engine.py's `train` mode with one rank's checkpoint writes failing.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from fixtures.engine import Job, TrainSetup
from tb_core.errors import CheckpointError
from tb_train.engine.checkpoint import (CHECKSUMS, LATEST, STATE_JSON, find_damage, plan_resume, read_latest,
                                        read_train_state)
from tb_train.engine.export import export
from tb_train.launch.status import last_checkpoint

pytestmark = [pytest.mark.distributed]   # the reference run has 2 ranks

# flip target -> (file of step_00000010, the rank that wrote it, the tensor inside it)
TARGETS = {
    "optimizer": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1,
                  lambda sd: sd["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]["exp_avg"]),
    "model": ("zero_pp_rank_0_mp_rank_00_model_states.pt", 0, lambda sd: sd["module"]["quantizer.values"]),
    "rng": ("train_state_rank00000.pt", 0, lambda sd: sd["rng"]["torch"]),
    "ema": ("train_state_rank00000.pt", 0,
            lambda sd: max((p["data"] for p in sd["ema"]["pieces"].values()), key=torch.numel)),
}
FAIL_TAG = "step_00000010"


def copy_checkpoints(setup: TrainSetup, run: str) -> Path:
    """A run folder holding a copy of the reference's checkpoints and config (latest = step 10)."""
    shutil.copytree(setup.reference / "checkpoints", setup.root / run / "checkpoints")
    shutil.copy(setup.reference / "config.yaml", setup.root / run / "config.yaml")
    return setup.root / run / "checkpoints"


def flip(tag_dir: Path, target: str) -> Path:
    """XOR 4 bytes in the middle of the target tensor's data; returns the file. Checks that the file kept its
    size and still loads, with exactly that tensor changed."""
    name, _, pick = TARGETS[target]
    path = tag_dir / name
    raw = bytearray(path.read_bytes())
    before = pick(torch.load(path, weights_only=False)).clone()
    needle = before.contiguous().view(torch.uint8).numpy().tobytes()
    assert raw.count(needle) == 1, f"the {target} tensor's bytes are not found once in {path}"
    at = raw.find(needle) + len(needle) // 2
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == len(raw)
    after = pick(torch.load(path, weights_only=False))
    assert after.shape == before.shape and not torch.equal(after, before)
    return path


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("tb-train: warning:")]


def errors_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("tb-train: error:")]


def losses(setup: TrainSetup, name: str, steps: range) -> list[float]:
    rec = setup.steps(name)
    return [rec[s]["loss"] for s in steps]


def test_each_rank_records_the_crc32_of_the_files_it_wrote(train_setup):
    tag_dir = train_setup.reference / "checkpoints" / "step_00000010"
    meta = read_train_state(tag_dir.parent, tag_dir.name)
    assert set(meta[CHECKSUMS]) == set(meta["files"]) and len(meta["files"]) == 6
    for rel, rec in meta[CHECKSUMS].items():
        writer = 0 if ("rank_0_" in rel or rel.endswith("00000.pt")) else 1
        assert rec["rank"] == writer, rel
        assert rec["crc32"] == f"{zlib.crc32((tag_dir / rel).read_bytes()):08x}", rel


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_flip_is_named_and_the_earlier_checkpoint_used(train_setup, target):
    ckpt = copy_checkpoints(train_setup, f"flip_{target}")
    recorded = read_train_state(ckpt, "step_00000010")[CHECKSUMS][TARGETS[target][0]]["crc32"]
    path = flip(ckpt / "step_00000010", target)
    writer = TARGETS[target][1]
    # each rank hashes the files its rank wrote: the writer finds it, the other rank does not look
    assert find_damage(ckpt / "step_00000010", share=(1 - writer, 2)) is None
    mismatch = find_damage(ckpt / "step_00000010", share=(writer, 2))
    assert mismatch == find_damage(ckpt / "step_00000010")
    assert mismatch.startswith(f"{path}: checksum mismatch (crc32 recorded {recorded}, now ")
    assert mismatch.endswith("): damaged after it was written") and recorded not in mismatch.split("now ")[1]
    warnings: list[str] = []
    plan = plan_resume(ckpt, world=2, stage=3, precision="fp32", warn=warnings.append)
    assert plan.tag == "step_00000005" and not plan.universal
    assert warnings == [f"checkpoint {ckpt / 'step_00000010'} is unusable: {mismatch}",
                        f"resuming from the earlier checkpoint {ckpt / 'step_00000005'} instead"]


def test_a_checkpoint_without_checksums_loads_on_sizes_with_a_warning(train_setup):
    """Written by the previous version (no `checksums`): it is used, changed bytes cannot be seen, and
    the resume, tb-export and tb-submit status say so in one line."""
    ckpt = copy_checkpoints(train_setup, "no_checksums")
    state = ckpt / "step_00000010" / STATE_JSON
    meta = json.loads(state.read_text())
    del meta[CHECKSUMS]
    state.write_text(json.dumps(meta))
    flip(ckpt / "step_00000010", "optimizer")
    warnings: list[str] = []
    assert plan_resume(ckpt, world=2, stage=3, precision="fp32", warn=warnings.append).tag == "step_00000010"
    assert warnings == [f"checkpoint {ckpt / 'step_00000010'} records no checksums (written by an older "
                        f"version): only file sizes were checked, changed bytes would go unnoticed"]
    assert last_checkpoint(ckpt.parent) == "step_00000010 (sizes checked; no checksums: written by an older version)"


def test_export_and_status_name_the_damaged_file(train_setup, tmp_path, capsys):
    ckpt = copy_checkpoints(train_setup, "export_damaged")
    path = flip(ckpt / "step_00000010", "ema")
    with pytest.raises(CheckpointError) as e:
        export(ckpt.parent, tmp_path / "model.safetensors")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: checksum mismatch (crc32 recorded ")
    assert not (tmp_path / "model.safetensors").exists()
    assert last_checkpoint(ckpt.parent) == f"step_00000010 (damaged: {find_damage(ckpt / 'step_00000010')})"
    # the earlier checkpoint is whole: exported with --tag, and status names it clean once it is latest
    export(ckpt.parent, tmp_path / "model5.safetensors", tag="step_00000005")
    assert (tmp_path / "model5.safetensors").is_file() and "warning" not in capsys.readouterr().err
    (ckpt / LATEST).write_text("step_00000005\n")
    assert last_checkpoint(ckpt.parent) == "step_00000005"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["optimizer", "model", "ema"])
def test_job_falls_back_past_a_flip_and_matches_the_uninterrupted_run(train_setup, target):
    """The issue's scenario: 4 bytes changed in a file of the newest checkpoint. The job names the file in
    one line (rank 0 prints it also when rank 1 found it), resumes from step 5, reproduces the reference's
    losses of steps 6-10 bit for bit and re-saves step 10 whole."""
    setup = train_setup
    ckpt = copy_checkpoints(setup, f"job_flip_{target}")
    path = flip(ckpt / "step_00000010", target)
    job = setup.start(f"job_flip_{target}", 2)
    assert job.wait(300) == [0, 0], job.log_text()
    log = job.logs[0].read_text()
    warnings = warnings_in(log)
    assert len(warnings) == 2 and f"{path}: checksum mismatch (crc32 recorded " in warnings[0], log
    assert "resuming from the earlier checkpoint" in warnings[1] and "step_00000005" in warnings[1]
    assert warnings_in(job.logs[1].read_text()) == []
    assert min(setup.steps(f"job_flip_{target}")) == 6
    assert losses(setup, f"job_flip_{target}", range(6, 11)) == losses(setup, "reference", range(6, 11))
    assert read_latest(ckpt) == "step_00000010" and find_damage(ckpt / "step_00000010") is None


def _assert_disk_full_stop(job: Job, ckpt: Path) -> str:
    """Every rank exited 2 with one line on rank 0 naming the folder and the errno; `latest` and step 5 are
    intact, the partial step-10 folder and its temporary files are gone. Returns the line."""
    assert job.wait(180) == [2, 2], job.log_text()
    logs = [p.read_text() for p in job.logs]
    assert all("Traceback" not in log for log in logs), job.log_text()
    errors = errors_in(logs[0])
    assert len(errors) == 1 and errors_in(logs[1]) == [], job.log_text()
    assert f"{ckpt / FAIL_TAG}: checkpoint not saved: writing " in errors[0]
    assert "[Errno 28] No space left on device (ENOSPC)" in errors[0]
    assert f"{LATEST} still names step_00000005" in errors[0]
    assert read_latest(ckpt) == "step_00000005" and not (ckpt / FAIL_TAG).exists()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("step_", "."))) == ["step_00000005"]
    assert find_damage(ckpt / "step_00000005") is None
    return errors[0]


@pytest.mark.slow
def test_a_failed_write_on_one_rank_stops_every_rank_and_keeps_latest(train_setup):
    """Fault injection: rank 1's writes of the second save (step 10) fail with ENOSPC, from its first
    file on (a DeepSpeed file, inside DeepSpeed's save). Rank 0, whose writes succeeded, must not hang in
    a barrier nor move `latest`; rank 0 prints rank 1's line. Rerun with space: it resumes from step 5
    and ends as the uninterrupted run."""
    setup = train_setup
    args = {"fail_rank": 1, "fail_tag": FAIL_TAG, "train": {"argv": setup.argv("disk_full"),
                                                             "record": str(setup.record("disk_full"))}}
    job = Job([__file__, json.dumps(args)], 2, setup.root / "log_disk_full")
    ckpt = setup.root / "disk_full" / "checkpoints"
    line = _assert_disk_full_stop(job, ckpt)
    assert "rank 1: " in line and "writing zero_pp_rank_1_mp_rank_00_model_states.pt failed" in line
    assert losses(setup, "disk_full", range(1, 11)) == losses(setup, "reference", range(1, 11))

    job = setup.start("disk_full", 2, name="disk_full_rerun")
    assert job.wait(300) == [0, 0], job.log_text()
    assert min(setup.steps("disk_full_rerun")) == 6
    assert losses(setup, "disk_full_rerun", range(6, 11)) == losses(setup, "reference", range(6, 11))
    assert read_latest(ckpt) == "step_00000010" and find_damage(ckpt / "step_00000010") is None


@pytest.mark.slow
def test_a_full_disk_for_real_stops_every_rank_and_keeps_latest(train_setup, tmp_path):
    """The checkpoints on a tmpfs with room for one checkpoint and a half: the save at step 5 fits, the one
    at step 10 runs out of space in whichever rank's write comes first (DeepSpeed's or ours). The state
    left is the one the fault-injection test resumes from (checked the same way), so the rerun is not
    repeated here."""
    setup = train_setup
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full disk is covered by the fault-injection test only")
    one = sum(p.stat().st_size for p in (setup.reference / "checkpoints" / "step_00000005").iterdir())
    size_kib = (one * 3 // 2 + (64 << 10)) >> 10    # + DeepSpeed's zero_to_fp32.py / zero_to_torch.py copies
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in this container ({mounted.stderr.strip()}): the full disk is "
                    f"covered by the fault-injection test only")
    try:
        ckpt = disk / "checkpoints"
        job = setup.start("tmpfs_full", 2, f"checkpoint.dir={ckpt}")
        _assert_disk_full_stop(job, ckpt)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)   # lazy: never fails on a busy mount


def _train_with_failing_writes(args: dict) -> int:
    """Worker: fixtures/engine.py's training run, where rank `fail_rank`'s atomic checkpoint writes into
    the folder `fail_tag` raise OSError(ENOSPC) — the per-rank save that DeepSpeed's files and the rank
    file both go through."""
    from fixtures.engine import _train
    import tb_train.engine.checkpoint as ckpt

    real = ckpt.atomic_write_stream

    def full_disk(path, write):
        if Path(path).parent.name == args["fail_tag"] and int(os.environ["RANK"]) == args["fail_rank"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    ckpt.atomic_write_stream = full_disk
    return _train(args["train"])


if __name__ == "__main__":
    sys.exit(_train_with_failing_writes(json.loads(sys.argv[1])))
