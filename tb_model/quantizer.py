"""Dimension-wise post-training quantizer: each latent scalar becomes one of `levels` bin indices.

TokenBridge discretizes every channel of a continuous latent independently with a fixed table, so
a pretrained continuous VAE yields discrete tokens without retraining. The table is a persistent
buffer `values` [rows, levels] in latent units (rows = 1 for a table shared by all channels,
rows = C for per-channel tables), strictly increasing along `levels`. Quantization is
nearest-value assignment; dequantization is a table lookup.

Schemes:
- "gaussian" (the authors' released table, bit for bit): x_n = clamp((x - qmin) / (qmax - qmin) * 6 - 3,
  -3, 3); bin edges Phi^-1(linspace(0, 1, levels + 1)) clamped to [-3, 3]; each bin's value is the mean
  of the standard normal truncated to the bin, (phi(a) - phi(b)) / (Phi(b) - Phi(a)), computed in
  float32 with the released code's operations, and x is assigned to the nearest value in these
  normalized units (ties to the lower index), so the indices equal the authors' code exactly. The
  table is stored mapped back to latent units v -> (v + 3) / 6 * (qmax - qmin) + qmin.
  `gaussian_table` gives the same table in float64 (the exact integral); docs/quantizer.md measures
  how often the two would assign a different index.
- "uniform": the centers of `levels` equal-width bins over [qmin, qmax].
- "empirical": per channel, `levels` equal-mass bins of a calibration sample (clamped to
  [qmin, qmax]); each bin's value is the mean of the samples in it. Fitted by `calibrate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

SCHEMES = ("gaussian", "uniform", "empirical")
STD_RANGE = 3.0  # the gaussian table spans [-3, 3] standard deviations


@dataclass
class QuantizerConfig:
    """Table shape and scheme of the dimension-wise quantizer (see the module docstring)."""

    levels: int = 64
    qmin: float = -5.0
    qmax: float = 5.0
    scheme: Literal["gaussian", "uniform", "empirical"] = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be an integer in 2..256, got {self.levels!r}")
        if not (math.isfinite(self.qmin) and math.isfinite(self.qmax) and self.qmin < self.qmax):
            raise ValueError(f"need finite qmin < qmax, got qmin={self.qmin!r} qmax={self.qmax!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")


def gaussian_table(levels: int) -> Tensor:
    """Truncated-normal bin means in normalized units [-3, 3], float64 [levels] (the exact integral)."""
    edges = torch.special.ndtri(torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float64, device="cpu"))
    edges = edges.clamp(-3.0, 3.0)
    a, b = edges[:-1], edges[1:]
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)  # noqa: E731
    return (pdf(a) - pdf(b)) / (torch.special.ndtr(b) - torch.special.ndtr(a))


def released_gaussian_table(levels: int) -> Tensor:
    """The authors' table as their code computes it: float32 [levels] in normalized units [-3, 3].

    Edges are Phi^-1 of float32 probabilities rounded to float32 (what scipy returns for them) and
    clamped; every bin's mean is then evaluated in float32, one bin at a time, with the released
    expression's operations in its order. Float32 rounding of Phi(b) - Phi(a) moves the values by
    up to ~1e-6 from `gaussian_table`, which decides the index of inputs close to a bin midpoint.
    """
    probs = torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float32, device="cpu")
    edges = torch.special.ndtri(probs.double()).float().clamp(-STD_RANGE, STD_RANGE)
    sqrt_2, sqrt_2pi = math.sqrt(2.0), math.sqrt(2.0 * math.pi)

    def pdf(t: Tensor) -> Tensor:
        return torch.exp(-0.5 * t ** 2) / sqrt_2pi

    def cdf(t: Tensor) -> Tensor:
        return 0.5 * (1 + torch.erf(t / sqrt_2))

    means = [(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in zip(edges[:-1], edges[1:])]
    return torch.stack(means)


def _normalize(x: Tensor, cfg: QuantizerConfig) -> Tensor:
    """Latent units -> the gaussian table's units, clamped to [-3, 3] (released operation order)."""
    return ((x - cfg.qmin) / (cfg.qmax - cfg.qmin) * (2 * STD_RANGE) - STD_RANGE).clamp(-STD_RANGE, STD_RANGE)


