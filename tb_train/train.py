"""`tb-train`: train a TokenBridge model on precomputed latent shards with DeepSpeed.

    tb-train --config configs/jobs/imagenet256_L.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 -m tb_train.train --config ...      (or: deepspeed --num_gpus 8 tools/train.py ...)

The job config (`TrainJobConfig`) is composed of the components' own configs; it is validated in full,
the data folder is checked (sha256 of every shard unless data.verify=false) and the resolved config is
written to `<run.dir>/config.yaml` before any step. A run folder with a `checkpoints/latest` resumes
automatically, at any world size.

Exit status (what a scheduler wrapper acts on):
    0   finished (run.max_steps or optim.epochs reached; a final checkpoint was saved)
    2   bad config or input, detected before the first step (one line on stderr)
    3   stopped: more than engine.nonfinite_patience non-finite steps in a row (no checkpoint written
        after the last good one, so `latest` is a good state)
    75  preempted: SIGTERM or SIGUSR2 arrived; every rank saved a checkpoint at the step boundary.
        Requeue the job; it resumes from that checkpoint with no lost step (EX_TEMPFAIL).
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from tb_model.registry import ModelConfig, create, resolve
from tb_model.vae import VAEConfig, sample_latents
from tb_train.checkpoint import CheckpointConfig, load_checkpoint, plan_resume, save_checkpoint
from tb_core.config import dump_config, load_config
from tb_core.errors import ConfigError, InputError
from tb_train.data import DataConfig, LatentLoader
from tb_train.dist import DistInfo, any_flag, init_distributed, shutdown
from tb_train.engine import (EngineConfig, MicroInput, OptimConfig, StepResult, TrainEngine, build_engine,
                             canonical_name, deepspeed_config, derive_seed, lr_at,
                             resolve_grad_accum)
from tb_train.metrics import MetricsConfig, MetricsLogger, measure_peak_flops

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 75
MODEL_SEED_STREAM = 2 ** 31 - 1  # micro_id slot for the weight-init seed (never a real micro-batch id)


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
    num_iter: int = 16               # generation steps (64 fast, 256 paper)
    cfg: float = 1.0                 # guidance weight
    temperature: float = 1.0
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
    run: RunConfig = field(default_factory=RunConfig)


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


class Trainer:
    """Owns the loop state; `callbacks` (trainer, StepResult) run after every step (tests, tools)."""

    def __init__(self, cfg: TrainJobConfig, dist: DistInfo, loader: LatentLoader, stage: int):
        self.cfg, self.dist, self.loader = cfg, dist, loader
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.callbacks: list[Callable[["Trainer", StepResult], None]] = []
        self.step = 0
        self.total_steps = cfg.run.max_steps or math.ceil(cfg.optim.epochs * loader.steps_per_epoch)
        self.preempt: PreemptionFlag | None = None
        plan = plan_resume(self.ckpt_dir, dist.world, stage, cfg.engine.precision) \
            if cfg.checkpoint.resume else None
        calib = calibration_latents(loader) if cfg.model.quantizer.scheme == "empirical" else None

        def model_fn() -> nn.Module:
            torch.manual_seed(derive_seed(cfg.run.seed, 0, MODEL_SEED_STREAM, 0))
            model = create(cfg.model)
            if calib is not None:
                model.quantizer.calibrate(calib, channel_dim=1)
            return model

        self.engine: TrainEngine = build_engine(model_fn, cfg.engine, cfg.optim, cfg.data.micro_batch, dist,
                                                load_universal=bool(plan and plan.universal))
        if plan is not None:
            state = load_checkpoint(self.engine, plan)
            self.step = int(state["step"])
            self.loader.load_state_dict(state["data"])
            self.engine.nonfinite_total = int(state.get("nonfinite_total", 0))
            if dist.is_main:
                how = f" (universal: world {plan.state['world']} -> {dist.world})" if plan.universal else ""
                print(f"resumed from {plan.ckpt_dir / plan.tag} at step {self.step}{how}", flush=True)
        model = self.engine.module
        self.metrics = MetricsLogger(
            cfg.metrics, str(self.run_dir), dist.rank, flops_per_sample=model.flops_per_sample(),
            peak_flops=measure_peak_flops(self.engine.dtype, dist.device) if dist.is_main else None,
            samples_per_epoch=loader.steps_per_epoch * loader.global_batch, global_batch=loader.global_batch,
            tokens_per_sample=cfg.model.latent_size ** 2 * cfg.model.latent_channels, world=dist.world)
        self._sampler: nn.Module | None = None
        self._vae = None

    def micro_inputs(self, step: int) -> list[MicroInput]:
        """This rank's micro-batches of `step`: posterior samples × scale, seeded per (seed, step, micro_id)."""
        seed = self.cfg.run.seed
        out = []
        for mb in self.loader.next_step():
            gen = torch.Generator().manual_seed(derive_seed(seed, step, mb.micro_id, 1))
            latents = sample_latents(mb.moments, self.loader.scale, generator=gen)
            out.append(MicroInput(latents, mb.labels, derive_seed(seed, step, mb.micro_id, 0)))
        return out

    def save(self) -> None:
        state = {"step": self.step, "epoch": self.loader.epoch, "data": self.loader.state_dict(),
                 "nonfinite_total": self.engine.nonfinite_total, "seed": self.cfg.run.seed,
                 "activation_checkpointing": self.cfg.engine.activation_checkpointing}
        save_checkpoint(self.engine, self.ckpt_dir, state, self.cfg.checkpoint.keep_last)

    @torch.no_grad()
    def sample_grid(self) -> None:
        """Collective (EMA gather); rank 0 then generates with the EMA weights and logs the grid."""
        ema = self.engine.ema.gather(dst=0)
        if not self.dist.is_main:
            return
        sc = self.cfg.samples
        if self._sampler is None:
            self._sampler = create(self.cfg.model).to(self.dist.device).eval()
        weights = dict(ema)
        weights.update({canonical_name(n): b for n, b in self.engine.module.named_buffers()})
        self._sampler.load_state_dict(weights, strict=True)
        labels = torch.arange(sc.num_images, device=self.dist.device) % self.cfg.model.num_classes
        gen = torch.Generator(self.dist.device).manual_seed(self.cfg.run.seed)
        latents = self._sampler.generate(labels, num_iter=sc.num_iter, cfg=sc.cfg, temperature=sc.temperature,
                                         generator=gen)
        if sc.vae is not None:
            if self._vae is None:
                from tb_model.vae import load_vae
                self._vae = load_vae(sc.vae, device=self.dist.device)
            images = self._vae.decode(latents)
        else:
            images = latent_preview(latents)
        self.metrics.log_image_grid("samples/ema", images, self.step)

    def train(self, preempt: PreemptionFlag) -> int:
        cfg, loader = self.cfg, self.loader
        self.preempt = preempt
        every, image_every = cfg.checkpoint.every_steps, cfg.metrics.image_every
        saved_at = self.step
        while self.step < self.total_steps:
            if any_flag(preempt.received is not None, self.dist.device):
                self.save()
                if self.dist.is_main:
                    print(f"preempted: saved step {self.step}, exiting with status {EXIT_PREEMPTED}", flush=True)
                return EXIT_PREEMPTED
            self.metrics.step_start()
            micro = self.micro_inputs(self.step)
            self.metrics.data_ready()
            result = self.engine.step(micro, lr_at(cfg.optim, self.step, loader.steps_per_epoch))
            self.step += 1
            scalars = {"lr": result.lr, "nonfinite_steps": float(self.engine.nonfinite_total)}
            if not result.skipped:
                scalars["loss"] = result.loss
                if result.grad_norm is not None:
                    scalars["grad_norm"] = result.grad_norm
                scalars.update({f"ce/ch{i:02d}": float(v) for i, v in enumerate(result.ce_per_channel)})
            self.metrics.step_end(self.step, loader.samples_seen, scalars)
            for callback in self.callbacks:
                callback(self, result)
            if result.skipped:
                in_a_row = self.engine.nonfinite_in_a_row
                if self.dist.is_main:
                    print(f"step {self.step}: non-finite loss or input, update skipped ({in_a_row} in a row)",
                          flush=True)
                if in_a_row > cfg.engine.nonfinite_patience:
                    if self.dist.is_main:
                        print(f"tb-train: stopping: {in_a_row} non-finite steps in a row "
                              f"(engine.nonfinite_patience={cfg.engine.nonfinite_patience}); last good checkpoint "
                              f"is step {saved_at} in {self.ckpt_dir}", file=sys.stderr, flush=True)
                    return EXIT_NONFINITE
            if every and self.step % every == 0:
                self.save()
                saved_at = self.step
            if image_every and self.step % image_every == 0:
                self.sample_grid()
        if saved_at != self.step:
            self.save()
        return EXIT_OK


