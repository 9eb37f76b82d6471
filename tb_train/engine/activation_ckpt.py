"""Activation checkpointing applied from outside the model, and the parameter names it leaves behind.

`apply_activation_checkpointing` wraps blocks of `model.checkpoint_block_lists()` in `CheckpointedBlock`,
which recomputes the block in backward instead of storing its activations. The wrapper adds one level
(`ckpt_inner`) to the module path of every parameter inside it; state-dict keys stay those of the bare
model (hooks strip/add the level), and `canonical_name` maps a wrapped parameter name back to the bare
one. Checkpoints, the EMA and the export name parameters canonically, so the policy may change across a
resume.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

CKPT_INNER = "ckpt_inner"  # attribute name of the wrapped block; removed from every exported name


def canonical_name(name: str) -> str:
    """Parameter/state name with the checkpoint wrappers removed (what the bare model calls it)."""
    return name.replace(f".{CKPT_INNER}.", ".").replace(f"{CKPT_INNER}.", "")


class CheckpointedBlock(nn.Module):
    """Recomputes `inner` in backward instead of storing its activations.

    The wrapped block is called through its own `__call__` inside `checkpoint(..., use_reentrant=False)`,
    so module hooks (ZeRO-3's parameter fetch) run again during recompute; the RNG state is replayed so
    dropout masks match. State-dict keys are those of the unwrapped model (hooks strip/add the prefix).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        setattr(self, CKPT_INNER, inner)
        self.register_state_dict_post_hook(_strip_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(self, CKPT_INNER)
        if not (torch.is_grad_enabled() and self.training):
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _strip_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = f"{prefix}{CKPT_INNER}."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    inner = f"{prefix}{CKPT_INNER}."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def apply_activation_checkpointing(model: nn.Module, policy: str, k: int = 2) -> int:
    """Wrap blocks of every list in `model.checkpoint_block_lists()`; returns how many were wrapped.

    policy: "none" (nothing), "full" (every block), "every_k" (blocks 0, k, 2k, ... of each list).
    """
    if policy == "none":
        return 0
    wrapped = 0
    for blocks in model.checkpoint_block_lists():
        for i in range(len(blocks)):
            if (policy == "full" or i % k == 0) and not isinstance(blocks[i], CheckpointedBlock):
                blocks[i] = CheckpointedBlock(blocks[i])
                wrapped += 1
    return wrapped


__all__ = ["CKPT_INNER", "canonical_name", "CheckpointedBlock", "apply_activation_checkpointing"]
