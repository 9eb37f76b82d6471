"""Named model sizes (`tiny`, `base`, `L`, `H`): build a model from a name or a config, count its parameters.

The sizes themselves live in `tb_model.config.PRESETS`; this module is the entry point that turns a
name into a model, and works under `torch.device("meta")` so L and H can be checked without memory.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import PRESETS, ModelConfig, resolve
from .tokenbridge import TokenBridge


def create(cfg_or_name: ModelConfig | str, **overrides) -> TokenBridge:
    """Build a model from a preset name or a config (plus field overrides); works under torch.device('meta')."""
    if isinstance(cfg_or_name, str):
        cfg = ModelConfig(size=cfg_or_name, **overrides)
    else:
        cfg = dataclasses.replace(cfg_or_name, **overrides)
    return TokenBridge(cfg)


def count_params(cfg_or_name: ModelConfig | str, **overrides) -> dict[str, int]:
    """Parameter counts per part without allocating memory (built on the meta device).

    -> {"mar": ..., "head": ..., "total": ...}
    """
    with torch.device("meta"):
        model = create(cfg_or_name, **overrides)
    mar = sum(p.numel() for p in model.mar.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    return {"mar": mar, "head": head, "total": mar + head}


__all__ = ["PRESETS", "ModelConfig", "resolve", "create", "count_params"]
