"""tb-submit against a real single-node Slurm on localhost (tests/fixtures/slurm.py), 2 CPU tasks.

Reference: the tiny TokenBridge job of fixtures.engine (ZeRO-3, fp32, 10 steps, checkpoints every 5) and
its uninterrupted 2-rank run (`train_setup`, float64 losses per step). `tb-submit train` of that job must
log the same losses. Preempted, time-limited and cancelled runs use the same training code through the
`fixtures.slurm` job module, whose hooks record per-step losses and hold every rank after a given step
until the signal arrives, so the interruption lands at a known step; across the attempts every step must
run exactly once (steps lost per preemption: 0) with the reference's losses bit for bit.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import numpy as np

from fixtures.engine import TrainSetup, read_jsonl
from tb_train.engine.checkpoint import read_latest
from tb_train.launch import records
from tb_train.launch.status import report
from tb_train.launch.submit import main as submit_main

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

CLUSTER = "slurm_debug"


@pytest.fixture(scope="module")
def setup(slurm_cluster, train_setup) -> TrainSetup:
    """The tiny job of fixtures.engine and its uninterrupted 2-rank reference run (float64 losses)."""
    return train_setup


def reference_losses(setup: TrainSetup) -> dict[int, float]:
    return {s: r["loss"] for s, r in setup.steps("reference").items()}


def submit(capsys, *argv: str) -> str:
    """Run tb-submit in-process; returns the job id it printed."""
    capsys.readouterr()
    code = submit_main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.split("submitted job ")[1].split()[0]


def only_job(run: Path) -> dict:
    jobs = records.read_jobs(run)
    assert len(jobs) == 1
    return jobs[0]


def tb_scalars(run: Path, tag: str = "loss") -> dict[int, float]:
    """step -> value of `tag` over every event file of the run (each attempt writes its own file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                assert e.step not in out, f"step {e.step} logged twice (a step ran twice)"
                out[e.step] = e.value
    return out


def task_results(run: Path, job_id: str, tasks: int = 2) -> list:
    import submitit

    return submitit.SlurmJob(folder=records.submit_dir(run) / "logs" / job_id, job_id=job_id,
                             tasks=list(range(tasks))).results()


def wait_blocked(record: Path, cluster, job_id: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not all(Path(f"{record}.blocked{r}").exists() for r in range(2)):
        assert cluster.queue(job_id), "job left the queue before reaching the hold step"
        assert time.monotonic() < deadline, "job did not reach the hold step in time"
        time.sleep(0.2)


def test_rank_environment_from_slurm(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "env"
    job_id = submit(capsys, "fixtures.slurm", "--cluster", CLUSTER, "--run-dir", str(run),
                    f"probe.env={tmp_path / 'ranks'}")
    slurm_cluster.wait_gone(job_id, 120)
    assert task_results(run, job_id) == [0, 0]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert {r["MASTER_PORT"] for r in ranks} == {str(20000 + int(job_id) % 20000)}
    script = Path(only_job(run)["sbatch"]).read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --ntasks-per-node=2" in script
    # --dry-run renders the script with submitit's private _make_sbatch_string: it must be the file the
    # real submission wrote (fails when a submitit release changes the function)
    code = submit_main(["fixtures.slurm", "--cluster", CLUSTER, "--run-dir", str(run), f"probe.env={tmp_path / 'ranks'}",
                        "--dry-run"])
    dry = capsys.readouterr().out
    assert code == 0 and script.strip() in dry


@pytest.mark.slow
def test_train_two_tasks(slurm_cluster, setup, capsys):
    run = setup.root / "slurm_train"
    t0 = time.time()
    job_id = submit(capsys, "train", "--config", str(setup.job), "--cluster", CLUSTER, f"run.dir={run}")
    slurm_cluster.wait_gone(job_id, 400)
    assert task_results(run, job_id) == [0, 0]
    state = json.loads((run / "checkpoints" / "step_00000010" / "train_state.json").read_text())
    assert state["world"] == 2 and state["step"] == 10
    assert read_latest(run / "checkpoints") == "step_00000010"
    losses = tb_scalars(run)
    assert losses == {s: float(np.float32(v)) for s, v in reference_losses(setup).items()}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    first_step_s = acc.Scalars("loss")[0].wall_time - t0
    attempts = records.read_attempts(run, job_id)
    assert [(a["attempt"], a["status"], a["outcome"]) for a in attempts] == [(0, 0, "finished")]
    text = report(run)
    assert f"train: job {job_id}" in text and "COMPLETED" in text and "last checkpoint step_00000010" in text
    code = json.loads((run / "submit" / "code.json").read_text())
    assert len(code["commit"]) == 40
    print(f"\nmeasured: submit -> first training step {first_step_s:.1f} s")


def _probe(setup: TrainSetup, name: str, *extra: str) -> tuple[Path, Path, list[str]]:
    run, record = setup.root / name, setup.record(name)
    argv = ["fixtures.slurm", "--config", str(setup.job), "--cluster", CLUSTER, f"run.dir={run}",
            f"probe.record={record}", *extra]
    return run, record, argv


def _assert_resumed_exactly(setup: TrainSetup, name: str, run: Path) -> None:
    """Every step ran exactly once across the attempts (no step lost or redone), with the losses of the
    uninterrupted reference run, bit for bit."""
    rows = read_jsonl(Path(f"{setup.record(name)}.steps0"))
    assert [r["step"] for r in rows] == list(range(1, 11)), f"steps run: {[r['step'] for r in rows]}"
    assert {r["step"]: r["loss"] for r in rows} == reference_losses(setup)
    assert sorted(tb_scalars(run)) == list(range(1, 11))


@pytest.mark.slow
def test_preempt_resumes_with_identical_losses(slurm_cluster, setup, capsys):
    run, record, argv = _probe(setup, "slurm_preempted", "probe.block_after=4")
    job_id = submit(capsys, *argv)
    wait_blocked(record, slurm_cluster, job_id)
    import submitit

    t0 = time.time()
    submitit.SlurmJob(folder=records.submit_dir(run) / "logs" / job_id, job_id=job_id)._interrupt()
    slurm_cluster.wait_gone(job_id, 400)
    assert task_results(run, job_id) == [0, 0]
    attempts = records.read_attempts(run, job_id)
    assert [(a["attempt"], a["status"], a["outcome"]) for a in attempts] == \
        [(0, 75, "requeued"), (1, 0, "finished")]
    assert "resumed from" in Path(records.task_logs(run, job_id, 2)[0]["out"]).read_text()
    _assert_resumed_exactly(setup, "slurm_preempted", run)
    print(f"\nmeasured: preempt -> finished (requeue released at once) {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_time_limit_requeues_and_completes(slurm_cluster, setup, capsys):
    """A 2-minute limit with USR2@30: Slurm signals once `end - now <= 30 + 30 s` at one of its 30-s
    checks, i.e. 60-90 s after the start (start-up to the first step took up to 42 s on the loaded
    2-core machine), while the job is held after step 3; the second attempt gets a fresh limit and ends."""
    run, record, argv = _probe(setup, "slurm_time_limit", "probe.block_after=3", "cluster.time_min=2",
                               "cluster.signal_grace_s=30", "cluster.max_requeues=2")
    job_id = submit(capsys, *argv)
    wait_blocked(record, slurm_cluster, job_id)
    slurm_cluster.wait_gone(job_id, 500)
    assert task_results(run, job_id) == [0, 0]
    attempts = records.read_attempts(run, job_id)
    assert [(a["attempt"], a["status"], a["outcome"]) for a in attempts] == \
        [(0, 75, "requeued"), (1, 0, "finished")]
    assert "attempt 1" in report(run)
    _assert_resumed_exactly(setup, "slurm_time_limit", run)


@pytest.mark.slow
def test_scancel_does_not_requeue(slurm_cluster, setup, capsys):
    run, record, argv = _probe(setup, "slurm_cancelled", "probe.block_after=3")
    job_id = submit(capsys, *argv)
    wait_blocked(record, slurm_cluster, job_id)
    assert slurm_cluster.run("scancel", job_id).returncode == 0
    slurm_cluster.wait_gone(job_id, 120, release=False)
    time.sleep(3)
    assert slurm_cluster.queue(job_id) == "", "a cancelled job came back"
    attempts = records.read_attempts(run, job_id)
    assert len(attempts) == 1 and attempts[0]["status"] == 75
    assert attempts[0]["outcome"].startswith("not requeued: job is ")
    assert read_latest(run / "checkpoints") == "step_00000003"
    state = json.loads((run / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["world"] == 2
    assert "FAILED" in report(run)


@pytest.mark.slow
def test_precompute_two_tasks_equals_one_process(slurm_cluster, tmp_path, capsys, image_dir, tiny_vae_dir):
    from tb_core.config import load_config
    from tb_train.data.precompute import PrecomputeConfig, run as precompute

    args = [f"input={image_dir}", f"vae.path={tiny_vae_dir}", "resolution=16", "batch_size=3",
            "samples_per_shard=5", "num_workers=0", "progress=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    precompute(load_config(PrecomputeConfig, None, args + [f"output={one}"]))
    job_id = submit(capsys, "precompute", "--cluster", CLUSTER, "--run-dir", str(tmp_path / "submit_run"),
                    *args, f"output={two}")
    slurm_cluster.wait_gone(job_id, 300)
    assert task_results(tmp_path / "submit_run", job_id) == [0, 0]
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    differ = [f for f in files if (one / f).read_bytes() != (two / f).read_bytes()]
    assert differ == []


@pytest.mark.parametrize("extra, expect", [
    (["cluster.partition=nope"], "tb-submit: error: sbatch: error: invalid partition specified: nope"),
    (["cluster.nodes=0"], "tb-submit: error: "),
    (["cluster.gpus=8"], "tb-submit: error: "),
    (["cluster.signal_grace_s=600"], "tb-submit: error: "),
])
def test_bad_options_one_line(slurm_cluster, capsys, tmp_path, extra, expect):
    capsys.readouterr()
    job = Path(__file__).resolve().parents[1] / "configs" / "jobs" / "imagenet256_H.yaml"
    code = submit_main(["train", "--config", str(job), "--cluster", CLUSTER, "--run-dir", str(tmp_path), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(expect) and err.count("\n") == 1, err


@pytest.mark.slow
def test_then_chains_with_afterok(slurm_cluster, tmp_path, capsys):
    run, chained = tmp_path / "chain", tmp_path / "chained.yaml"
    chained.write_text(f"probe: {{env: {tmp_path / 'second'}}}\n")
    capsys.readouterr()
    assert submit_main(["fixtures.slurm", "--cluster", CLUSTER, "--run-dir", str(run),
                        f"probe.env={tmp_path / 'first'}", "--then", f"fixtures.slurm={chained}"]) == 0
    first, second = records.read_jobs(run)
    assert second["dependency"] == f"afterok:{first['job_id']}"
    assert slurm_cluster.queue(second["job_id"]) == "PENDING Dependency"
    slurm_cluster.wait_gone(second["job_id"], 180)
    assert task_results(run, first["job_id"]) == task_results(run, second["job_id"]) == [0, 0]
    done = {d: max((tmp_path / d / f"rank{r}.json").stat().st_mtime for r in range(2)) for d in ("first", "second")}
    started = min(os.path.getmtime(p) for p in (tmp_path / "second").glob("rank*.json"))
    assert started >= done["first"]
