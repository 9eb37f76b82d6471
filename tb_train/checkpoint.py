"""Saving and resuming training state: DeepSpeed checkpoints + our per-rank state + an atomic `latest`.

Layout of a checkpoint folder (default `<run_dir>/checkpoints`):

    latest                               the tag of the newest COMPLETE checkpoint (atomic rename)
    step_00001000/                       DeepSpeed's files (module, ZeRO partitions, optimizer state)
        train_state.json                 step, data cursor, world size, ZeRO stage, ... (rank 0)
        train_state_rank00000.pt         RNG states (torch, cuda, numpy, python) and EMA pieces (each rank)
    step_00001000_universal/             made on demand when resuming at another world size

Every rank calls `save_checkpoint` (DeepSpeed needs all ranks); `latest` moves only after a barrier that
follows every rank's writes, so a kill at any moment leaves `latest` on a complete checkpoint. Old
checkpoints beyond `keep_last` are deleted after `latest` moved.

Resuming at the same world size and ZeRO stage loads the DeepSpeed checkpoint directly. Otherwise rank 0
converts it once into a DeepSpeed universal checkpoint (`ds_to_universal --inject_missing_state`), all
ranks wait, and DeepSpeed loads that (`checkpoint.load_universal`); the EMA pieces and the data cursor
are world-size independent by construction (see ema.py, data.py). The activation-checkpointing policy
may change across any resume (parameter names differ only by the wrapper, see `canonical_name`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tb_core.fileio import atomic_write_text
from tb_train.dist import barrier
from tb_train.engine import canonical_name

LATEST = "latest"
STATE_JSON = "train_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_SUFFIX = "_universal"


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


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"train_state_rank{rank:05d}.pt"


def rng_state() -> dict:
    """Every RNG this process uses (torch CPU, CUDA, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """Tag named by `latest`, or None when the folder holds no complete checkpoint yet."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def read_train_state(ckpt_dir: str | os.PathLike, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / STATE_JSON).read_text())


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, train_state: dict, keep_last: int) -> str:
    """Collective: save DeepSpeed state + this rank's RNG/EMA; then rank 0 moves `latest` and prunes.

    engine: a tb_train.engine.TrainEngine. train_state: JSON-able dict with at least "step".
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(int(train_state["step"]))
    rank = engine.dist.rank
    state = dict(train_state, world=engine.dist.world, zero_stage=engine.stage,
                 precision=engine.cfg.precision, tag=tag)
    engine.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": state}, save_latest=False)
    _torch_save_atomic({"rng": rng_state(), "ema": engine.ema.state_dict()}, _rank_file(ckpt_dir / tag, rank))
    barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / STATE_JSON, json.dumps(state, indent=1) + "\n")
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one `latest` names) and their universal copies."""
    latest = read_latest(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


@dataclass
class ResumePlan:
    ckpt_dir: Path
    tag: str
    state: dict          # train_state.json of that checkpoint
    universal: bool      # load through a universal checkpoint (other world size or ZeRO stage)


def plan_resume(ckpt_dir: str | os.PathLike, world: int, stage: int, precision: str) -> ResumePlan | None:
    """Decide how to resume from `latest` (None: nothing to resume). Must run before the engine is built,
    because DeepSpeed reads `checkpoint.load_universal` at initialisation."""
    ckpt_dir = Path(ckpt_dir)
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    state = read_train_state(ckpt_dir, tag)
    same = state["world"] == world and state["zero_stage"] == stage and state["precision"] == precision
    replicated = state["zero_stage"] == 0 and state["precision"] == "fp32"
    if replicated and stage == 0 and precision == "fp32":
        return ResumePlan(ckpt_dir, tag, state, universal=False)  # full model+optimizer in rank 0's file
    if not same and replicated:
        raise RuntimeError(f"{ckpt_dir / tag}: a ZeRO stage 0 fp32 checkpoint can only be resumed by stage 0 "
                           f"fp32 (run was stage {stage} {precision})")
    return ResumePlan(ckpt_dir, tag, state, universal=not same)


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
                raise RuntimeError(f"universal conversion of {plan.ckpt_dir / plan.tag} failed: {tail}")
            os.replace(tmp, out)
        current = {canonical_name(n): n for n in param_names}
        for folder in sorted((out / "zero").iterdir()):
            want = current.get(canonical_name(folder.name))
            if folder.is_dir() and want is not None and want != folder.name:
                os.replace(folder, folder.with_name(want))
    barrier()
    return out.name


def load_checkpoint(engine, plan: ResumePlan) -> dict:
    """Collective: restore DeepSpeed state, this rank's EMA slices and RNG; returns the saved train_state."""
    names = [n for n, _ in engine.module.named_parameters()]
    tag = make_universal(plan, engine.dist.is_main, names) if plan.universal else plan.tag
    path, _ = engine.ds.load_checkpoint(str(plan.ckpt_dir), tag=tag, load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {plan.ckpt_dir / tag}")
    engine.repair_after_load()
    tag_dir = plan.ckpt_dir / plan.tag
    rank = engine.dist.rank
    if plan.state["world"] == engine.dist.world:
        files = [_rank_file(tag_dir, rank)] if plan.state["zero_stage"] else \
            [_rank_file(tag_dir, r) for r in range(plan.state["world"])]
    else:
        files = [_rank_file(tag_dir, r) for r in range(plan.state["world"])]
    saved = {f: torch.load(f, map_location="cpu", weights_only=False) for f in files}
    engine.ema.load_state_dicts(s["ema"] for s in saved.values())
    own = _rank_file(tag_dir, rank)
    if own in saved:
        set_rng_state(saved[own]["rng"])
    return plan.state


__all__ = ["CheckpointConfig", "ResumePlan", "save_checkpoint", "plan_resume", "load_checkpoint",
           "read_latest", "read_train_state", "tag_for", "prune", "rng_state", "set_rng_state"]
