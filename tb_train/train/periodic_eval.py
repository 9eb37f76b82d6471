"""Evaluation during training: every K steps, FID (and IS) of M samples of the EMA weights.

A trainer hook (`Trainer.add_hook(PeriodicEval(cfg.eval, ...))`) configured by the job section `eval`:

    eval.every_steps=2000 eval.num_samples=5000 eval.reference=VIRTUAL_imagenet256_labeled.npz \\
    eval.extractor_weights=weights-inception-2015-12-05-6726825d.pth eval.sampling.num_iter=64

It uses the same pieces as `tb-sample` / `tb-eval`: the `Sampler` (sample i seeded by (eval.seed, i),
classes i % num_classes), the feature extractor protocol, and the metric functions. Samples are split
over the ranks in contiguous slices (the same image set for any world size), features are gathered to
rank 0, which computes FID/IS against the reference statistics (an ADM npz with mu/sigma, or real
images whose statistics are computed once and cached beside them) and logs `eval/fid`, `eval/is`,
`eval/class_consistency` (for an extractor whose logits are the model's classes, `predicts_model_classes`,
such as the demo's digit classifier), `eval/seconds` (this
evaluation, including the one-time setup on the first) and `eval/time_share` (evaluation time / wall
time of this process since the hook was made: the share of the job's time spent evaluating) to
TensorBoard beside the loss. Off by default (`every_steps: 0`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tb_core.errors import ConfigError, InputError
from tb_core.paths import resolve_path
from tb_model.vae import VAEConfig, load_vae
from tb_train.eval.adm import adm_inception_score
from tb_train.eval.features import build_extractor, check_extractor, extract_features
from tb_train.eval.metrics import Reference, feature_stats, frechet_distance, inception_score
from tb_train.eval.reference import load_reference, open_reference
from tb_train.sample.sampler import Sampler, SamplingConfig, to_uint8


@dataclass
class EvalConfig:
    """The `eval` section of a training job."""

    every_steps: int = 0                                    # evaluate every K optimizer steps; 0: off
    num_samples: int = 1000                                 # M images per evaluation, spread over the ranks
    seed: int = 0                                           # sample i is seeded by (seed, i): same set each time
    reference: str | None = None                            # ADM npz (mu/sigma) or real images (folder / npz)
    extractor: str = "inception"                            # feature network: inception or a registered one
    extractor_weights: str | None = None                    # inception: local torch-fidelity .pth (required)
    splits: int = 10                                        # IS splits under protocol equal_splits
    protocol: Literal["adm", "equal_splits"] = "adm"        # IS as ADM's evaluator (chunks of 5,000) or in
                                                            # `splits` equal splits (tb_train/eval/metrics.py)
    batch_size: int = 64                                    # images per extractor call
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vae: VAEConfig | None = None                            # decoder; None: the job's samples.vae

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.every_steps and self.num_samples < max(2, self.splits):
            raise ValueError(f"num_samples must be >= max(2, splits={self.splits}), got {self.num_samples}")


def check_eval_config(cfg: EvalConfig, source: str, vae: VAEConfig | None) -> None:
    """One-line errors before training starts (missing files), for an enabled section."""
    if not cfg.every_steps:
        return
    if not cfg.reference:
        raise ConfigError(f"{source}: eval.reference is required when eval.every_steps > 0")
    if not Path(cfg.reference).exists():
        raise ConfigError(f"{source}: eval.reference: {cfg.reference} not found")
    if cfg.extractor == "inception" and not cfg.extractor_weights:
        raise ConfigError(f"{source}: eval.extractor_weights (local Inception .pth) is required for extractor "
                          f"'inception'")
    check_extractor(cfg.extractor)
    if cfg.extractor_weights and not resolve_path(cfg.extractor_weights).is_file():
        raise ConfigError(f"{source}: eval.extractor_weights: {cfg.extractor_weights} not found")
    if (cfg.vae or vae) is None:
        raise ConfigError(f"{source}: evaluation needs a decoder: set eval.vae.path or samples.vae.path")


class PeriodicEval:
    """Trainer hook; `history` (step -> metrics) is saved in checkpoints under `name`."""

    name = "periodic_eval"

    def __init__(self, cfg: EvalConfig, vae: VAEConfig | None = None) -> None:
        self.cfg = cfg
        self.vae_cfg = cfg.vae or vae
        self.history: dict[int, dict[str, float]] = {}
        self.seconds = 0.0          # evaluation time over all runs (checkpointed)
        self._seconds_here = 0.0    # ... in this process, for time_share
        self._t0 = time.perf_counter()
        self._extractor = None
        self._weights_id = ""
        self._vae = None
        self._reference: Reference | None = None

    # -- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": {int(k): dict(v) for k, v in self.history.items()}, "seconds": self.seconds}

    def load_state_dict(self, sd: dict) -> None:
        self.history = {int(k): dict(v) for k, v in sd.get("history", {}).items()}
        self.seconds = float(sd.get("seconds", 0.0))

    # -- the hook --------------------------------------------------------------------------------------
    def on_step_end(self, trainer, result) -> None:
        every = self.cfg.every_steps
        if not every or trainer.step % every or trainer.step in self.history:
            return
        t = time.perf_counter()
        metrics = self.evaluate(trainer.ema_model(), trainer.dist)
        spent = time.perf_counter() - t
        self.seconds += spent
        self._seconds_here += spent
        if metrics is None:
            return
        metrics["seconds"] = spent
        metrics["time_share"] = self._seconds_here / max(time.perf_counter() - self._t0, 1e-9)
        self.history[trainer.step] = metrics
        writer = trainer.metrics.writer
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, trainer.step)
            writer.flush()
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"eval at step {trainer.step}: {shown}", flush=True)

    def _setup(self, dist) -> None:
        """Extractor, VAE and reference statistics, once (the reference step is collective)."""
        if self._extractor is not None:
            return
        self._extractor, self._weights_id = build_extractor(self.cfg.extractor, self.cfg.extractor_weights,
                                                            dist.device)
        self._vae = load_vae(self.vae_cfg, device=dist.device)
        images, given = open_reference(self.cfg.reference)
        self._reference = load_reference(self.cfg.reference, images, given, self._extractor, self._weights_id,
                                         dist.rank, dist.world, self.cfg.batch_size)  # None on ranks > 0

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dist) -> dict[str, float] | None:
        """Collective: this rank's slice of the M samples -> features -> rank 0 computes the metrics
        (returned there; None elsewhere)."""
        self._setup(dist)
        cfg = self.cfg
        classes = model.config.num_classes
        sampler = Sampler(model, self._vae, cfg.sampling, dist.device)

        def read(a: int, b: int) -> torch.Tensor:
            idx = range(a, b)
            return to_uint8(sampler.images([i % classes for i in idx], idx, cfg.seed)).permute(0, 3, 1, 2)

        feats = extract_features(read, cfg.num_samples, self._extractor, dist.rank, dist.world,
                                 cfg.sampling.batch_size, desc="eval samples")
        if dist.rank != 0:
            return None
        ref = self._reference
        if ref.mu.shape[0] != feats["pool"].shape[1]:
            raise InputError(f"{cfg.reference}: reference statistics have {ref.mu.shape[0]} dims, extractor "
                             f"'{cfg.extractor}' gives {feats['pool'].shape[1]}")
        out = {"fid": frechet_distance(*feature_stats(feats["pool"]), ref.mu, ref.sigma)}
        if "logits" in feats:
            out["is"] = (adm_inception_score(feats["logits"]) if cfg.protocol == "adm"
                         else inception_score(feats["logits"], cfg.splits))[0]
        if getattr(self._extractor, "predicts_model_classes", False):  # sample i asked for class i % classes
            asked = torch.arange(cfg.num_samples) % classes
            out["class_consistency"] = float((feats["logits"].argmax(1).cpu() == asked).float().mean())
        return out


__all__ = ["EvalConfig", "PeriodicEval", "check_eval_config"]
