"""`tb-submit`: run any job on a Slurm cluster (or locally) through submitit, one task per GPU.

    tb-submit JOB --config FILE --cluster PRESET [job.key=value ...] [cluster.key=value ...]
              [--run-dir DIR] [--then JOB=FILE[,JOB=FILE]] [--dry-run] [--wait [--timeout S]]
    tb-submit status RUN_DIR

JOB is precompute, train, sample or eval (the latter two when this version has them) or a dotted module
path; a job is a module whose `main(argv)` runs once per task with `--config FILE` and the job overrides.
PRESET is a file or a name in configs/cluster/ (`local` runs on this machine with submitit's
LocalExecutor). Arguments starting with `cluster.` override the preset; the others go to the job.
The run folder (`--run-dir`, default the job's `run.dir`, else runs/submit/JOB-<UTC time>) receives
the records of tb_train.launch.records. `--then sample=FILE,eval=FILE` submits each as a job that starts
only after the previous one succeeded (afterok). See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tb_core.config import deep_merge, parse_overrides, read_yaml
from tb_core.errors import ConfigError
from tb_train.cli import JOBS as CLI_JOBS
from tb_train.cli import job_parser, load_job_config, run_main
from tb_train.launch import records
from tb_train.launch.cluster import ClusterConfig, load_cluster
from tb_train.launch.status import report, wait_for
from tb_train.launch.task import JobTask
from tb_train.recipes import config_path

PROG = "tb-submit"
JOBS = {name: job.module for name, job in CLI_JOBS.items() if job.on_ranks}  # what runs one task per GPU


class _Parser(argparse.ArgumentParser):
    """argparse that raises a ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_jobs() -> list[str]:
    return [name for name, module in JOBS.items() if _module_exists(module)]


def job_module(job: str) -> str:
    """The module that implements `job` (a registered name or a dotted module path)."""
    if job in JOBS:
        if not _module_exists(JOBS[job]):
            raise ConfigError(f"job '{job}' is not in this version (no module {JOBS[job]})")
        return JOBS[job]
    if "." in job and _module_exists(job):
        return job
    raise ConfigError(f"unknown job '{job}' (jobs: {', '.join(available_jobs())}, or a module with main(argv))")


@dataclass
class Plan:
    """One job to submit: `module.main(argv)` on every task, records in `run_dir`."""
    job: str
    module: str
    argv: list[str]
    run_dir: Path

    def task(self) -> JobTask:
        return JobTask(self.job, self.module, self.argv, str(self.run_dir))


def _job_argv(config: str | None, overrides: list[str]) -> list[str]:
    if config is None:
        return list(overrides)
    return ["--config", str(config_path(config, "jobs").resolve()), *overrides]


def validate_job_config(module: str, argv: list[str]) -> None:
    """Load a registered job's config now, so a typo fails here with its one-line error instead of after
    hours in the queue (a job given as a dotted module path is not checked)."""
    job = next((j for j in CLI_JOBS.values() if j.module == module and j.config), None)
    if job is None:
        return
    try:
        args = job_parser(job).parse_args(argv)
    except SystemExit as e:  # the job's argparse rejected argv (it printed why)
        raise ConfigError(f"{module}: rejected the job arguments {' '.join(argv)}") from e
    load_job_config(job, args)


def default_run_dir(job: str, config: str | None, overrides: list[str]) -> Path:
    """`run.dir` of the job config when it has one (train), else runs/submit/JOB-<UTC time>."""
    data = read_yaml(config_path(config, "jobs")) if config else {}
    data = deep_merge(data, parse_overrides(overrides))
    run = data.get("run")
    if isinstance(run, dict) and isinstance(run.get("dir"), str):
        return Path(run["dir"])
    return Path("runs") / "submit" / f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def parse_then(spec: str, run_dir: Path) -> list[Plan]:
    """`sample=FILE,eval=FILE` -> chained plans (each waits for the previous job to succeed)."""
    plans = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        job, sep, config = item.partition("=")
        if not sep or not config:
            raise ConfigError(f"--then {item}: give the job's config as {item}=FILE")
        plans.append(Plan(job, job_module(job), _job_argv(config, []), run_dir))
    return plans


