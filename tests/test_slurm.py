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
import re
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


def task_results(run: Path, job_id: str, tasks: int = 2, timeout: float = 60) -> list:
    """The tasks' return values. Called once the job left the queue: a result file still missing after
    `timeout` means the last attempt died without one (submitit's own wait would poll for ever without
    sacct), so fail with the attempts and the end of every task log instead."""
    import submitit

    job = submitit.SlurmJob(folder=records.submit_dir(run) / "logs" / job_id, job_id=job_id,
                            tasks=list(range(tasks)))
    deadline = time.monotonic() + timeout
    while not all(job.task(t).paths.result_pickle.exists() for t in range(tasks)):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {f}\n{Path(f).read_text()[-600:]}"
                             for t in records.task_logs(run, job_id, tasks) for f in t.values() if Path(f).exists())
            raise AssertionError(f"job {job_id} left the queue without results; attempts "
                                 f"{records.read_attempts(run, job_id)}\n{logs}")
        time.sleep(0.5)
    return job.results()


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
    # the job's run locks (one per rank, tb_core.runlock) name their last holder; `run` takes none
    locks = sorted(p.name for p in two.glob(".tb.lock*"))
    assert locks == [".tb.lock", ".tb.lock.rank00001"]
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*")
                           if p.is_file() and p.name not in locks)
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


# ---------------------------------------------------------------------- requeue of the other jobs
# tb-precompute, tb-sample and tb-eval have no step boundary and no save: on a requeue they are killed
# (or, on SIGUSR2, rank 0 lets submitit requeue the job and exit) and the next attempt reruns the same
# call, which skips every output already complete. Each test below holds the real job (fixtures.slurm's
# `probe.hold`) once every rank has part of its output on disk, interrupts it the way Slurm/submitit do,
# lets the requeue run and compares the result with an uninterrupted run byte for byte.

def attempt_log(run: Path, job_id: str, attempt: int, task: int) -> str:
    """stdout of one task in one attempt (the attempt record holds where that attempt begins in the log)."""
    records_ = records.read_attempts(run, job_id)
    start = records_[attempt]["log_offsets"][task]["out"]
    end = records_[attempt + 1]["log_offsets"][task]["out"] if attempt + 1 < len(records_) else None
    text = Path(records.task_logs(run, job_id, 2)[task]["out"]).read_bytes()
    return text[start:end].decode(errors="replace")


def stamps(paths) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): a file rewritten by the next attempt (atomic rename) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def held_submit(capsys, run: Path, record: Path, job: str, after: int, *argv: str) -> str:
    return submit(capsys, "fixtures.slurm", "--cluster", CLUSTER, "--run-dir", str(run), f"probe.hold={job}",
                  f"probe.hold_after={after}", f"probe.record={record}", *argv)