def _fixed_table(cfg: QuantizerConfig) -> Tensor:
    """The gaussian or uniform table in latent units [1, levels] (gaussian: float32, as released)."""
    span = cfg.qmax - cfg.qmin
    if cfg.scheme == "gaussian":
        normalized = released_gaussian_table(cfg.levels)
        return ((normalized + STD_RANGE) / (2 * STD_RANGE) * span + cfg.qmin)[None]
    k = torch.arange(cfg.levels, dtype=torch.float64, device="cpu")
    return (cfg.qmin + (k + 0.5) * span / cfg.levels)[None]


def nearest_index(x: Tensor, table: Tensor) -> Tensor:
    """argmin_k |x - table[k]| (first k on ties) for a sorted 1-D table, without an [..., levels] tensor.

    bucketize on the midpoints finds the nearest value up to the rounding of the midpoints; the
    distances to that value and its two neighbours, in x's dtype, then decide exactly as a full
    argmin would: x [...] -> int64 [...].
    """
    mid = 0.5 * (table[1:] + table[:-1])
    idx = torch.bucketize(x.contiguous(), mid)
    lo, hi = (idx - 1).clamp_min(0), (idx + 1).clamp_max(table.shape[0] - 1)
    d = (x - table[idx]).abs()
    # distances grow away from the nearest value, so it is idx or a neighbour; `<=` keeps the lower on ties
    return torch.where((x - table[lo]).abs() <= d, lo, torch.where((x - table[hi]).abs() < d, hi, idx))


