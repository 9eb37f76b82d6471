"""The job registry and each job's command line: --help lists the job's own keys (generated from its
config dataclasses), the example it prints is valid for that job, and `python -m tb_train JOB` works."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from tb_core.config import describe_keys
from tb_train.cli import JOBS, job_parser, load_job_config, run_job

CONFIG_JOBS = [name for name, job in JOBS.items() if job.config]


def test_registry_names_every_job_once():
    assert CONFIG_JOBS == ["precompute", "train", "sample", "eval"]
    assert len({j.module for j in JOBS.values()}) == len(JOBS)


@pytest.mark.parametrize("name", CONFIG_JOBS)
def test_help_lists_the_jobs_own_keys_with_type_default_and_comment(name, capsys):
    job = JOBS[name]
    with pytest.raises(SystemExit) as done:
        job_parser(job).parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: {job.prog}")
    keys = describe_keys(job.config_class())
    assert len(keys) >= 8
    for k in keys:
        assert f"\n  {k.key} " in out, k.key
    assert job.example in out.replace("\n  ", " ")
    # no key of another job leaks in (the old help showed optim.lr under tb-sample)
    if name != "train":
        assert "optim.lr" not in out and "engine.deepspeed" not in out


def test_help_comments_come_from_the_source():
    docs = {k.key: k for k in describe_keys(JOBS["sample"].config_class())}
    assert docs["sampling.num_iter"].comment.startswith("MAR steps") and docs["sampling.num_iter"].default == 64
    assert docs["model"].required and docs["vae.path"].required and not docs["seed"].required
    assert docs["sampling.order"].type.startswith("Literal")


@pytest.mark.parametrize("name", CONFIG_JOBS)
def test_the_printed_example_is_valid_for_its_job(name):
    job = JOBS[name]
    argv = shlex.split(job.example)
    assert argv[0] == job.prog
    cfg, _ = load_job_config(job, job_parser(job).parse_args(argv[1:]))
    assert type(cfg).__name__ == job.config


def test_python_dash_m_tb_train_dispatches_through_the_registry(capsys):
    assert run_job("nope", []) == 2 and "unknown job 'nope'" in capsys.readouterr().err
    res = subprocess.run([sys.executable, "-m", "tb_train", "sample", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: tb-sample") and "sampling.guidance" in res.stdout
    res = subprocess.run([sys.executable, "-m", "tb_train.eval", "protocol=wrong"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("tb-eval: error: ")
