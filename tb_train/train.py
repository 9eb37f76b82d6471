"""`tb-train`: train a TokenBridge model on precomputed latent shards with DeepSpeed.

    tb-train --config configs/jobs/imagenet256_L.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 -m tb_train.train --config ...      (or: deepspeed --num_gpus 8 tools/train.py ...)

The job config (`TrainJobConfig`) is composed of the components' own configs; it is validated in full
(DeepSpeed's part by DeepSpeed's own config model), the data folder is checked (sha256 of every shard
unless data.verify=false) and the resolved config is written to `<run.dir>/config.yaml` before any step.
A run folder with a `checkpoints/latest` resumes automatically, at any world size; a damaged newest
checkpoint is reported and an older complete one is used.

`run` builds the parts (data loader, engine, metrics logger, `Trainer`), registers the hooks, then loads
the checkpoint into them, then trains. A hook is any object with `on_step_end(trainer, result)`; one
with `name`, `state_dict()` and `load_state_dict(sd)` is also saved in checkpoints under its name.

Exit status (what a scheduler wrapper acts on):
    0   finished (run.max_steps or optim.epochs reached; a final checkpoint was saved)
    2   bad config, input or checkpoint (one line on stderr)
    3   stopped: more than engine.nonfinite_patience non-finite steps in a row (no checkpoint written
        after the last good one, so `latest` is a good state)
    75  preempted: SIGTERM or SIGUSR2 arrived; every rank saved a checkpoint at the step boundary.
        Requeue the job; it resumes from that checkpoint with no lost step (EX_TEMPFAIL).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, TypeVar

import torch
import torch.distributed as tdist
import torch.nn as nn

from tb_core.config import dump_config, load_config
from tb_core.errors import ConfigError, TBError
from tb_model.config import ModelConfig, resolve
from tb_model.registry import create
from tb_model.tokenbridge import TokenBridge
from tb_model.vae import VAEConfig, load_vae, sample_latents
from tb_train.activation_ckpt import canonical_name
from tb_train.checkpoint import CheckpointConfig, CheckpointManager, ResumePlan, plan_resume
from tb_train.cli import job_parser, run_main
from tb_train.data import DataConfig, LatentLoader, MicroBatch
from tb_train.dist import DistInfo, any_flag, init_distributed, shutdown
from tb_train.engine import (EngineConfig, MicroInput, StepResult, TrainEngine, build_engine, deepspeed_config,
                             resolve_grad_accum, validate_deepspeed_config)
from tb_train.metrics import MetricsConfig, MetricsLogger, measure_peak_flops
from tb_train.optim import OptimConfig, lr_at
from tb_train.periodic_eval import EvalConfig, PeriodicEval, check_eval_config
from tb_train.recipes import config_path
from tb_train.rng import MODEL_SEED_STREAM, MODEL_STREAM, NOISE_STREAM, ProcessRNG, derive_seed, init_seed
from tb_train.sample import Sampler, SamplingConfig
from tb_train.state import TrainState

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 75
PROG = "tb-train"
T = TypeVar("T")
__all__ = ["RunConfig", "SampleGridConfig", "TrainJobConfig", "Trainer", "SampleGrid", "PreemptionFlag", "run",
           "main", "MODEL_SEED_STREAM", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_NONFINITE", "EXIT_PREEMPTED"]


@dataclass
class RunConfig:
    dir: str = "runs/train"          # run folder: config.yaml, checkpoints/, tensorboard/, samples/
    seed: int = 0                    # weight init and per-micro-batch randomness (data order: data.seed)
    max_steps: int | None = None     # stop after this many optimizer steps (None: optim.epochs worth)

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass
class SampleGridConfig:
    """The EMA sample grid written every metrics.image_every steps."""
    num_images: int = 16
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_iter=16))  # batch_size: num_images
    vae: VAEConfig | None = None     # decode to pixels; None: show latent channels 0-2 as colours


@dataclass
class TrainJobConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


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


def checkpoint_dir(cfg: TrainJobConfig) -> Path:
    """checkpoint.dir, default <run.dir>/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / "checkpoints"


def check_data_matches_model(loader: LatentLoader, model: ModelConfig, source: str) -> None:
    """The latents on disk must have the model's channel count and grid size (one-line error)."""
    vae = loader.shards.manifest["vae"]
    moments, _ = loader.shards.read(0)
    c, h = vae["latent_channels"], moments.shape[-1]
    if (c, h) != (model.latent_channels, model.latent_size):
        raise ConfigError(f"{source}: data {loader.cfg.path} holds {c}x{h}x{h} latents but the model expects "
                          f"model.latent_channels={model.latent_channels}, model.latent_size={model.latent_size}")
    classes = len(loader.shards.manifest.get("classes") or [])
    if classes > model.num_classes:
        raise ConfigError(f"{source}: data has {classes} classes, model.num_classes is {model.num_classes}")