def leftovers(folder: Path) -> list[str]:
    """Hidden files other than the run locks (whose holder info names the last pid): temporaries a killed
    attempt left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.startswith(".tb.lock"))


def interrupt(run: Path, job_id: str, how: str, cluster) -> None:
    """Interrupt a running job as the scheduler does: "usr2" = the time-limit warning alone (what
    `--signal=USR2@N` sends), "preempt" = submitit's preemption (SIGTERM, then SIGUSR2), "requeue" =
    `scontrol requeue` (Slurm's own requeue, as PreemptMode=REQUEUE: SIGTERM, SIGKILL after KillWait)."""
    import submitit

    if how == "requeue":
        # requeue held, release a moment later: a requeued job that slurmd is asked to start within the
        # second of the requeue is killed as "Job credential revoked" (a Slurm race seen once here)
        assert cluster.run("scontrol", "requeuehold", job_id).returncode == 0
        time.sleep(2)
        assert cluster.run("scontrol", "release", job_id).returncode == 0
    else:
        submitit.SlurmJob(folder=records.submit_dir(run) / "logs" / job_id, job_id=job_id)._interrupt(
            timeout=how == "usr2")


@pytest.fixture(scope="module")
def precompute_reference(tmp_path_factory) -> tuple[list[str], Path]:
    """The demo precompute (1797 digits, 200 per shard -> 9 shards) run uninterrupted in this process:
    (the arguments both runs share, its output folder). A rank's shards are the same bytes for any
    world size (test_precompute_two_tasks_equals_one_process)."""
    from tb_core.config import load_config
    from tb_train.data.precompute import PrecomputeConfig, run as precompute
    from tb_train.recipes import config_path

    root = tmp_path_factory.mktemp("precompute_requeue")
    args = [f"input=demo:{root / 'images'}", "samples_per_shard=200", "progress=false"]
    precompute(load_config(PrecomputeConfig, config_path("precompute_demo", "jobs"), args + [f"output={root / 'ref'}"]))
    return args, root / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_precompute_requeued_mid_run_equals_uninterrupted(slurm_cluster, precompute_reference, tmp_path, capsys,
                                                          how):
    """Both ranks hold after their 2nd shard (4 of 9 on disk), then the time-limit warning (usr2: rank 0
    requeues through submitit and exits, rank 1 goes on until Slurm stops it) or `scontrol requeue`
    (SIGTERM stops the decode workers and with them the job). The next attempt must skip the finished
    shards (their files untouched) and end with the files of one uninterrupted process: manifest, stats,
    every tar, index and sidecar, byte for byte. usr2 also checks that only the task handled the signal:
    its DataLoader worker used to run submitit's requeue too and make the task fail in submitit's
    checkpoint ("A temporary saved file already exists")."""
    from tb_train.launch.task import REQUEUED_ON_USR2

    args, ref = precompute_reference
    out, run, record = tmp_path / "out", tmp_path / "run", tmp_path / "hold"
    t0 = time.time()
    job_id = held_submit(capsys, run, record, "precompute", 2, "--config", "precompute_demo", *args,
                         f"output={out}")
    wait_blocked(record, slurm_cluster, job_id)
    held = sorted(out.glob("shard-*.json"))
    assert [p.name for p in held] == [f"shard-{s:06d}.json" for s in range(4)]  # ranks 0 (0, 2) and 1 (1, 3)
    assert not (out / "manifest.json").exists()
    before = stamps(out.glob("shard-00000[0-3].*"))
    t1 = time.time()
    interrupt(run, job_id, how, slurm_cluster)
    slurm_cluster.wait_gone(job_id, 400)
    assert task_results(run, job_id) == [0, 0]
    attempts = records.read_attempts(run, job_id)
    assert [(a["attempt"], a["status"]) for a in attempts] == [(0, None), (1, 0)]
    assert attempts[1]["outcome"] == "finished"
    if how == "usr2":
        assert attempts[0]["outcome"] == REQUEUED_ON_USR2
        assert attempt_log(run, job_id, 0, 0).count("Calling checkpoint method") == 1
    assert "2 of 5 shards already done" in attempt_log(run, job_id, 1, 0)
    rank1 = re.search(r"(\d) of 4 shards already done", attempt_log(run, job_id, 1, 1))
    assert rank1 and int(rank1.group(1)) >= 2  # rank 1 may finish another shard before Slurm stops it
    assert stamps(out.glob("shard-00000[0-3].*")) == before, "the requeued attempt rewrote finished shards"
    files = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                           if p.is_file() and not p.name.startswith(".tb.lock"))
    assert len([f for f in files if f.endswith(".tar")]) == 9 and "manifest.json" in files
    assert [f for f in files if (ref / f).read_bytes() != (out / f).read_bytes()] == []
    assert leftovers(out) == []
    print(f"\nmeasured ({how}): submit -> held {t1 - t0:.1f} s, signal -> finished {time.time() - t1:.1f} s; "
          f"attempt 0: {attempts[0]['outcome']}")


SAMPLE_ARGS = ["num_samples=20", "seed=3", "sampling.num_iter=4", "sampling.guidance=2.0",
               "sampling.temperature=1.0", "sampling.batch_size=3", "grid_classes=3", "grid_per_class=2"]
RUN_SPECIFIC = {"generated_this_run", "seconds_this_run", "images_per_s", "world_size"}


def interrupt_until_finished(run: Path, job_id: str, how: str, slurm_cluster, first_outcome: str) -> None:
    """Interrupt the held first attempt (`how`), wait for the requeued one to finish on both tasks, and
    check the attempt records: the first ended as `first_outcome`, the second finished with status 0."""
    interrupt(run, job_id, how, slurm_cluster)
    slurm_cluster.wait_gone(job_id, 400)
    assert task_results(run, job_id) == [0, 0]
    attempts = records.read_attempts(run, job_id)
    assert [(a["attempt"], a["status"], a["outcome"]) for a in attempts] == \
        [(0, None, first_outcome), (1, 0, "finished")]


