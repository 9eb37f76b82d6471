"""The sampling component: ONE `Sampler` for the training grid, the demo, evaluation during training and
`tb-sample` (tb_train/sample/job.py).

Sample i's class, MAR order and head random numbers come from (seed, i) alone — a generator per sample,
seeded with `sample_seed(seed, i)` — so the set of images is identical for any world size and batch size.

Precision "auto" (the default) runs the model under bf16 autocast on a GPU and in fp32 elsewhere, so every
caller (tb-sample, the training grid, evaluation during training) gets the fast path on a GPU without
setting anything; `Sampler.precision` is what actually ran, the value a record of the images must hold.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from tb_core.errors import ConfigError
from tb_model.pretrained import read_config
from tb_model.tokenbridge import GenerationFns, TokenBridge, to_device
from tb_train.engine.rng import derive_seed

SEED_STREAM = 2  # derive_seed stream of sampling (0: model randomness, 1: posterior noise in training)
UINT8_RULE = "uint8 = round_half_even(clamp((x + 1) / 2 * 255, 0, 255)) in float32, x = VAE decode in [-1, 1]"
SEED_RULE = ("sample i: torch.Generator (CPU) seeded with derive_seed(seed, i, 0, 2) (blake2b of 'seed/i/0/2', "
             "63 bits); its random order and head uniforms are drawn per sample")


@dataclass
class SamplingConfig:
    """How images are generated (also the trainer's grid and evaluation during training)."""

    num_iter: int = 64                                        # MAR steps (64 fast, 256 for the paper's numbers)
    guidance: float = 1.0                                     # classifier-free guidance weight (paper: 3.1 L, 3.45 H)
    guidance_schedule: Literal["linear", "constant"] = "linear"  # linear: 1 -> guidance with the fraction generated
    temperature: float = 1.0                                  # paper: 0.97 L, 0.91 H
    order: Literal["random", "raster", "confidence"] = "random"
    batch_size: int = 32                                      # images per generate call per rank (no effect on images)
    precision: Literal["auto", "fp32", "bf16"] = "auto"       # auto: bf16 on CUDA, else fp32; bf16 = model autocast
    official: bool = False                                    # the released loop (2 MAR passes, no KV cache)
    compile: bool = False                                     # torch.compile MAR pass + head sampling (per Sampler)

    def __post_init__(self) -> None:
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample `index` (a function of (seed, index) only)."""
    return derive_seed(seed, index, 0, SEED_STREAM)


def to_uint8(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] by UINT8_RULE (MAR's/ADM's rule)."""
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


class Sampler:
    """model + VAE + settings -> images. Stateless apart from the modules it holds and, with
    `settings.compile`, the compiled MAR pass and head sampling step (traced in the first batch, reused after).

    model: a TokenBridge in eval mode on `device`; vae: a LatentVAE (None: `latents` only).
    compile_kwargs: extra torch.compile arguments when `settings.compile` (e.g. backend="aot_eager" where
    inductor's code generation would take minutes: CPU tests, tools/gpu_check.py --tiny).
    `precision`: the resolved `settings.precision` ("fp32" or "bf16"; never "auto").
    """

    def __init__(self, model: TokenBridge, vae, settings: SamplingConfig, device: str | torch.device = "cpu",
                 compile_kwargs: dict | None = None):
        self.model, self.vae, self.settings = model, vae, settings
        self.device = torch.device(device)
        self.precision = self.resolve_precision(settings.precision, self.device)
        self._fns: GenerationFns = model.generation_fns(compiled=settings.compile, **(compile_kwargs or {}))

    @staticmethod
    def resolve_precision(precision: str, device: str | torch.device) -> str:
        """"auto" -> "bf16" on CUDA (tensor cores), "fp32" elsewhere (a CPU without AMX or AVX512-BF16
        runs bf16 ~20x slower than fp32); "fp32" and "bf16" stay as they are."""
        if precision != "auto":
            return precision
        return "bf16" if torch.device(device).type == "cuda" else "fp32"

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def latents(self, labels: Sequence[int] | Tensor, indices: Sequence[int], seed: int) -> Tensor:
        """Scaled latents [B, C, h, w] of samples `indices` with classes `labels` (one batch)."""
        s = self.settings
        labels = to_device(torch.as_tensor(labels, dtype=torch.long), self.device)  # no host stall on a GPU
        gens = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        with self._autocast():
            out = self.model.generate(labels, num_iter=s.num_iter, cfg=s.guidance, cfg_schedule=s.guidance_schedule,
                                      temperature=s.temperature, order=s.order, generator=gens,
                                      official=s.official, fns=self._fns)
        return out.float()

    @torch.no_grad()
    def images(self, labels: Sequence[int] | Tensor, indices: Sequence[int], seed: int) -> Tensor:
        """Decoded images [B, 3, H, W] in about [-1, 1], generated `settings.batch_size` at a time."""
        if self.vae is None:
            raise ConfigError("Sampler.images needs a VAE (vae.path)")
        labels, indices = list(map(int, labels)), list(map(int, indices))
        out = []
        for a in range(0, len(indices), self.settings.batch_size):
            b = a + self.settings.batch_size
            out.append(self.vae.decode(self.latents(labels[a:b], indices[a:b], seed)))
        return torch.cat(out)


# -- loading -------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """An exported model file -> (TokenBridge in eval mode, the file's metadata: step, weights, ...)."""
    _, meta = read_config(path)
    return TokenBridge.from_pretrained(path, device=device), meta


__all__ = ["SEED_RULE", "SEED_STREAM", "UINT8_RULE", "Sampler", "SamplingConfig", "load_model", "sample_seed",
           "to_uint8"]