def _python(cluster: ClusterConfig) -> str:
    return cluster.python or shlex.quote(sys.executable)


def sbatch_script(cluster: ClusterConfig, plan: Plan, dependency: str | None = None) -> str:
    """The sbatch file submitit writes for `plan` (used verbatim by --dry-run).

    submitit has no public function that renders the script without submitting, so this calls its
    private `_make_sbatch_string` — the function its SlurmExecutor itself uses, so the dry run shows the
    script a submission writes. submitit is pinned in constraints.txt; tests/test_launch.py compares the
    rendered script with a real submission's file and fails loudly on a submitit that changed it, and a
    missing or re-signed function is one line here instead of a traceback.
    """
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError as e:
        raise ConfigError(f"--dry-run: this submitit ({submitit_version()}) has no _make_sbatch_string; "
                          f"install the version pinned in constraints.txt") from e
    folder = records.submitit_folder(plan.run_dir).resolve()
    command = f"{_python(cluster)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    try:
        return _make_sbatch_string(command=command, folder=folder,
                                   **cluster.slurm_parameters(f"tb-{plan.job}", dependency))
    except TypeError as e:
        raise ConfigError(f"--dry-run: submitit {submitit_version()} changed _make_sbatch_string ({e}); "
                          f"install the version pinned in constraints.txt") from e


def submitit_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("submitit")


def dry_run(cluster: ClusterConfig, plans: list[Plan]) -> str:
    """What would be submitted: per job the sbatch script (or local parameters) and each task's command."""
    out = []
    for i, plan in enumerate(plans):
        dep = f"afterok:<job id of {plans[i - 1].job}>" if i else None
        out.append(f"### {plan.job}: {cluster.world} tasks ({cluster.nodes} nodes x {cluster.tasks_per_node}), "
                   f"{cluster.executor} executor, run folder {plan.run_dir.resolve()}")
        if cluster.executor == "slurm":
            out.append(sbatch_script(cluster, plan, dep))
        else:
            out.append(f"# local parameters: {cluster.local_parameters()}")
        out.append(f"# each task: {plan.task().command()}")
        out.append(f"# ranks: one task per GPU, RANK = task id 0..{cluster.world - 1}, LOCAL_RANK = local task id "
                   f"0..{cluster.tasks_per_node - 1}, WORLD_SIZE = {cluster.world}; " + rendezvous_rule(cluster))
    return "\n".join(out)


def rendezvous_rule(cluster: ClusterConfig) -> str:
    """How the tasks find each other (tb_train.launch.task and tb_train.dist.job_port), in words."""
    addr = ("the first host of the allocation's node list" if cluster.nodes > 1 and cluster.executor == "slurm"
            else "127.0.0.1")
    return f"MASTER_ADDR = {addr}, MASTER_PORT = 20000 + (Slurm job id % 20000)"


def _executor(cluster: ClusterConfig, run_dir: Path):
    import submitit

    folder = records.submitit_folder(run_dir).resolve()
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=cluster.max_requeues, python=cluster.python)
        ex.update_parameters(**cluster.local_parameters())
        return ex
    try:
        return submitit.SlurmExecutor(folder, max_num_timeout=cluster.max_requeues, python=cluster.python)
    except RuntimeError as e:
        raise ConfigError(f"--cluster: executor 'slurm' but {e} (use --cluster local)") from None