def _fail(dist: DistInfo, error: Exception | None) -> bool:
    """Collective: True on every rank if any rank hit `error`; rank 0 prints its one-line message."""
    failed = any_flag(error is not None, dist.device)
    if failed and dist.is_main:
        msg = str(error) if error is not None else "another rank failed to start (see its log)"
        print(f"tb-train: error: {msg}", file=sys.stderr, flush=True)
    return failed


def run(cfg: TrainJobConfig, source: str = "<config>",
        callbacks: list[Callable[[Trainer, StepResult], None]] = ()) -> int:
    """Run (or resume) the training job described by `cfg`; returns the exit status (module docstring)."""
    dist = init_distributed()
    preempt = PreemptionFlag()
    try:
        error = None
        try:
            cfg.model = resolve(cfg.model)
            cfg.engine.grad_accum = resolve_grad_accum(cfg.engine, cfg.data.micro_batch, dist.world)
            stage = int(deepspeed_config(cfg.engine, cfg.optim, cfg.data.micro_batch,
                                         dist.world)["zero_optimization"]["stage"])
            if cfg.samples.vae is not None and not Path(cfg.samples.vae.path).exists():
                raise ConfigError(f"{source}: samples.vae.path: {cfg.samples.vae.path} not found")
            loader = LatentLoader(cfg.data, dist.rank, dist.world, cfg.engine.grad_accum)
            check_data_matches_model(loader, cfg.model, source)
        except (ConfigError, InputError, ValueError) as e:
            error = e
        if _fail(dist, error):
            return EXIT_BAD_INPUT
        if dist.is_main:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        trainer = Trainer(cfg, dist, loader, stage)
        trainer.callbacks.extend(callbacks)
        try:
            return trainer.train(preempt)
        finally:
            trainer.metrics.close()
            loader.close()
    finally:
        preempt.restore()
        shutdown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tb-train", description="Train a TokenBridge model with DeepSpeed.")
    p.add_argument("--config", required=True, help="job YAML (e.g. configs/jobs/imagenet256_L.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.grad_accum=4 optim.lr=4e-4")
    return p.parse_args(argv)


def load_job_config(argv: list[str]) -> tuple[TrainJobConfig, str]:
    args = parse_args(argv)
    return load_config(TrainJobConfig, args.config, args.overrides), args.config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, source = load_job_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"tb-train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(cfg, source)


if __name__ == "__main__":
    sys.exit(main())
