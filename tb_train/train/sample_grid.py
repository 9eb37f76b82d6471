"""Trainer hook: an EMA sample grid every `metrics.image_every` steps, logged to TensorBoard."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tb_model.tokenbridge import TokenBridge
from tb_model.vae import VAEConfig, load_vae
from tb_train.engine.engine import StepResult
from tb_train.sample.sampler import Sampler, SamplingConfig
from tb_train.train.trainer import Trainer


@dataclass
class SampleGridConfig:
    """The EMA sample grid written every metrics.image_every steps."""
    num_images: int = 16
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_iter=16))  # batch_size: num_images
    vae: VAEConfig | None = None     # decode to pixels; None: show latent channels 0-2 as colours


def latent_preview(latents: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Scaled latents [N, C, h, w] → images [N, 3, size, size] in [-1, 1]: channels 0-2 as RGB."""
    x = latents.float()
    rgb = x[:, [i % x.shape[1] for i in range(3)]]
    rgb = torch.tanh(rgb / (rgb.std() + 1e-6))
    return nn.functional.interpolate(rgb, size=(size, size), mode="nearest")


class SampleGrid:
    """Hook: every `metrics.image_every` steps, an EMA sample grid (collective; rank 0 generates and logs
    it as TensorBoard image "samples/ema" and samples/step_XXXXXXX.png)."""

    name = "sample_grid"

    def __init__(self, cfg: SampleGridConfig, every: int):
        self.cfg, self.every = cfg, every
        self._vae = None
        self._sampler: Sampler | None = None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not self.every or trainer.step % self.every:
            return
        model = trainer.ema_model()
        if not trainer.dist.is_main:
            return
        sc, device = self.cfg, trainer.dist.device
        labels = [i % trainer.cfg.model.num_classes for i in range(sc.num_images)]
        latents = self._sampler_for(model, device).latents(labels, range(sc.num_images), trainer.cfg.run.seed)
        with torch.no_grad():
            images = self._decode(latents, device)
        trainer.metrics.log_image_grid("samples/ema", images, trainer.step)

    def _sampler_for(self, model: TokenBridge, device: torch.device) -> Sampler:
        """One Sampler for as long as the trainer hands over the same EMA model object (it reuses it), so
        with `sampling.compile` the MAR pass and the head are compiled at the first grid only."""
        if self._sampler is None or self._sampler.model is not model:
            settings = dataclasses.replace(self.cfg.sampling, batch_size=self.cfg.num_images)
            self._sampler = Sampler(model, None, settings, device)
        return self._sampler

    def _decode(self, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.cfg.vae is None:
            return latent_preview(latents)
        if self._vae is None:
            self._vae = load_vae(self.cfg.vae, device=device)
        return self._vae.decode(latents)
