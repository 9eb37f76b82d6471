"""`tb-train`: train a TokenBridge model on precomputed latent shards with DeepSpeed.

    tb-train --config configs/jobs/imagenet256_L.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 -m tb_train.train --config ...      (or: deepspeed --num_gpus 8 tools/train.py ...)

The job config (`TrainJobConfig`) is composed of the components' own configs; it is validated in full
(DeepSpeed's part by DeepSpeed's own config model), the data folder is checked (shard sizes always;
with data.verify, the shards' sha256 once per run and manifest, split over the ranks and remembered in
`<run.dir>/data_verified.json`; each member's crc32 at every read) and the resolved config is written to
`<run.dir>/config.yaml` before any step.
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

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from tb_core.config import dump_config
from tb_core.errors import ConfigError
from tb_core.hostmem import fix_mmap_threshold
from tb_core.runlock import RunLock
from tb_core.paths import resolve_path
from tb_model.config import ModelConfig, resolve
from tb_model.registry import create
from tb_train.cli import job_main
from tb_train.data.loader import DataConfig, LatentLoader
from tb_train.dist import DistInfo, agreed, init_distributed, shutdown
from tb_train.engine.checkpoint import CheckpointConfig, ResumePlan, plan_resume
from tb_train.engine.engine import (EngineConfig, TrainEngine, build_engine, deepspeed_config, resolve_grad_accum,
                                    validate_deepspeed_config)
from tb_train.engine.optim import OptimConfig
from tb_train.engine.rng import MODEL_SEED_STREAM, init_seed
from tb_train.train.logger import MetricsConfig, MetricsLogger, measure_peak_flops
from tb_train.train.periodic_eval import EvalConfig, PeriodicEval, check_eval_config
from tb_train.train.sample_grid import SampleGrid, SampleGridConfig
from tb_train.train.trainer import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PROG, BatchSource, Hook,
                                    PreemptionFlag, Trainer, checkpoint_dir)

__all__ = ["RunConfig", "TrainJobConfig", "run", "main", "MODEL_SEED_STREAM", "EXIT_OK", "EXIT_BAD_INPUT",
           "EXIT_NONFINITE", "EXIT_PREEMPTED"]


@dataclass
class RunConfig:
    dir: str = "runs/train"          # run folder: config.yaml, checkpoints/, tensorboard/, samples/
    seed: int = 0                    # weight init and per-micro-batch randomness (data order: data.seed)
    max_steps: int | None = None     # stop after this many optimizer steps (None: optim.epochs worth)

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


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
    return torch.stack([torch.from_numpy(loader.shards.image_mean(i)) for i in range(n)]) * loader.scale


@dataclass
class Prepared:
    """What `prepare` checked and built before anything is written."""
    loader: LatentLoader


def prepare(cfg: TrainJobConfig, source: str, dist: DistInfo) -> Prepared:
    """Resolve and check the whole job (config, DeepSpeed config, data, checkpoint to resume) before
    anything is written; raises a TBError naming the key or file. It completes `cfg` in place (the
    resolved model preset, grad_accum), which is what config.yaml then records."""
    cfg.model = resolve(cfg.model)
    cfg.engine.grad_accum = resolve_grad_accum(cfg.engine, cfg.data.micro_batch, dist.world)
    ds = deepspeed_config(cfg.engine, cfg.optim, cfg.data.micro_batch, dist.world)
    validate_deepspeed_config(ds, f"{source}: engine.deepspeed={cfg.engine.deepspeed} + engine.ds_overrides")
    if cfg.samples.vae is not None and not resolve_path(cfg.samples.vae.path).exists():
        raise ConfigError(f"{source}: samples.vae.path: {cfg.samples.vae.path} not found")
    check_eval_config(cfg.eval, source, cfg.samples.vae)
    # data.verify: this rank hashes its share of the shards (none on a restart that recorded this manifest in
    # run.dir); `agreed` around prepare stops every rank if any share is damaged
    loader = LatentLoader(cfg.data, dist.rank, dist.world, cfg.engine.grad_accum, run_dir=cfg.run.dir)
    check_data_matches_model(loader, cfg.model, source)
    return Prepared(loader)


def resume_plan(cfg: TrainJobConfig, dist: DistInfo) -> ResumePlan | None:
    """Collective: the ranks verify the checkpoint's files in parallel and agree; run after `prepare` was agreed."""
    if not cfg.checkpoint.resume:
        return None
    ds = deepspeed_config(cfg.engine, cfg.optim, cfg.data.micro_batch, dist.world)
    return plan_resume(checkpoint_dir(cfg), dist.world, int(ds["zero_optimization"]["stage"]), cfg.engine.precision,
                       warn=None if not dist.is_main else
                       (lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)))


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
    fix_mmap_threshold(int(cfg.engine.host_mmap_threshold_mb * 2 ** 20))
    dist = init_distributed()
    preempt = PreemptionFlag()
    trainer = lock = None
    try:
        prep = agreed(dist, lambda: prepare(cfg, source, dist))
        plan = agreed(dist, lambda: resume_plan(cfg, dist))
        # one job per run folder: a second tb-train (or a manual restart racing a requeue) stops here, after
        # the read-only checks (a bad config writes nothing, not even the lock) and before the first write
        lock = agreed(dist, lambda: RunLock(cfg.run.dir, PROG).acquire() if dist.is_main else None)
        if dist.is_main:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        engine = build_engine(build_model_fn(cfg, prep.loader), cfg.engine, cfg.optim, cfg.data.micro_batch, dist,
                              load_universal=bool(plan and plan.universal))
        metrics = build_metrics(cfg, dist, engine, prep.loader)
        trainer = Trainer(cfg, dist, engine, prep.loader, metrics, batches)
        evaluation = [PeriodicEval(cfg.eval, cfg.samples.vae)] if cfg.eval.every_steps else []
        for hook in (SampleGrid(cfg.samples, cfg.metrics.image_every), *evaluation, *hooks):
            trainer.add_hook(hook)
        agreed(dist, lambda: trainer.load(plan))
        return trainer.train(preempt)
    finally:
        if trainer is not None:
            trainer.metrics.close()
            trainer.loader.close()
        preempt.restore()
        if lock is not None:
            lock.release()
        shutdown()


def main(argv: list[str] | None = None, hooks: Iterable[Hook] = (), batches: BatchSource | None = None) -> int:
    return job_main(PROG, argv, lambda cfg, source, args: run(cfg, source, hooks=hooks, batches=batches))


if __name__ == "__main__":
    sys.exit(main())