@pytest.mark.slow
def test_sample_requeued_mid_run_equals_uninterrupted(slurm_cluster, tiny_vae_dir, tmp_path, capsys):
    """submitit's preemption (`job._interrupt()`: SIGTERM, then SIGUSR2) while each rank holds after its
    4th PNG, i.e. in the middle of its 2nd batch of 3: rank 0 requeues the job and exits, rank 1 finishes
    its share. The requeued attempt must generate only the missing indices (PNGs on disk at the hold
    untouched) and end with every PNG, samples.npz and grid.png of an uninterrupted one-process run;
    samples.json may differ only in what describes this run (timing, count generated, world size)."""
    import torch
    from tb_core.config import load_config
    from tb_model.registry import create
    from tb_train.launch.task import REQUEUED_ON_USR2
    from tb_train.sample.job import SampleJobConfig, run_sample

    torch.manual_seed(0)
    model = create("tiny", latent_size=4, latent_channels=4, num_classes=10).eval().save_pretrained(
        tmp_path / "tiny.safetensors", metadata={"step": "7", "weights": "ema"})
    common = [f"model={model}", f"vae.path={tiny_vae_dir}", *SAMPLE_ARGS]
    ref, out, run, record = tmp_path / "ref", tmp_path / "out", tmp_path / "run", tmp_path / "hold"
    run_sample(load_config(SampleJobConfig, None, common + [f"out={ref}"]), 0, 1, torch.device("cpu"))
    t0 = time.time()
    job_id = held_submit(capsys, run, record, "sample", 4, *common, f"out={out}")
    wait_blocked(record, slurm_cluster, job_id)
    held = sorted(out.glob("*_c*.png"))
    assert len(held) == 8 and not (out / "samples.npz").exists()
    before = stamps(held)
    t1 = time.time()
    interrupt_until_finished(run, job_id, "preempt", slurm_cluster, first_outcome=REQUEUED_ON_USR2)

    names = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert names == sorted(p.name for p in ref.glob("*.png") if p.name != "grid.png")
    assert [int(n[:6]) for n in names] == list(range(20))  # every index once: none missing, none twice
    for name in names + ["grid.png"]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert stamps(out / n for n in before) == before, "the requeued attempt regenerated finished samples"
    assert (out / "samples.npz").read_bytes() == (ref / "samples.npz").read_bytes()
    assert np.load(out / "samples.npz")["arr_0"].shape == (20, 8, 8, 3)
    a, b = (json.loads((d / "samples.json").read_text()) for d in (ref, out))
    assert a["complete"] and b["complete"] and set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} <= RUN_SPECIFIC
    assert a["generated_this_run"] == 20 and 0 < b["generated_this_run"] <= 12 and b["world_size"] == 2
    assert leftovers(out) == []
    print(f"\nmeasured: submit -> held {t1 - t0:.1f} s, interrupt -> finished {time.time() - t1:.1f} s; "
          f"requeued attempt generated {b['generated_this_run']} of 20")


def _eval_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 16, 16, 3] with some structure (a gradient and a bright square), distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 16
    out = []
    for _ in range(n):
        img = rng.uniform(20, 200, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        y, x = rng.integers(0, 8, 2)
        img[y:y + 5, x:x + 5] += 50
        out.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255))
    return np.stack(out).astype(np.uint8)


@pytest.mark.slow
def test_eval_requeued_mid_run_equals_uninterrupted(slurm_cluster, inception_weights, tmp_path, capsys):
    """`scontrol requeue` while each rank holds after its first batch of sample features, after rank 0
    has cached the reference statistics: submitit ignores SIGTERM, so Slurm kills both ranks after KillWait
    (the attempt is recorded as killed when the next one starts). The requeued attempt must reuse that
    cache (untouched) and write metrics.json with the uninterrupted run's values exactly (batches of 2
    line up for 1 and 2 ranks, so the features are the same bits); only the timing fields and the world
    size may differ."""
    from tb_core.config import load_config
    from tb_train.eval.job import EvaluateJobConfig, evaluate
    from tb_train.launch.task import KILLED

    np.savez(tmp_path / "samples.npz", arr_0=_eval_images(8, seed=1))
    np.savez(tmp_path / "reference.npz", arr_0=_eval_images(8, seed=0))
    metrics, run, record = tmp_path / "metrics.json", tmp_path / "run", tmp_path / "hold"
    args = [f"samples={tmp_path / 'samples.npz'}", f"reference={tmp_path / 'reference.npz'}",
            f"inception_weights={inception_weights}", f"out={metrics}", "batch_size=2", "splits=2"]
    evaluate(load_config(EvaluateJobConfig, None, args))
    want = json.loads(metrics.read_text())
    for p in [metrics, *tmp_path.glob("reference.npz.tbeval-*.npz")]:  # the Slurm job starts from nothing
        p.unlink()
    t0 = time.time()
    job_id = held_submit(capsys, run, record, "eval", 1, *args)
    wait_blocked(record, slurm_cluster, job_id)
    cache = list(tmp_path.glob("reference.npz.tbeval-*.npz"))
    assert len(cache) == 1 and not metrics.exists()
    before = stamps(cache)
    t1 = time.time()
    interrupt_until_finished(run, job_id, "requeue", slurm_cluster, first_outcome=KILLED)
    assert "reference statistics from cache" in attempt_log(run, job_id, 1, 0)
    assert stamps(cache) == before
    got = json.loads(metrics.read_text())
    assert set(got) == set(want) and got["world_size"] == 2
    assert {k for k in want if want[k] != got[k]} <= {"elapsed_s", "sample_images_per_s", "world_size"}
    assert want["fid"] > 0 and 0 <= want["precision"] <= 1
    print(f"\nmeasured: submit -> held {t1 - t0:.1f} s, interrupt -> finished {time.time() - t1:.1f} s")