def calibration_latents(loader: LatentLoader, max_samples: int = 4096) -> torch.Tensor:
    """Scaled posterior means [N, C, h, w] of the first samples (same on every rank) for empirical tables."""
    n = min(len(loader.shards), max_samples)
    means = [torch.from_numpy(loader.shards.read(i)[0][0].astype("float32")) for i in range(n)]
    c = means[0].shape[0] // 2
    return torch.stack([m[:c] for m in means]) * loader.scale


def latent_preview(latents: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Scaled latents [N, C, h, w] → images [N, 3, size, size] in [-1, 1]: channels 0-2 as RGB."""
    x = latents.float()
    rgb = x[:, [i % x.shape[1] for i in range(3)]]
    rgb = torch.tanh(rgb / (rgb.std() + 1e-6))
    return nn.functional.interpolate(rgb, size=(size, size), mode="nearest")


def agree(dist: DistInfo, error: TBError | None) -> None:
    """Collective: raise on every rank if any rank hit `error` (else return).

    Rank 0 raises the failing rank's error (its own, or one carrying the lowest failing rank's message
    and exit status), so the CLI prints one line; other ranks raise `_Quiet` with that exit status. A
    rank that fails alone would otherwise leave the others waiting in their next collective.
    """
    if not any_flag(error is not None, dist.device):
        return
    reports = [(dist.rank, str(error), error.exit_code) if error is not None else None]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, reports[0])
        reports = gathered
    rank, message, code = next(r for r in reports if r is not None)
    if not dist.is_main:
        raise _Quiet(code)
    if error is not None:
        raise error
    failure = TBError(f"rank {rank}: {message}")
    failure.exit_code = code
    raise failure


class _Quiet(Exception):
    """Another rank failed and rank 0 reports it; this rank exits with `code` without printing."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def agreed(dist: DistInfo, fn: Callable[[], T]) -> T:
    """`fn()` on every rank; a TBError on any rank is raised on all of them (see `agree`)."""
    try:
        result = fn()
    except TBError as e:
        agree(dist, e)
        raise  # unreachable: agree raised
    agree(dist, None)
    return result


class Trainer:
    """The training loop over built parts; `load` restores them from a checkpoint, `train` runs.

    Parts: the engine (DeepSpeed + EMA), the data loader, the metrics logger, `state` (TrainState) and the
    process RNG, registered in `checkpoints` with the hooks that carry state. `batches(trainer, step)`
    supplies this rank's micro-batches (default: the loader's next ones); posterior samples are drawn
    from them here, seeded per (run.seed, step, micro_id).
    """

    def __init__(self, cfg: TrainJobConfig, dist: DistInfo, engine: TrainEngine, loader: LatentLoader,
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
            rank_states={"ema": engine.ema, "rng": ProcessRNG()})
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


class SampleGrid:
    """Hook: every `metrics.image_every` steps, an EMA sample grid (collective; rank 0 generates and logs
    it as TensorBoard image "samples/ema" and samples/step_XXXXXXX.png)."""

    name = "sample_grid"

    def __init__(self, cfg: SampleGridConfig, every: int):
        self.cfg, self.every = cfg, every
        self._vae = None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not self.every or trainer.step % self.every:
            return
        model = trainer.ema_model()
        if not trainer.dist.is_main:
            return
        sc, device = self.cfg, trainer.dist.device
        settings = dataclasses.replace(sc.sampling, batch_size=sc.num_images)
        labels = [i % trainer.cfg.model.num_classes for i in range(sc.num_images)]
        latents = Sampler(model, None, settings, device).latents(labels, range(sc.num_images), trainer.cfg.run.seed)
        with torch.no_grad():
            images = self._decode(latents, device)
        trainer.metrics.log_image_grid("samples/ema", images, trainer.step)

    def _decode(self, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.cfg.vae is None:
            return latent_preview(latents)
        if self._vae is None:
            self._vae = load_vae(self.cfg.vae, device=device)
        return self._vae.decode(latents)


@dataclass
class Prepared:
    """What `prepare` checked and built before anything is written."""
    loader: LatentLoader
    plan: ResumePlan | None


def prepare(cfg: TrainJobConfig, source: str, dist: DistInfo) -> Prepared:
    """Resolve and check the whole job (config, DeepSpeed config, data, checkpoint to resume) without
    writing anything; raises a TBError naming the key or file."""
    cfg.model = resolve(cfg.model)
    cfg.engine.grad_accum = resolve_grad_accum(cfg.engine, cfg.data.micro_batch, dist.world)
    ds = deepspeed_config(cfg.engine, cfg.optim, cfg.data.micro_batch, dist.world)
    validate_deepspeed_config(ds, f"{source}: engine.deepspeed={cfg.engine.deepspeed} + engine.ds_overrides")
    if cfg.samples.vae is not None and not Path(cfg.samples.vae.path).exists():
        raise ConfigError(f"{source}: samples.vae.path: {cfg.samples.vae.path} not found")
    check_eval_config(cfg.eval, source, cfg.samples.vae)
    loader = LatentLoader(cfg.data, dist.rank, dist.world, cfg.engine.grad_accum)
    check_data_matches_model(loader, cfg.model, source)
    plan = None
    if cfg.checkpoint.resume:
        plan = plan_resume(checkpoint_dir(cfg), dist.world, int(ds["zero_optimization"]["stage"]), cfg.engine.precision,
                           warn=None if not dist.is_main else
                           (lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)))
    return Prepared(loader, plan)


