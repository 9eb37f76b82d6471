"""Where and how big a submitted job is: the cluster options of `tb-submit` as a strict config.

A preset (a path, or the name of a packaged file `tb_train/configs/cluster/<name>.yaml`) is read with the same rules as the job
configs (unknown key or wrong type = one-line `ConfigError`), then `cluster.key=value` arguments of
`tb-submit` override it. `slurm_parameters()` / `local_parameters()` map the result onto submitit's executor options, so
this dataclass is the only place that knows sbatch's vocabulary.

One Slurm task runs per GPU; on CPU-only partitions (the tests) `tasks_per_node` ranks share a node.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tb_core.config import deep_merge, from_dict, parse_overrides, read_yaml
from tb_train.recipes import config_path

# sbatch options that tb-submit sets itself; an `sbatch_extra` line may not repeat them.
_OWNED = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "time", "partition",
          "account", "qos", "constraint", "exclusive", "job-name", "signal", "output", "error",
          "open-mode", "dependency", "wckey"}
_SBATCH_LINE = re.compile(r"^(?:#SBATCH\s+)?--([a-z][a-z0-9-]*)(?:[= ](.+))?$")


@dataclass
class ClusterConfig:
    """Resources and scheduling policy of one submission (every attempt of a requeued job gets them)."""

    executor: Literal["slurm", "local"] = "slurm"  # local: submitit's LocalExecutor, no Slurm (debugging)
    nodes: int = 1
    gpus_per_node: int = 0             # 0: CPU-only job (no --gpus-per-node line)
    tasks_per_node: int | None = None  # None: one task per GPU (1 on a CPU-only job)
    cpus_per_task: int = 1
    mem_gb: float | None = None        # memory per node (--mem); None: the partition's default
    time_min: int = 60                 # time limit of ONE attempt, minutes; requeues get a fresh limit
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None        # None: "tb-<job>"
    signal_grace_s: int = 120          # --signal=USR2@N: warn N (to N+30) s before the time limit: save, requeue
    max_requeues: int = 3              # requeues after a time limit or preemption before the job gives up
    sbatch_extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. "--mail-type=END"
    setup: list[str] = field(default_factory=list)         # shell lines run before srun (module load, ...)
    python: str | None = None          # interpreter on the nodes; None: the one running tb-submit

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        if self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"one task per GPU: tasks_per_node={self.tasks_per_node} but "
                             f"gpus_per_node={self.gpus_per_node}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb must be > 0, got {self.mem_gb}")
        # Slurm sends the warning once `end - now <= grace + 30 s` at one of its 30-s checks; a signal
        # before the job has installed its handlers kills the task, so leave a minute for start-up.
        if not 0 <= self.signal_grace_s <= self.time_min * 60 - 60:
            raise ValueError(f"signal_grace_s={self.signal_grace_s} must be in [0, time_min*60 - 60 = "
                             f"{self.time_min * 60 - 60}] (Slurm may signal up to 30 s early)")
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {self.max_requeues}")
        if self.executor == "local" and self.nodes != 1:
            raise ValueError("the local executor runs on this machine only: nodes must be 1")
        self.extra_parameters()  # reject a malformed sbatch_extra line now, not at submit time

    @property
    def world(self) -> int:
        return self.nodes * int(self.tasks_per_node or 1)

    def extra_parameters(self) -> dict[str, Any]:
        """`sbatch_extra` lines as submitit's additional_parameters ({"mail-type": "END", "requeue": True})."""
        out: dict[str, Any] = {}
        for line in self.sbatch_extra:
            m = _SBATCH_LINE.match(line.strip())
            if not m:
                raise ValueError(f"sbatch_extra line {line!r} is not '--option=value' or '--flag'")
            key, value = m.group(1), m.group(2)
            if key in _OWNED:
                raise ValueError(f"sbatch_extra line {line!r}: --{key} is set by tb-submit itself "
                                 f"(use the cluster key instead)")
            out[key] = True if value is None else value.strip()
        return out

    def slurm_parameters(self, job_name: str, dependency: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `submitit.SlurmExecutor.update_parameters` (sbatch's own names)."""
        params: dict[str, Any] = {"job_name": self.job_name or job_name, "time": self.time_min,
                                  "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
                                  "cpus_per_task": self.cpus_per_task, "signal_delay_s": self.signal_grace_s}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            whole = float(self.mem_gb).is_integer()
            params["mem"] = f"{int(self.mem_gb)}G" if whole else f"{int(self.mem_gb * 1024)}M"
        for key in ("partition", "account", "qos", "constraint", "dependency"):
            value = dependency if key == "dependency" else getattr(self, key)
            if value is not None:
                params[key] = value
        if self.exclusive:
            params["exclusive"] = True
        if self.setup:
            params["setup"] = list(self.setup)
        extra = self.extra_parameters()
        if extra:
            params["additional_parameters"] = extra
        return params

    def local_parameters(self) -> dict[str, Any]:
        """Keyword arguments for `submitit.LocalExecutor.update_parameters` (one node, this machine)."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "tasks_per_node": self.tasks_per_node,
                                  "nodes": 1, "signal_delay_s": self.signal_grace_s}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.setup:
            params["setup"] = list(self.setup)
        return params


def load_cluster(spec: str, overrides: list[str] = ()) -> ClusterConfig:
    """The preset `spec` with `key=value` overrides (without the `cluster.` prefix) applied, strictly."""
    path = config_path(spec, "cluster")
    data = read_yaml(path)
    source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source += " + cluster overrides"
    return from_dict(ClusterConfig, data, source=source, prefix="cluster")


__all__ = ["ClusterConfig", "load_cluster"]
