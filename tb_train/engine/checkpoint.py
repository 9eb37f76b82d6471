"""Checkpoints: DeepSpeed's own files + the registered stateful parts + an atomic `latest`.

A checkpoint is the set of the training job's stateful parts, each with `state_dict()` /
`load_state_dict(sd)` (torchtitan's `CheckpointManager(states=...)`, lingua's `TrainState`):
- the model and optimizer: DeepSpeed's files (ZeRO partitions), written and read by DeepSpeed;
- global parts (the same on every rank: train counters, data cursor, metrics position, hooks' state),
  written once by rank 0 into `train_state.json` under their names — their state must be JSON-able;
- per-rank parts (the EMA slices, the process RNG), written by every rank into its own
  `train_state_rankNNNNN.pt` under their names. A per-rank part with `load_state_dicts(list)` (the EMA)
  is reshardable: when the ZeRO layout changed it receives every saved rank's state, otherwise its own.

Layout of a checkpoint folder (default `<run_dir>/checkpoints`):

    latest                               the tag of the newest COMPLETE checkpoint (atomic rename)
    step_00001000/                       DeepSpeed's files (module, ZeRO partitions, optimizer state)
        train_state_rank00000.pt         per-rank parts (each rank)
        train_state.json                 step, world, ZeRO stage, precision, global parts, and the size
                                         of every other file of the folder (rank 0, last)
    step_00001000_universal/             made on demand when resuming at another world size or stage

Every rank calls `CheckpointManager.save` (DeepSpeed needs all ranks); rank 0 lists the files and moves
`latest` only after a barrier that follows every rank's writes, so a kill at any moment leaves `latest`
on a complete checkpoint. Before resuming, the recorded file sizes are checked: a checkpoint with a
missing or truncated file (or no train_state.json) is reported in one line and the newest complete
earlier one is used instead; only when none is usable does the job stop (`CheckpointError`).

Resuming at the same world size and ZeRO stage loads the DeepSpeed checkpoint directly. Otherwise rank 0
converts it once into a DeepSpeed universal checkpoint (`ds_to_universal --inject_missing_state`), all
ranks wait, and DeepSpeed loads that (`checkpoint.load_universal`); the EMA pieces and the data cursor
are world-size independent by construction (see ema.py, data.py). The activation-checkpointing policy
may change across any resume (parameter names differ only by the wrapper, see `canonical_name`).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from tb_core.errors import CheckpointError, ConfigError
from tb_core.fileio import atomic_torch_save, atomic_write_json, atomic_write_text
from tb_train.engine.activation_ckpt import canonical_name
from tb_train.dist import barrier

CHECKPOINTS = "checkpoints"             # <run dir>/checkpoints unless checkpoint.dir says otherwise
LATEST = "latest"
STATE_JSON = "train_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
RANK_FILE_GLOB = "train_state_rank*.pt"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module state (stage 0 holds the weights here)
EMA_PART = "ema"                        # the EMA's name among each rank's stateful parts
UNIVERSAL_SUFFIX = "_universal"
# Errors that reading a damaged file raises (torch.load, DeepSpeed's loader, the conversion script).
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, sd: Any) -> None: ...


@dataclass
class CheckpointConfig:
    every_steps: int = 1000       # save every N optimizer steps (0: only at the end and on preemption)
    keep_last: int = 3            # complete checkpoints kept (older ones are deleted)
    dir: str | None = None        # default <run_dir>/checkpoints
    resume: bool = True           # continue from <dir>/latest when it exists

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("every_steps must be >= 0 and keep_last >= 1")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / RANK_FILE_GLOB.replace("*", f"{rank:05d}")


def locate(path: str | os.PathLike) -> tuple[Path, str, Path]:
    """A run folder, a checkpoint folder (with `latest`) or one tag folder → (checkpoint folder, tag, run
    folder holding config.yaml)."""
    p = Path(path)
    if (p / CHECKPOINTS / LATEST).is_file():
        return p / CHECKPOINTS, read_latest(p / CHECKPOINTS), p
    if (p / LATEST).is_file():
        return p, read_latest(p), p.parent
    if (p / STATE_JSON).is_file():
        return p.parent, p.name, p.parent.parent
    raise CheckpointError(f"{p}: no checkpoint found (expected a run folder, a checkpoint folder with "
                          f"'{LATEST}', or a step_* folder)")


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """Tag named by `latest`, or None when the folder holds no complete checkpoint yet."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def read_train_state(ckpt_dir: str | os.PathLike, tag: str) -> dict:
    """train_state.json of one checkpoint (step, world, zero_stage, precision, states, files)."""
    path = Path(ckpt_dir) / tag / STATE_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (checkpoint incomplete or damaged)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None


