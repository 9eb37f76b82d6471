"""AdamW for TokenBridge: its config, the two parameter groups, and the learning rate by optimizer step.

DeepSpeed builds the optimizer itself (from the `optimizer` section that `tb_train.engine.engine` writes from
`OptimConfig`); this module decides which parameters decay and what the learning rate is at each step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from tb_model.partitioned import shape_of


@dataclass
class OptimConfig:
    """AdamW and its schedule. Defaults are the paper's table (lr 8e-4 for global batch 2048, warmup 200
    of 800 epochs, weight decay 0.02, clip 1.0; docs/training.md)."""
    lr: float = 8e-4                            # peak learning rate (absolute, for the global batch)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.02
    no_decay_embeddings: bool = False           # True: also exempt embedding tables / position embeddings
                                                # (False = the released code: only biases and 1-D tensors)
    warmup_epochs: float = 200.0                # linear warmup from 0
    epochs: float = 800.0                       # schedule length: cosine reaches min_lr here
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0                      # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs <= 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ValueError("lr and epochs must be > 0, warmup_epochs and grad_clip >= 0")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then cosine/constant."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(total - warmup, 1e-12))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups: decayed weights and the exempt ones (biases, 1-D params, embeddings)."""
    exempt_ids: set[int] = set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            embedding = isinstance(mod, nn.Embedding) or "embed" in pname
            if len(shape_of(p)) <= 1 or pname == "bias" or (cfg.no_decay_embeddings and embedding):
                exempt_ids.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in exempt_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


__all__ = ["OptimConfig", "lr_at", "param_groups"]