def build_model_fn(cfg: TrainJobConfig, loader: LatentLoader) -> Callable[[], nn.Module]:
    """The model constructor for the engine: seeded by run.seed, quantizer calibrated when empirical."""
    calib = calibration_latents(loader) if cfg.model.quantizer.scheme == "empirical" else None

    def model_fn() -> nn.Module:
        torch.manual_seed(init_seed(cfg.run.seed))
        model = create(cfg.model)
        if calib is not None:
            model.quantizer.calibrate(calib, channel_dim=1)
        return model

    return model_fn


def build_metrics(cfg: TrainJobConfig, dist: DistInfo, engine: TrainEngine, loader: LatentLoader) -> MetricsLogger:
    return MetricsLogger(
        cfg.metrics, cfg.run.dir, dist.rank, flops_per_sample=engine.module.flops_per_sample(),
        peak_flops=measure_peak_flops(engine.dtype, dist.device) if dist.is_main else None,
        samples_per_epoch=loader.steps_per_epoch * loader.global_batch, global_batch=loader.global_batch,
        tokens_per_sample=cfg.model.latent_size ** 2 * cfg.model.latent_channels, world=dist.world)


def run(cfg: TrainJobConfig, source: str = "<config>", hooks: Iterable[Hook] = (),
        batches: BatchSource | None = None) -> int:
    """Run (or resume) the training job described by `cfg`; returns the exit status (module docstring).

    A bad config, input or checkpoint raises its TBError on rank 0 (after every rank agreed to stop);
    other ranks return its exit status quietly. hooks: added after the built-in sample-grid hook.
    batches: replaces the data loader as the source of micro-batches (tests, tools).
    """
    dist = init_distributed()
    preempt = PreemptionFlag()
    trainer = None
    try:
        prep = agreed(dist, lambda: prepare(cfg, source, dist))
        if dist.is_main:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        plan = prep.plan
        engine = build_engine(build_model_fn(cfg, prep.loader), cfg.engine, cfg.optim, cfg.data.micro_batch, dist,
                              load_universal=bool(plan and plan.universal))
        metrics = build_metrics(cfg, dist, engine, prep.loader)
        trainer = Trainer(cfg, dist, engine, prep.loader, metrics, batches)
        evaluation = [PeriodicEval(cfg.eval, cfg.samples.vae)] if cfg.eval.every_steps else []
        for hook in (SampleGrid(cfg.samples, cfg.metrics.image_every), *evaluation, *hooks):
            trainer.add_hook(hook)
        agreed(dist, lambda: trainer.load(plan))
        return trainer.train(preempt)
    except _Quiet as q:
        return q.code
    finally:
        if trainer is not None:
            trainer.metrics.close()
            trainer.loader.close()
        preempt.restore()
        shutdown()


def load_job_config(argv: list[str]) -> tuple[TrainJobConfig, str]:
    args = job_parser(PROG, "Train a TokenBridge model with DeepSpeed.").parse_args(argv)
    path = config_path(args.config, "jobs")
    return load_config(TrainJobConfig, path, args.overrides), str(path)


def main(argv: list[str] | None = None, hooks: Iterable[Hook] = (), batches: BatchSource | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_main(PROG, lambda: run(*load_job_config(argv), hooks=hooks, batches=batches))


if __name__ == "__main__":
    sys.exit(main())
