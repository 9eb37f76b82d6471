"""Damaged checkpoints: each kind of damage is named in one line and the newest complete earlier
checkpoint is used; a job stops with status 2 only when none is usable.

The checkpoints are copies of the 2-rank ZeRO-3 reference run's (steps 5 and 10, fixtures/engine.py).
"""
from __future__ import annotations

import shutil

import pytest

from fixtures.engine import TrainSetup
from tb_core.errors import CheckpointError
from tb_train.engine.checkpoint import LATEST, STATE_JSON, find_damage, plan_resume, prune
from tb_train.train.job import EXIT_BAD_INPUT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]   # the reference run has 2 ranks

# damage -> (file of step_00000010 it hits, how)
DAMAGES = {
    "model": ("zero_pp_rank_0_mp_rank_00_model_states.pt", "truncate"),
    "optimizer": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncate"),
    "rank_file": ("train_state_rank00001.pt", "truncate"),
    "train_state": (STATE_JSON, "delete"),
}


def copy_checkpoints(setup: TrainSetup, run: str):
    """A run folder holding a copy of the reference's checkpoints (steps 5 and 10, latest = 10)."""
    ckpt = setup.root / run / "checkpoints"
    shutil.copytree(setup.reference / "checkpoints", ckpt)
    return ckpt


def damage(tag_dir, what: str) -> None:
    name, how = DAMAGES[what]
    path = tag_dir / name
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("what", list(DAMAGES))
def test_each_damage_is_named_and_the_earlier_checkpoint_used(train_setup, what):
    ckpt = copy_checkpoints(train_setup, f"damaged_{what}")
    assert find_damage(ckpt / "step_00000010") is None and find_damage(ckpt / "step_00000005") is None
    damage(ckpt / "step_00000010", what)
    warnings: list[str] = []
    plan = plan_resume(ckpt, world=2, stage=3, precision="fp32", warn=warnings.append)
    assert plan.tag == "step_00000005" and plan.meta["step"] == 5 and not plan.universal
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert str(ckpt / "step_00000010" / DAMAGES[what][0]) in warnings[0]
    assert ("is missing" if what == "train_state" else "truncated") in warnings[0]
    assert "resuming from the earlier checkpoint" in warnings[1] and "step_00000005" in warnings[1]


def test_no_usable_checkpoint_is_an_error(train_setup):
    ckpt = copy_checkpoints(train_setup, "all_damaged")
    damage(ckpt / "step_00000010", "optimizer")
    damage(ckpt / "step_00000005", "rank_file")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step_00000010.*truncated") as e:
        plan_resume(ckpt, world=2, stage=3, precision="fp32", warn=None)
    assert "\n" not in str(e.value)


def test_latest_missing_or_incomplete_saves(train_setup):
    """Without `latest`, only folders with train_state.json count (a kill during the first save starts
    over); a folder newer than `latest` (a save killed half-way) is ignored, and pruned at the next save."""
    ckpt = copy_checkpoints(train_setup, "no_latest")
    (ckpt / LATEST).unlink()
    assert plan_resume(ckpt, world=1, stage=3, precision="fp32", warn=None).tag == "step_00000010"
    (ckpt / "step_00000010" / STATE_JSON).unlink()
    (ckpt / "step_00000005" / STATE_JSON).unlink()
    assert plan_resume(ckpt, world=1, stage=3, precision="fp32", warn=None) is None

    ckpt = copy_checkpoints(train_setup, "newer_than_latest")
    (ckpt / LATEST).write_text("step_00000005\n")
    plan = plan_resume(ckpt, world=1, stage=3, precision="fp32", warn=None)
    assert plan.tag == "step_00000005" and plan.universal           # world 2 -> 1 needs a universal load
    prune(ckpt, keep_last=2)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000005"]


def test_job_falls_back_and_matches_the_uninterrupted_run(train_setup):
    """A truncated optimizer file in the newest checkpoint: the job warns in one line, resumes from step 5
    and reproduces the reference's losses of steps 6-10 bit for bit."""
    setup = train_setup
    ckpt = copy_checkpoints(setup, "fallback")
    damage(ckpt / "step_00000010", "optimizer")
    job = setup.start("fallback", 2)
    assert job.wait(300) == [0, 0], job.log_text()
    log = job.logs[0].read_text()
    warnings = [line for line in log.splitlines() if line.startswith("tb-train: warning:")]
    assert len(warnings) == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in warnings[0], log
    assert min(setup.steps("fallback")) == 6
    ref = setup.steps("reference")
    assert [setup.steps("fallback")[s]["loss"] for s in range(6, 11)] == [ref[s]["loss"] for s in range(6, 11)]
    assert find_damage(ckpt / "step_00000010") is None             # re-saved whole


def test_job_without_a_usable_checkpoint_exits_2(train_setup):
    setup = train_setup
    ckpt = copy_checkpoints(setup, "unusable")
    damage(ckpt / "step_00000010", "train_state")
    damage(ckpt / "step_00000005", "model")
    job = setup.start("unusable", 1, "engine.grad_accum=2")
    assert job.wait(300) == [EXIT_BAD_INPUT], job.log_text()
    log = job.logs[0].read_text()
    errors = [line for line in log.splitlines() if line.startswith("tb-train: error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0] and "Traceback" not in log, log
    assert not (setup.root / "unusable" / "tensorboard").exists()
