"""The training loop (`Trainer`) over built parts, its hook protocol and the preemption flag.

`tb_train.train.job` builds the parts (loader, engine, metrics logger) and hands them to a `Trainer`;
hooks (the sample grid, evaluation during training, a user's) run after every optimizer step.
Exit statuses of `train` are those of tb-train (job.py's docstring).
"""
from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from tb_model.registry import create
from tb_model.tokenbridge import TokenBridge
from tb_model.vae import sample_latents
from tb_train.data.loader import LatentLoader, MicroBatch
from tb_train.dist import DistInfo, agreed, any_flag
from tb_train.engine.activation_ckpt import canonical_name
from tb_train.engine.checkpoint import CHECKPOINTS, EMA_PART, CheckpointManager, ResumePlan
from tb_train.engine.engine import MicroInput, StepResult, TrainEngine
from tb_train.engine.optim import lr_at
from tb_train.engine.rng import MODEL_STREAM, NOISE_STREAM, ProcessRNG, derive_seed
from tb_train.engine.state import TrainState
from tb_train.train.logger import MetricsLogger

if TYPE_CHECKING:
    from tb_train.train.job import TrainJobConfig

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 75
PROG = "tb-train"


class Hook(Protocol):
    """Called after every optimizer step on every rank (collectives inside are allowed: all ranks call)."""

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None: ...


# Source of this rank's micro-batches for a step: (trainer, step) -> `accum` MicroBatches.
BatchSource = Callable[["Trainer", int], list[MicroBatch]]


class PreemptionFlag:
    """SIGTERM/SIGUSR2 handlers that only set a flag (no I/O, no collectives inside a handler).

    The handlers that were installed before (e.g. submitit's requeue handler) are kept in `previous`
    for a scheduler wrapper that wants to call them after the checkpoint is safe.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def checkpoint_dir(cfg: "TrainJobConfig") -> Path:
    """checkpoint.dir, default <run.dir>/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / CHECKPOINTS