def list_tags(ckpt_dir: Path) -> list[str]:
    """step_* folders of a checkpoint folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{path relative to tag_dir: bytes} of every file in a checkpoint folder except train_state.json."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != STATE_JSON and not p.name.startswith(".")}


def find_damage(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint folder, naming the file (None: every recorded file is there, whole)."""
    try:
        meta = read_train_state(tag_dir.parent, tag_dir.name)
    except CheckpointError as e:
        return str(e)
    if not isinstance(meta.get("files"), dict):
        return f"{tag_dir / STATE_JSON} lists no files (written by an older version)"
    for rel, size in meta["files"].items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` tags up to the one `latest` names; delete older ones and any newer
    (incomplete or damaged) ones, with their universal copies."""
    latest = read_latest(ckpt_dir)
    tags = list_tags(ckpt_dir)
    kept = [t for t in tags if latest is None or t <= latest][-keep_last:]
    for tag in tags:
        if tag not in kept:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


@dataclass
class ResumePlan:
    ckpt_dir: Path
    tag: str
    meta: dict           # train_state.json of that checkpoint
    universal: bool      # load through a universal checkpoint (other world size or ZeRO stage)


def _warn(msg: str) -> None:
    print(f"tb-train: warning: {msg}", file=sys.stderr, flush=True)


def plan_resume(ckpt_dir: str | os.PathLike, world: int, stage: int, precision: str,
                warn: Callable[[str], None] | None = _warn) -> ResumePlan | None:
    """Pick the checkpoint to resume from and how (None: nothing to resume). Must run before the engine is
    built, because DeepSpeed reads `checkpoint.load_universal` at initialisation.

    The candidate is the tag `latest` names; if it is damaged (`find_damage`), one line naming the file
    goes to `warn` and the next older tag is tried. Without `latest`, only tags whose train_state.json
    exists (written after every rank's files) are candidates, so a run killed during its first save
    starts over. Raises CheckpointError when checkpoints exist but none is usable.
    warn: None on ranks that should not print.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    tags = list_tags(ckpt_dir)
    if latest is not None:
        candidates = [t for t in tags if t <= latest]
        if latest not in tags and warn:
            warn(f"{ckpt_dir / LATEST} names {latest}, which does not exist")
    else:
        candidates = [t for t in tags if (ckpt_dir / t / STATE_JSON).is_file()]
    problems = []
    for tag in reversed(candidates):
        problem = find_damage(ckpt_dir / tag)
        if problem is None:
            meta = read_train_state(ckpt_dir, tag)
            if problems and warn:
                warn(f"resuming from the earlier checkpoint {ckpt_dir / tag} instead")
            return ResumePlan(ckpt_dir, tag, meta, universal=_needs_universal(meta, world, stage, precision,
                                                                             ckpt_dir / tag))
        if warn:
            warn(f"checkpoint {ckpt_dir / tag} is unusable: {problem}")
        problems.append(problem)
    if problems or (latest is not None and latest not in tags):
        first = problems[0] if problems else f"{latest} does not exist"
        raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({first}); move it away or set "
                              f"checkpoint.resume=false to start over")
    return None


def _needs_universal(meta: dict, world: int, stage: int, precision: str, where: Path) -> bool:
    same = meta["world"] == world and meta["zero_stage"] == stage and meta["precision"] == precision
    replicated = meta["zero_stage"] == 0 and meta["precision"] == "fp32"
    if replicated and stage == 0 and precision == "fp32":
        return False  # full model+optimizer in rank 0's file, loadable at any world size
    if not same and replicated:
        raise ConfigError(f"{where}: a ZeRO stage 0 fp32 checkpoint can only be resumed by stage 0 fp32 "
                          f"(this run: stage {stage} {precision})")
    return not same


def make_universal(plan: ResumePlan, is_main: bool, param_names: list[str]) -> str:
    """Collective: rank 0 converts the checkpoint into `<tag>_universal` (once) and names its per-parameter
    folders as the current model does (`param_names`: the engine module's `named_parameters()` names,
    which differ from the saved ones when the activation-checkpointing policy changed); everyone waits."""
    out = plan.ckpt_dir / (plan.tag + UNIVERSAL_SUFFIX)
    if is_main:
        if not out.is_dir():
            tmp = plan.ckpt_dir / f".{out.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                   "--input_folder", str(plan.ckpt_dir / plan.tag), "--output_folder", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = " ".join(proc.stderr.strip().splitlines()[-1:])
                raise CheckpointError(f"universal conversion of {plan.ckpt_dir / plan.tag} failed: {tail}")
            os.replace(tmp, out)
        current = {canonical_name(n): n for n in param_names}
        for folder in sorted((out / "zero").iterdir()):
            want = current.get(canonical_name(folder.name))
            if folder.is_dir() and want is not None and want != folder.name:
                os.replace(folder, folder.with_name(want))
    barrier()
    return out.name


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


class CheckpointManager:
    """Saves and restores a training job: the DeepSpeed engine plus the registered stateful parts.

    engine: a tb_train.engine.engine.TrainEngine. states: global parts by name (JSON-able state, rank 0 writes
    it). rank_states: per-rank parts by name. Register every part before `load`.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int, engine, states: dict[str, Stateful] | None = None,
                 rank_states: dict[str, Stateful] | None = None):
        self.dir, self.keep_last, self.engine = Path(ckpt_dir), keep_last, engine
        self.states: dict[str, Stateful] = dict(states or {})
        self.rank_states: dict[str, Stateful] = dict(rank_states or {})

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        table = self.rank_states if per_rank else self.states
        if name in self.states or name in self.rank_states:
            raise ValueError(f"a stateful part named {name!r} is already registered")
        table[name] = part

    def _meta(self, step: int) -> dict:
        eng = self.engine
        return {"tag": tag_for(step), "step": step, "world": eng.dist.world, "zero_stage": eng.stage,
                "precision": eng.cfg.precision}

    def save(self, step: int) -> str:
        """Collective: DeepSpeed's files and every rank's parts, then rank 0's global parts, file list and
        `latest`, then pruning. A folder of the same step that `latest` does not name (left by a damaged or
        incomplete save) is replaced."""
        tag = tag_for(step)
        tag_dir, dist = self.dir / tag, self.engine.dist
        if dist.is_main and tag_dir.exists() and read_latest(self.dir) != tag:
            shutil.rmtree(tag_dir)
            shutil.rmtree(self.dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        barrier()
        self.engine.ds.save_checkpoint(str(self.dir), tag=tag, client_state={"tb_meta": self._meta(step)},
                                       save_latest=False)
        atomic_torch_save({name: part.state_dict() for name, part in self.rank_states.items()},
                          rank_file(tag_dir, dist.rank))
        barrier()
        if dist.is_main:
            meta = dict(self._meta(step), states={name: part.state_dict() for name, part in self.states.items()},
                        files=file_sizes(tag_dir))
            atomic_write_json(tag_dir / STATE_JSON, meta)
            atomic_write_text(self.dir / LATEST, tag + "\n")
            prune(self.dir, self.keep_last)
        barrier()
        return tag

    def load(self, plan: ResumePlan) -> None:
        """Collective: restore DeepSpeed's state, then every registered part from `plan`'s checkpoint.
        A global part that the checkpoint does not hold (e.g. a hook added since) keeps its fresh state."""
        eng, dist = self.engine, self.engine.dist
        names = [n for n, _ in eng.module.named_parameters()]
        tag = make_universal(plan, dist.is_main, names) if plan.universal else plan.tag
        try:
            path, _ = eng.ds.load_checkpoint(str(plan.ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
        except LOAD_ERRORS as e:
            raise CheckpointError(f"{plan.ckpt_dir / tag}: DeepSpeed cannot load it "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        if path is None:
            raise CheckpointError(f"{plan.ckpt_dir / tag}: DeepSpeed found no checkpoint to load")
        eng.repair_after_load()
        saved = plan.meta.get("states", {})
        for name, part in self.states.items():
            if name in saved:
                part.load_state_dict(saved[name])
        self._load_rank_states(plan)

    def _load_rank_states(self, plan: ResumePlan) -> None:
        eng, dist = self.engine, self.engine.dist
        tag_dir, meta = plan.ckpt_dir / plan.tag, plan.meta
        same_layout = (meta["world"], meta["zero_stage"], meta["precision"]) == \
            (dist.world, eng.stage, eng.cfg.precision)
        ranks = [dist.rank] if same_layout else list(range(meta["world"]))
        files = {r: _load_file(rank_file(tag_dir, r)) for r in ranks}
        for name, part in self.rank_states.items():
            try:
                if not same_layout and hasattr(part, "load_state_dicts"):
                    part.load_state_dicts([files[r][name] for r in ranks])
                elif dist.rank in files:
                    part.load_state_dict(files[dist.rank][name])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{tag_dir}: per-rank part {name!r} cannot be restored ({_first_line(e)})") \
                    from None


__all__ = ["CheckpointConfig", "CheckpointManager", "ResumePlan", "Stateful", "plan_resume", "find_damage",
           "read_latest", "read_train_state", "list_tags", "tag_for", "rank_file", "prune", "make_universal"]
