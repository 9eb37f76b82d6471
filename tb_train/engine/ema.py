"""Exponential moving average of the weights, kept per rank next to its ZeRO partition.

Each rank averages only the fp32 master values it owns, so an update costs no communication and the EMA
needs 1/world of the model's fp32 memory per rank (ZeRO 1/2/3; stage 0 fp32: rank 0 holds all of it).
- ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param(p)` is a live view of this rank's padded slice of
  the flattened parameter, elements [rank * s, (rank + 1) * s).
- ZeRO-1/2 and bf16 stage 0: `p._hp_mapping` is this rank's fragment of the flattened parameter (None if
  it holds none of it); `get_hp_fragment()` is the live fp32 view, `lp_fragment_address.start` its offset.
- fp32 stage 0: the parameter itself, replicated on every rank; only rank 0 keeps its EMA.
The state is a set of pieces {name: (offset, numel, shape, data)} named by the bare model's parameter
names; pieces from any world size can be merged (`consolidate`) or re-sliced (`load_state_dicts`), which
is how a resume at another world size and the export work. A full tensor is gathered only on demand
(zero-filled buffer, own slice written, all_reduce).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as tdist
import torch.nn as nn

from tb_model.partitioned import shape_of
from tb_train.dist import DistInfo
from tb_train.engine.activation_ckpt import canonical_name


@dataclass
class _Slot:
    name: str                       # canonical parameter name
    shape: tuple[int, ...]
    numel: int                      # elements of the full parameter
    offset: int                     # where this rank's slice starts in the flattened parameter
    view: Callable[[], torch.Tensor] | None  # live fp32 view of the slice (None: this rank holds none)
    owner: bool                     # False for replicated copies on ranks > 0 (they keep no EMA)
    ema: torch.Tensor | None = None  # [valid] fp32

    @property
    def valid(self) -> int:
        """Elements of the slice inside the parameter (ZeRO-3 pads the last rank's slice)."""
        return 0 if self.ema is None else self.ema.numel()


def _slot_for(name: str, p: nn.Parameter, dist: DistInfo) -> _Slot:
    shape = tuple(shape_of(p))
    numel = int(torch.Size(shape).numel())
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param
        size = p.ds_tensor.ds_numel
        offset = dist.rank * size
        view = (lambda p=p: safe_get_local_fp32_param(p)) if offset < numel else None
        return _Slot(name, shape, numel, offset, view, True)
    if hasattr(p, "_hp_mapping"):
        hm = p._hp_mapping
        if hm is None:
            return _Slot(name, shape, numel, 0, None, True)
        return _Slot(name, shape, numel, hm.lp_fragment_address.start, hm.get_hp_fragment, True)
    return _Slot(name, shape, numel, 0, lambda p=p: p.detach().reshape(-1), dist.rank == 0)


class ShardedEMA:
    """EMA of the trainable parameters of a DeepSpeed-wrapped module, one slice per rank."""

    def __init__(self, module: nn.Module, decay: float, dist: DistInfo):
        self.decay = decay
        self.dist = dist
        self.slots = [_slot_for(canonical_name(n), p, dist) for n, p in module.named_parameters()
                      if p.requires_grad]
        for s in self.slots:
            if s.view is not None and s.owner:  # replicated copies on ranks > 0 keep no EMA
                s.ema = s.view()[: s.numel - s.offset].detach().float().clone()

    @torch.no_grad()
    def update(self) -> None:
        """ema ← decay · ema + (1 − decay) · param, on this rank's slices (call after a real step)."""
        for s in self.slots:
            if s.ema is not None:
                s.ema.lerp_(s.view()[: s.valid].float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        """This rank's pieces (CPU tensors); merged with other ranks' pieces by `consolidate`."""
        pieces = {s.name: {"offset": s.offset, "numel": s.numel, "shape": list(s.shape),
                           "data": s.ema.detach().cpu().clone()}
                  for s in self.slots if s.ema is not None}
        return {"decay": self.decay, "pieces": pieces}

    def load_state_dict(self, sd: dict) -> None:
        """Fill this rank's slices from the pieces this rank saved (same world size and ZeRO layout)."""
        self.load_state_dicts([sd])

    @torch.no_grad()
    def load_state_dicts(self, states: Iterable[dict]) -> None:
        """Fill this rank's slices from the pieces saved by every rank of a run of any world size
        (checkpoint loading calls this instead of `load_state_dict` when the partitioning changed)."""
        by_name: dict[str, list[dict]] = {}
        for sd in states:
            for name, piece in sd["pieces"].items():
                by_name.setdefault(name, []).append(piece)
        for s in self.slots:
            if s.ema is None:
                continue
            filled = 0
            for piece in by_name.get(s.name, []):
                if list(piece["shape"]) != list(s.shape):
                    raise ValueError(f"EMA state for '{s.name}' has shape {piece['shape']}, model has "
                                     f"{list(s.shape)}")
                lo = max(s.offset, piece["offset"])
                hi = min(s.offset + s.valid, piece["offset"] + piece["data"].numel())
                if hi > lo:
                    src = piece["data"][lo - piece["offset"]: hi - piece["offset"]]
                    s.ema[lo - s.offset: hi - s.offset].copy_(src.to(s.ema.device))
                    filled += hi - lo
            if filled < s.valid:
                raise ValueError(f"EMA state does not cover parameter '{s.name}' ({filled}/{s.valid} elements)")

    @torch.no_grad()
    def gather(self, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """Full EMA tensors {name: [shape]} on rank `dst` (None: on every rank). A collective: all ranks
        must call it. Returns None on ranks other than `dst`."""
        out: dict[str, torch.Tensor] = {}
        multi = tdist.is_initialized() and tdist.get_world_size() > 1
        for s in self.slots:
            full = torch.zeros(s.numel, dtype=torch.float32, device=self.dist.device)
            if s.ema is not None:
                full[s.offset: s.offset + s.valid] = s.ema
            if multi:
                if dst is None:
                    tdist.all_reduce(full)
                else:
                    tdist.reduce(full, dst=dst)
            out[s.name] = full.view(s.shape)
        return out if dst is None or self.dist.rank == dst else None


def consolidate(states: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Full EMA tensors {name: [shape]} from the pieces saved by all ranks (offline, e.g. for export).
    Raises when a parameter is not fully covered."""
    flat: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    covered: dict[str, int] = {}
    for sd in states:
        for name, piece in sd["pieces"].items():
            t = flat.setdefault(name, torch.zeros(piece["numel"], dtype=torch.float32))
            shapes[name] = list(piece["shape"])
            data = piece["data"].float()
            t[piece["offset"]: piece["offset"] + data.numel()] = data
            covered[name] = covered.get(name, 0) + data.numel()
    for name, t in flat.items():
        if covered[name] < t.numel():
            raise ValueError(f"EMA pieces cover {covered[name]}/{t.numel()} elements of '{name}'")
    return {name: t.view(shapes[name]) for name, t in flat.items()}