class Trainer:
    """The training loop over built parts; `load` restores them from a checkpoint, `train` runs.

    Parts: the engine (DeepSpeed + EMA), the data loader, the metrics logger, `state` (TrainState) and the
    process RNG, registered in `checkpoints` with the hooks that carry state. `batches(trainer, step)`
    supplies this rank's micro-batches (default: the loader's next ones); posterior samples are drawn
    from them here, seeded per (run.seed, step, micro_id).
    """

    def __init__(self, cfg: "TrainJobConfig", dist: DistInfo, engine: TrainEngine, loader: LatentLoader,
                 metrics: MetricsLogger, batches: BatchSource | None = None):
        self.cfg, self.dist, self.engine, self.loader, self.metrics = cfg, dist, engine, loader, metrics
        self.run_dir = Path(cfg.run.dir)
        self.state = TrainState()
        self.batches: BatchSource = batches or (lambda trainer, step: trainer.loader.next_step())
        self.hooks: list[Hook] = []
        self.total_steps = cfg.run.max_steps or math.ceil(cfg.optim.epochs * loader.steps_per_epoch)
        self.preempt: PreemptionFlag | None = None
        self.checkpoints = CheckpointManager(
            checkpoint_dir(cfg), cfg.checkpoint.keep_last, engine,
            states={"train": self.state, "data": loader, "metrics": metrics},
            rank_states={EMA_PART: engine.ema, "rng": ProcessRNG()})
        self._ema_model: TokenBridge | None = None

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.state.step

    def add_hook(self, hook: Hook) -> None:
        """Call `hook.on_step_end(trainer, result)` after every step; a hook with `name` and `state_dict`
        is saved and restored with the checkpoints (add it before `load`)."""
        self.hooks.append(hook)
        if hasattr(hook, "state_dict") and hasattr(hook, "load_state_dict"):
            self.checkpoints.register(hook.name, hook)

    def load(self, plan: ResumePlan | None) -> None:
        """Collective: restore every part from `plan`'s checkpoint (None: a fresh start)."""
        if plan is None:
            return
        self.checkpoints.load(plan)
        if self.dist.is_main:
            how = f" (universal: world {plan.meta['world']} -> {self.dist.world})" if plan.universal else ""
            print(f"resumed from {plan.ckpt_dir / plan.tag} at step {self.step}{how}", flush=True)

    def save(self) -> None:
        self.checkpoints.save(self.step)

    def micro_inputs(self, step: int) -> list[MicroInput]:
        """This rank's micro-batches of `step`: posterior samples × scale, seeded per (seed, step, micro_id)."""
        seed = self.cfg.run.seed
        out = []
        for mb in self.batches(self, step):
            gen = torch.Generator().manual_seed(derive_seed(seed, step, mb.micro_id, NOISE_STREAM))
            latents = sample_latents(mb.moments, self.loader.scale, generator=gen)
            out.append(MicroInput(latents, mb.labels, derive_seed(seed, step, mb.micro_id, MODEL_STREAM)))
        return out

    @torch.no_grad()
    def ema_model(self) -> TokenBridge:
        """Collective: a TokenBridge holding the EMA weights (and the training model's buffers), in eval
        mode on this rank's device, on EVERY rank (so sampling can be split over ranks). The model object
        is reused across calls; its weights are refreshed each time."""
        weights = self.engine.ema.gather(dst=None)
        if self._ema_model is None:
            self._ema_model = create(self.cfg.model).to(self.dist.device)
        weights.update({canonical_name(n): b for n, b in self.engine.module.named_buffers()})
        self._ema_model.load_state_dict(weights, strict=True)
        return self._ema_model.eval()

    def train(self, preempt: PreemptionFlag) -> int:
        cfg, loader, state = self.cfg, self.loader, self.state
        self.preempt = preempt
        every = cfg.checkpoint.every_steps
        saved_at = self.step
        while self.step < self.total_steps:
            if any_flag(preempt.received is not None, self.dist.device):
                if saved_at != self.step:
                    self.save()
                if self.dist.is_main:
                    print(f"preempted: saved step {self.step}, exiting with status {EXIT_PREEMPTED}", flush=True)
                return EXIT_PREEMPTED
            self.metrics.step_start()
            micro = agreed(self.dist, lambda: self.micro_inputs(self.step))
            self.metrics.data_ready()
            result = self.engine.step(micro, lr_at(cfg.optim, self.step, loader.steps_per_epoch))
            state.record(result.skipped)
            scalars = {"lr": result.lr, "nonfinite_steps": float(state.nonfinite_total)}
            if not result.skipped:
                scalars["loss"] = result.loss
                if result.grad_norm is not None:
                    scalars["grad_norm"] = result.grad_norm
                scalars.update({f"ce/ch{i:02d}": float(v) for i, v in enumerate(result.ce_per_channel)})
            self.metrics.step_end(self.step, loader.samples_seen, scalars)
            for hook in self.hooks:
                hook.on_step_end(self, result)
            if result.skipped:
                if self.dist.is_main:
                    print(f"step {self.step}: non-finite loss or input, update skipped "
                          f"({state.nonfinite_in_a_row} in a row)", flush=True)
                if state.nonfinite_in_a_row > cfg.engine.nonfinite_patience:
                    if self.dist.is_main:
                        print(f"{PROG}: stopping: {state.nonfinite_in_a_row} non-finite steps in a row "
                              f"(engine.nonfinite_patience={cfg.engine.nonfinite_patience}); last good checkpoint "
                              f"is step {saved_at} in {self.checkpoints.dir}", file=sys.stderr, flush=True)
                    return EXIT_NONFINITE
            if every and self.step % every == 0:
                self.save()
                saved_at = self.step
        if saved_at != self.step:
            self.save()
        return EXIT_OK


__all__ = ["BatchSource", "Hook", "PreemptionFlag", "Trainer", "checkpoint_dir", "EXIT_OK", "EXIT_BAD_INPUT",
           "EXIT_NONFINITE", "EXIT_PREEMPTED"]
