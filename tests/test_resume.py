"""Checkpoint/resume of the training job (2 CPU ranks, gloo, tiny TokenBridge, fp32).

Reference: 10 uninterrupted steps at world 2 (ZeRO-3). Every resumed run must reproduce the reference's
per-step losses for the steps after its resume point: bit-identical at the same world size; at another
world size (same global batch as micro 4 × accum 2 on one rank) within 1e-6 relative (measured:
identical), and with exactly the same samples in every step. After the resumes, the run's TensorBoard
curves hold each step once, in order (events past the checkpoint are purged).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fixtures.engine import SAMPLES, TrainSetup
from tb_train.engine.checkpoint import read_latest
from tb_train.engine.ema import consolidate
from tb_train.train.job import EXIT_PREEMPTED

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _wait_for(paths: list[Path], job, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert all(p.poll() is None for p in job.procs), f"job ended early\n{job.log_text()}"
        assert time.monotonic() < deadline, f"timeout waiting for {paths}\n{job.log_text()}"
        time.sleep(0.1)


def _losses(setup: TrainSetup, name: str, steps) -> list[float]:
    rec = setup.steps(name)
    return [rec[s]["loss"] for s in steps]


def _ema(ckpt: Path) -> dict[str, torch.Tensor]:
    files = sorted(ckpt.glob("train_state_rank*.pt"))
    return consolidate(torch.load(f, weights_only=False)["ema"] for f in files)


def _events(run_dir: Path, axis: str = "") -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard" / axis), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _seed_run_from(setup: TrainSetup, source_run: str, tag: str, run: str) -> None:
    """A run folder whose only checkpoint is `tag` of another run (as if that run had stopped there)."""
    ckpt = setup.root / run / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(setup.root / source_run / "checkpoints" / tag, ckpt / tag)
    (ckpt / "latest").write_text(tag + "\n")


def _assert_epoch_covered_once(before: dict, after: dict, split: int) -> None:
    ids = [i for s in range(split) for i in before[s]] + [i for s in range(split, 10) for i in after[s]]
    assert len(ids) == SAMPLES and len(set(ids)) == SAMPLES, "a sample was skipped or seen twice"


def test_sigkill_then_sigterm_resume_bit_identical(train_setup):
    setup = train_setup
    ref = _losses(setup, "reference", range(1, 11))
    run_ckpt = setup.root / "preempted" / "checkpoints"

    job = setup.start("preempted", 2, name="killed", block_after=7, block_mode="kill")
    _wait_for([Path(f"{setup.record('killed')}.blocked{r}") for r in range(2)], job)
    job.signal(signal.SIGKILL)
    assert job.wait(60) == [-signal.SIGKILL] * 2
    assert read_latest(run_ckpt) == "step_00000005"

    job = setup.start("preempted", 2, name="termed", block_after=8, block_mode="term")
    _wait_for([Path(f"{setup.record('termed')}.blocked{r}") for r in range(2)], job)
    job.signal(signal.SIGTERM)
    assert job.wait(120) == [EXIT_PREEMPTED] * 2, job.log_text()
    assert read_latest(run_ckpt) == "step_00000008"
    assert min(setup.steps("termed")) == 6, "resume must continue at the step after the checkpoint"

    job = setup.start("preempted", 2, name="finished")
    assert job.wait(300) == [0, 0], job.log_text()
    assert min(setup.steps("finished")) == 9

    assert _losses(setup, "termed", [6, 7, 8]) == ref[5:8]
    assert _losses(setup, "finished", [9, 10]) == ref[8:10]
    ref_ids = setup.sample_ids("reference", 2)
    got = {**setup.sample_ids("termed", 2), **setup.sample_ids("finished", 2)}
    assert all(got[s] == ref_ids[s] for s in range(5, 10))
    # The EMA (ZeRO-3 partitions) survived two restarts exactly; older checkpoints were pruned (keep 2).
    ref_ema, got_ema = _ema(setup.reference / "checkpoints" / "step_00000010"), _ema(run_ckpt / "step_00000010")
    assert ref_ema.keys() == got_ema.keys()
    assert all(torch.equal(ref_ema[k], got_ema[k]) for k in ref_ema)
    assert sorted(p.name for p in run_ckpt.glob("step_*")) == ["step_00000008", "step_00000010"]
    # TensorBoard: the killed run's steps 6-7 and the preempted run's nothing-after-8 were purged; every
    # step appears once, in order, with the value of the run that the checkpoints continued.
    by_step = _events(setup.root / "preempted")
    assert [(e.step, e.value) for e in by_step.Scalars("loss")] == \
        [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(range(1, 11), ref)]
    assert [e.step for e in by_step.Images("samples/ema")] == [5, 10]
    by_epoch = _events(setup.root / "preempted", "by_epoch1000x")
    assert [e.step for e in by_epoch.Scalars("by_epoch1000x/loss")] == list(range(100, 1001, 100))


def test_resume_two_ranks_to_one(train_setup):
    setup = train_setup
    _seed_run_from(setup, "reference", "step_00000005", "to_one")
    job = setup.start("to_one", 1, "engine.grad_accum=2")
    assert job.wait(300) == [0], job.log_text()
    assert "universal: world 2 -> 1" in job.logs[0].read_text()
    assert min(setup.steps("to_one")) == 6
    np.testing.assert_allclose(_losses(setup, "to_one", range(6, 11)),
                               _losses(setup, "reference", range(6, 11)), rtol=1e-6, atol=0)
    ref_ids, got = setup.sample_ids("reference", 2), setup.sample_ids("to_one", 1)
    assert all(got[s] == ref_ids[s] for s in range(5, 10))
    _assert_epoch_covered_once(ref_ids, got, 5)


def test_resume_one_rank_to_two(train_setup):
    """ZeRO-2 this time (the reference is ZeRO-3), and the resumed run switches activation checkpointing
    on (parameter names gain the wrapper): the loss trajectory is the same."""
    setup = train_setup
    job = setup.start("from_one", 1, "engine.grad_accum=2", "engine.deepspeed=zero2", "run.max_steps=5",
                      name="from_one_a")
    assert job.wait(300) == [0], job.log_text()
    assert read_latest(setup.root / "from_one" / "checkpoints") == "step_00000005"
    job = setup.start("from_one", 2, "engine.deepspeed=zero2", "engine.activation_checkpointing=full",
                      name="from_one_b")
    assert job.wait(300) == [0, 0], job.log_text()
    assert "universal: world 1 -> 2" in job.logs[0].read_text()
    assert min(setup.steps("from_one_b")) == 6
    ref = _losses(setup, "reference", range(1, 11))
    got = _losses(setup, "from_one_a", range(1, 6)) + _losses(setup, "from_one_b", range(6, 11))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    first, second = setup.sample_ids("from_one_a", 1), setup.sample_ids("from_one_b", 2)
    _assert_epoch_covered_once(first, second, 5)


def test_train_state_records_cursor(train_setup):
    state = json.loads((train_setup.reference / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert state["step"] == 5 and state["world"] == 2 and state["zero_stage"] == 3
    assert state["states"]["data"] == {"epoch": 0, "consumed": 40, "seed": 0}
    assert state["states"]["train"] == {"step": 5, "nonfinite_total": 0, "nonfinite_in_a_row": 0}
    assert state["states"]["metrics"] == {"step": 5, "epoch_1000x": 500}
    ranks = [torch.load(train_setup.reference / "checkpoints" / "step_00000005" / f"train_state_rank0000{r}.pt",
                        weights_only=False) for r in range(2)]
    assert all(set(sd) == {"ema", "rng"} for sd in ranks)
    assert set(state["files"]) >= {"train_state_rank00000.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
