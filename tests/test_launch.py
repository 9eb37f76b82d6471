"""tb-submit without a Slurm: the dry-run sbatch script of a 4-node x 8-GPU H job (string comparison),
one-line errors for bad options, the packaged presets, rank variables of a task, and a real 2-task run
through submitit's LocalExecutor (`--cluster local`)."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from tb_train.dist import export_task_env, job_port
from tb_train.launch import records
from tb_train.launch.cluster import load_cluster
from tb_train.recipes import packaged_names
from tb_train.launch.submit import main as submit_main

REPO = Path(__file__).resolve().parent.parent
H_JOB = REPO / "tb_train" / "configs" / "jobs" / "imagenet256_H.yaml"


def _submit(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = submit_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_h_job_on_4_nodes_x_8_gpus(capsys, tmp_path):
    run = tmp_path / "h_run"
    code, out, err = _submit(capsys, "train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "--run-dir",
                             str(run), "--dry-run", "cluster.account=proj7", "cluster.qos=high",
                             "data.path=/data/imagenet256_kl16")
    assert code == 0, err
    logs = f"{run.resolve()}/submit/logs/%j"
    expected = f"""\
### train: 32 tasks (4 nodes x 8), slurm executor, run folder {run.resolve()}
#!/bin/bash

# Parameters
#SBATCH --account=proj7
#SBATCH --cpus-per-task=12
#SBATCH --error={logs}/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=tb-train
#SBATCH --mem=960G
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output={logs}/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --time=1440
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {logs}/%j_%t_log.out --error {logs}/%j_%t_log.err \
{shlex.quote(sys.executable)} -u -m submitit.core._submit {logs}

# each task: tb_train.train.job.main(['--config', '{H_JOB}', 'data.path=/data/imagenet256_kl16'])
# ranks: one task per GPU, RANK = task id 0..31, LOCAL_RANK = local task id 0..7, WORLD_SIZE = 32; \
MASTER_ADDR = the first host of the allocation's node list, MASTER_PORT = 20000 + (Slurm job id % 20000)
"""
    assert out == expected
    assert not run.exists(), "a dry run must not create the run folder"


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "cluster.gpus=8"],
     "unknown key 'cluster.gpus' (known: account,"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "cluster.nodes=0"],
     "'cluster': nodes must be >= 1, got 0"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "cluster.tasks_per_node=4"],
     "'cluster': one task per GPU: tasks_per_node=4 but gpus_per_node=8"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "cluster.sbatch_extra=[--time=5]"],
     "--time is set by tb-submit itself"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "cluster.time_min=5",
      "cluster.signal_grace_s=300"], "signal_grace_s=300 must be in [0, time_min*60 - 60 = 240]"),
    (["train", "--config", str(H_JOB), "--cluster", "nope"], "cluster config 'nope': no such file"),
    (["train", "--config", str(H_JOB), "--cluster", "local", "cluster.nodes=2"], "nodes must be 1"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["train", "--config", "missing.yaml", "--cluster", "gpu_4x8"], "jobs config 'missing.yaml': no such file"),
    (["frob", "--cluster", "gpu_4x8"], "unknown job 'frob'"),
    (["train", "--config", str(H_JOB)], "the following arguments are required: --cluster"),
    (["train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "--then", "nojob=x.yaml"], "unknown job 'nojob'"),
    (["status", "/nonexistent_run"], "/nonexistent_run: no submit/jobs.json"),
])
def test_bad_options_give_one_line(capsys, argv, message):
    code, out, err = _submit(capsys, *argv, *(["--dry-run"] if argv[0] != "status" else []))
    assert code == 2 and out == ""
    assert err.startswith("tb-submit: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize("then", ["sample", "eval"])
def test_then_needs_a_config_per_chained_job(capsys, then):
    code, _, err = _submit(capsys, "train", "--config", str(H_JOB), "--cluster", "gpu_4x8", "--dry-run",
                           "--then", then)
    assert code == 2 and f"--then {then}: give the job's config as {then}=FILE" in err


def test_presets_load():
    names = packaged_names("cluster")
    assert {"local", "slurm_debug", "gpu_4x8"} <= set(names)
    for name in names:
        assert load_cluster(name).world >= 1
    assert [load_cluster(n).world for n in ("local", "slurm_debug", "gpu_4x8")] == [2, 2, 32]


def test_task_env_overrides_inherited_rank(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "999")
    export_task_env(5, 32, 5, 8, "node001", "123456")
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")] \
        == ["5", "32", "5", "8", "node001"]
    assert os.environ["MASTER_PORT"] == str(job_port("123456")) == str(20000 + 123456 % 20000)
    assert job_port("77_3") == job_port("773")


@pytest.mark.distributed
def test_local_executor_runs_two_ranks(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))
    run = tmp_path / "local"
    code, out, err = _submit(capsys, "fixtures.slurm", "--cluster", "local", "--run-dir", str(run),
                             f"probe.env={tmp_path / 'ranks'}", "--timeout", "240")
    assert code == 0, err + out
    job = records.read_jobs(run)[0]
    assert job["executor"] == "local" and job["world"] == 2
    assert f"job {job['job_id']} COMPLETED" in out
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["RANK"], r["WORLD_SIZE"], r["MASTER_ADDR"]) for r in ranks] == [("0", "2", "127.0.0.1"),
                                                                             ("1", "2", "127.0.0.1")]
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"] == str(job_port(job["job_id"]))
    attempts = records.read_attempts(run, job["job_id"])
    assert [(a["status"], a["outcome"]) for a in attempts] == [(0, "finished")]