class DimensionwiseQuantizer(nn.Module):
    """Maps latents to uint8 bin indices and back; the same table for every spatial position.

    `channel_dim` only matters for the per-channel (empirical) table: pass 1 for [B, C, h, w]
    latents and -1 for [B, L, C] tokens.
    """

    values: Tensor

    def __init__(
        self,
        levels: int = 64,
        qmin: float = -5.0,
        qmax: float = 5.0,
        scheme: str = "gaussian",
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.config = QuantizerConfig(levels=levels, qmin=qmin, qmax=qmax, scheme=scheme)  # type: ignore[arg-type]
        if scheme == "empirical" and (channels is None or channels < 1):
            raise ValueError("scheme 'empirical' needs channels (per-channel tables) at construction")
        rows = channels if scheme == "empirical" else 1
        self._calibrated = False
        # torch.empty follows the default device, so a model built under torch.device("meta")
        # stays all-meta; reset_parameters fills the table once memory exists.
        self.register_buffer("values", torch.empty(rows, levels, dtype=torch.float32), persistent=True)
        # The gaussian table in its own units decides the indices (see the module docstring). A plain
        # CPU attribute, not a buffer: it is a function of the config, so meta builds, to_empty() and
        # loading cannot lose it. quantize keeps one copy on the input's device (a host-to-device copy
        # per call would make every training step wait for the GPU).
        self._normalized = released_gaussian_table(levels) if scheme == "gaussian" else None
        self._normalized_here: Tensor | None = self._normalized
        self.register_load_state_dict_post_hook(_mark_calibrated)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, channels: int | None = None) -> "DimensionwiseQuantizer":
        return cls(levels=cfg.levels, qmin=cfg.qmin, qmax=cfg.qmax, scheme=cfg.scheme, channels=channels)

    @property
    def levels(self) -> int:
        return self.config.levels

    def reset_parameters(self) -> None:
        """(Re)fill the table: the fixed table, or NaN (= uncalibrated) for the empirical scheme.

        Needed after `to_empty()` on a meta-built model, which leaves buffers uninitialized.
        """
        with torch.no_grad():
            if self.config.scheme == "empirical":
                self.values.fill_(float("nan"))
                self._calibrated = False
            else:
                self.values.copy_(_fixed_table(self.config))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        """Follow device moves but keep the table float32.

        DeepSpeed's bf16 mode calls `module.bfloat16()`; rounding the bin values would change the
        table and break quantize/dequantize idempotence.
        """
        table = self.values
        super()._apply(fn, recurse)
        if self.values.dtype != table.dtype:
            self.values = table.to(self.values.device)
        return self

    @torch.no_grad()
    def calibrate(self, latents: Tensor, channel_dim: int = 1) -> None:
        """Fit the empirical per-channel tables from a sample of latents (any shape, C on channel_dim).

        Samples are clamped to [qmin, qmax], sorted per channel and cut into `levels` bins of equal
        count; a bin's value is the mean of its samples (float64). Needs >= levels samples per
        channel. Values are then forced strictly increasing (ties from repeated samples would make
        two indices decode to the same value and break idempotence).
        """
        if self.config.scheme != "empirical":
            raise ValueError(f"calibrate is only for scheme 'empirical', this quantizer is '{self.config.scheme}'")
        rows, levels = self.values.shape
        if latents.shape[channel_dim] != rows:
            raise ValueError(f"calibrate: latents have {latents.shape[channel_dim]} channels on dim "
                             f"{channel_dim}, the quantizer was built for {rows}")
        x = latents.detach().movedim(channel_dim, 0).reshape(rows, -1).to(torch.float64)
        n = x.shape[1]
        if n < levels:
            raise ValueError(f"calibrate: need at least {levels} samples per channel, got {n}")
        x = x.clamp(self.config.qmin, self.config.qmax).sort(dim=1).values
        csum = torch.cat([x.new_zeros(rows, 1), x.cumsum(dim=1)], dim=1)
        cut = torch.div(torch.arange(levels + 1, device=x.device) * n, levels, rounding_mode="floor")
        table = (csum[:, cut[1:]] - csum[:, cut[:-1]]) / (cut[1:] - cut[:-1]).to(x.dtype)
        gap = 1e-4 * (self.config.qmax - self.config.qmin) / levels
        for k in range(1, levels):
            table[:, k] = torch.maximum(table[:, k], table[:, k - 1] + gap)
        self.values.copy_(table.to(self.values.device, self.values.dtype))
        self._calibrated = True

    def _check_ready(self) -> None:
        if self.config.scheme == "empirical" and not self._calibrated:
            raise RuntimeError("empirical quantizer is not calibrated: call calibrate(latents) "
                               "or load_state_dict from a calibrated one")

    def quantize(self, x: Tensor, channel_dim: int = 1) -> Tensor:
        """Nearest table value index of every element: x [...] (any float dtype) -> uint8 [...].

        Out-of-range inputs go to the end bins (same as clamping x_n to [-3, 3] first).
        """
        self._check_ready()
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self._normalized is not None:
            if self._normalized_here is None or self._normalized_here.device != x.device:
                self._normalized_here = self._normalized.to(x.device)
            table_n = self._normalized_here.to(dtype)
            return nearest_index(_normalize(x.to(dtype), self.config), table_n).to(torch.uint8)
        table = self.values.to(dtype)
        midpoints = 0.5 * (table[:, 1:] + table[:, :-1])  # [rows, levels - 1]
        x = x.to(dtype)
        if table.shape[0] == 1:
            idx = torch.bucketize(x.contiguous(), midpoints[0], out_int32=True)
        else:
            self._check_channels(x, channel_dim)
            moved = x.movedim(channel_dim, 0)
            flat = torch.searchsorted(midpoints, moved.reshape(moved.shape[0], -1).contiguous(), out_int32=True)
            idx = flat.reshape(moved.shape).movedim(0, channel_dim)
        return idx.to(torch.uint8)

    def dequantize(self, idx: Tensor, channel_dim: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
        """Table lookup: integer indices [...] -> values in latent units [...] of `dtype`."""
        self._check_ready()
        rows, levels = self.values.shape
        flat_idx = idx.long()
        if rows > 1:
            self._check_channels(idx, channel_dim)
            shape = [1] * idx.dim()
            shape[channel_dim] = rows
            flat_idx = flat_idx + torch.arange(rows, device=idx.device).view(shape) * levels
        return self.values.reshape(-1)[flat_idx].to(dtype)

    def _check_channels(self, t: Tensor, channel_dim: int) -> None:
        if t.dim() == 0 or t.shape[channel_dim] != self.values.shape[0]:
            got = "a scalar" if t.dim() == 0 else f"{t.shape[channel_dim]} on dim {channel_dim}"
            raise ValueError(f"per-channel quantizer expects {self.values.shape[0]} channels, got {got}")

    def extra_repr(self) -> str:
        c = self.config
        return f"levels={c.levels}, qmin={c.qmin}, qmax={c.qmax}, scheme={c.scheme!r}, rows={self.values.shape[0]}"


def _mark_calibrated(module: DimensionwiseQuantizer, incompatible_keys) -> None:  # noqa: ANN001
    """After load_state_dict an empirical table counts as calibrated iff it holds no NaN."""
    if module.config.scheme == "empirical" and module.values.device.type != "meta":
        module._calibrated = not bool(torch.isnan(module.values).any())
