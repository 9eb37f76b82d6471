"""Architecture of a TokenBridge model: the `ModelConfig` dataclass and the named size presets.

A field left at None takes the value of the preset named by `size`; `resolve` fills them all, so the
resolved config written into a run folder (and into an exported weights file) states the full
architecture. base/L/H: MAR width, encoder/decoder depth and heads as in MAR; the head's width and depth
per size; the head always has 8 attention heads, as in the authors' release. `tiny` is for CPU tests
and the demo. A new size is one more entry in PRESETS (see docs/model.md).

This module imports nothing of the model, so the model, the registry and the job configs can all
depend on it without an import cycle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from tb_core.errors import ConfigError

from .quantizer import QuantizerConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(width=64, encoder_depth=2, decoder_depth=2, num_heads=4,
                 head_width=64, head_depth=2, head_num_heads=4, buffer_size=16),
    "base": dict(width=768, encoder_depth=12, decoder_depth=12, num_heads=12,
                 head_width=768, head_depth=4, head_num_heads=8, buffer_size=64),
    "L": dict(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16,
              head_width=1024, head_depth=4, head_num_heads=8, buffer_size=64),
    "H": dict(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16,
              head_width=1024, head_depth=6, head_num_heads=8, buffer_size=64),
}


@dataclass
class ModelConfig:
    """Architecture of a TokenBridge model. None = take the value of the `size` preset.

    channel_order: "auto" (= "official_kl16" for 16 latent channels, else "identity"), "identity",
    "official_kl16", or an explicit permutation (generation order of the channels).
    head_type "parallel" is the paper's ablation; channel_group k > 1 predicts k channels per head
    step as one class out of levels**k.
    """

    size: str = "tiny"
    latent_size: int = 16
    latent_channels: int = 16
    num_classes: int = 1000
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    channel_order: str | list[int] = "auto"
    head_type: Literal["ar", "parallel"] = "ar"
    channel_group: int = 1
    width: int | None = None
    encoder_depth: int | None = None
    decoder_depth: int | None = None
    num_heads: int | None = None
    head_width: int | None = None
    head_depth: int | None = None
    head_num_heads: int | None = None
    buffer_size: int | None = None
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    label_drop: float = 0.1
    mask_ratio_min: float = 0.7


_POSITIVE = ("latent_size", "latent_channels", "num_classes", "channel_group", "width", "encoder_depth",
             "decoder_depth", "num_heads", "head_width", "head_depth", "head_num_heads")
MAX_CLASSES_PER_STEP = 2 ** 20


def resolve(cfg: ModelConfig) -> ModelConfig:
    """A copy with every None filled from the preset and channel_order 'auto' made concrete.

    Raises a one-line ConfigError naming the `model.<field>` at fault.
    """
    if cfg.size not in PRESETS:
        raise ConfigError(f"model size {cfg.size!r} is unknown (known: {', '.join(PRESETS)})")
    filled = {k: v for k, v in PRESETS[cfg.size].items() if getattr(cfg, k) is None}
    order = cfg.channel_order
    if order == "auto":
        order = "official_kl16" if cfg.latent_channels == 16 else "identity"
    out = dataclasses.replace(cfg, channel_order=order, **filled)
    for name in _POSITIVE:
        if getattr(out, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(out, name)}")
    if out.buffer_size < 0:
        raise ConfigError(f"model.buffer_size must be >= 0, got {out.buffer_size}")
    if out.latent_channels % out.channel_group:
        raise ConfigError(f"model.channel_group {out.channel_group} must divide latent_channels "
                          f"{out.latent_channels}")
    if out.quantizer.levels ** out.channel_group > MAX_CLASSES_PER_STEP:
        raise ConfigError(f"model.channel_group {out.channel_group} gives {out.quantizer.levels}**"
                          f"{out.channel_group} classes per head step; too many")
    for name, width, heads in (("num_heads", out.width, out.num_heads),
                               ("head_num_heads", out.head_width, out.head_num_heads)):
        if width % heads:
            raise ConfigError(f"model.{name} {heads} does not divide its width {width}")
    if not 0.0 < out.mask_ratio_min <= 1.0:
        raise ConfigError(f"model.mask_ratio_min must be in (0, 1], got {out.mask_ratio_min}")
    return out


__all__ = ["ModelConfig", "PRESETS", "resolve"]