def _sbatch_error(text: str) -> str:
    """The `sbatch: error: ...` lines of a failed submission, joined into one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    picked = [line for line in lines if "error" in line.lower()] or lines[-1:] or ["sbatch failed"]
    return "; ".join(picked)


def submit_one(cluster: ClusterConfig, plan: Plan, dependency: str | None) -> Any:
    """Submit `plan`; returns the submitit Job. sbatch's own error comes back as one ConfigError line."""
    from submitit.core.utils import FailedJobError

    executor = _executor(cluster, plan.run_dir)
    if cluster.executor == "slurm":
        executor.update_parameters(**cluster.slurm_parameters(f"tb-{plan.job}", dependency))
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink):  # submitit also prints sbatch's stderr; we report it once
            job = executor.submit(plan.task())
    except FailedJobError as e:
        raise ConfigError(_sbatch_error(str(e) or sink.getvalue())) from None
    entry = {"job": plan.job, "job_id": str(job.job_id), "module": plan.module, "argv": plan.argv,
             "executor": cluster.executor, "world": cluster.world, "dependency": dependency,
             "folder": str(records.submit_dir(plan.run_dir) / "logs" / str(job.job_id)),
             "sbatch": str(job.paths.submission_file) if cluster.executor == "slurm" else None}
    records.add_job(plan.run_dir, entry, cluster)
    return job


def submit(cluster: ClusterConfig, plans: list[Plan]) -> list[Any]:
    """Submit the chain; each job after the first depends on the previous one (afterok)."""
    if cluster.executor == "local" and len(plans) > 1:
        raise ConfigError("--then needs Slurm dependencies; with --cluster local submit the jobs one by one")
    records.write_code_revision(plans[0].run_dir)
    jobs, dependency = [], None
    for plan in plans:
        job = submit_one(cluster, plan, dependency)
        jobs.append(job)
        dependency = f"afterok:{job.job_id}"
    return jobs


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Submit a job (precompute, train, sample, eval) to Slurm via submitit.")
    p.add_argument("job", help="precompute | train | sample | eval | a module path with main(argv)")
    p.add_argument("--config", help="the job's YAML config")
    p.add_argument("--cluster", required=True, help="cluster preset name (configs/cluster/) or YAML file")
    p.add_argument("--run-dir", help="records and logs go to RUN_DIR/submit (default: the job's run.dir)")
    p.add_argument("--then", default="", help="chained jobs run after success: JOB=CONFIG[,JOB=CONFIG]")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and task commands; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the jobs to end (always with --cluster local)")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.add_argument("overrides", nargs="*", help="job overrides key=value, and cluster.key=value")
    return p


def plan_from_args(argv: list[str]) -> tuple[ClusterConfig, list[Plan], argparse.Namespace]:
    args = build_parser().parse_intermixed_args(argv)
    cluster_ov = [o[len("cluster."):] for o in args.overrides if o.startswith("cluster.")]
    job_ov = [o for o in args.overrides if not o.startswith("cluster.")]
    cluster = load_cluster(args.cluster, cluster_ov)
    module = job_module(args.job)
    job_argv = _job_argv(args.config, job_ov)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.job, args.config, job_ov)
    plans = [Plan(args.job, module, job_argv, run_dir)] + parse_then(args.then, run_dir)
    for plan in plans:
        validate_job_config(plan.module, plan.argv)
    return cluster, plans, args


def run_submit(argv: list[str]) -> int:
    if argv[:1] == ["status"]:
        p = _Parser(prog=f"{PROG} status", description="Jobs, states, attempts and logs of a run folder.")
        p.add_argument("run_dir")
        print(report(p.parse_args(argv[1:]).run_dir))
        return 0
    cluster, plans, args = plan_from_args(argv)
    if args.dry_run:
        print(dry_run(cluster, plans))
        return 0
    jobs = submit(cluster, plans)
    for plan, job in zip(plans, jobs):
        print(f"{PROG}: {plan.job}: submitted job {job.job_id} ({cluster.world} tasks), run folder {plan.run_dir}")
    print(f"{PROG}: follow with: {PROG} status {plans[0].run_dir}")
    if not (args.wait or cluster.executor == "local"):
        return 0

    status = 0
    for entry in records.read_jobs(plans[0].run_dir)[-len(jobs):]:
        try:
            state = wait_for(plans[0].run_dir, entry, args.timeout or float("inf"))
        except TimeoutError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        print(f"{PROG}: {entry['job']}: job {entry['job_id']} {state}")
        status = status or (0 if state == "COMPLETED" else 1)
    return status


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: run_submit(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
