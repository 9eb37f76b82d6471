"""Inception Score and improved precision/recall computed the way ADM's evaluator computes them
(openai/guided-diffusion `evaluations/evaluator.py`), so our numbers can be compared with ADM-evaluated
papers for any sample count.

Why these exist beside `inception_score` / `precision_recall` in `tb_train.eval.metrics`:
- IS: ours splits N rows into 10 equal parts, ADM cuts consecutive chunks of 5,000 rows whatever N is
  (2,000 samples: one chunk; 12,000: 5,000 + 5,000 + 2,000). Both agree only at N = 50,000.
- precision/recall: ours compares float32 Euclidean distances, ADM squared distances rounded to
  float16 (float32 only where float16 overflows). That rounding moves points across ball boundaries,
  so the counts, and with them the published numbers, differ.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tb_core.errors import InputError


def adm_inception_score(logits: Tensor, split_size: int = 5000) -> tuple[float, float]:
    """ADM's Inception Score of logits [N, K] -> (mean, std) of the per-chunk scores (ADM reports only
    the mean; std is the population std, 0 for a single chunk).

    Chunks are consecutive rows [i, i + split_size) for i = 0, split_size, ...; the last one holds the
    rest and may be smaller. Per chunk: exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))), with p(y) the
    chunk's mean prediction.

    Underflow: ADM takes a float32 softmax and then log(p); for peaked logits p underflows to 0, log(0)
    is -inf and 0 * -inf makes the score NaN. Here log p(y|x) is log_softmax in float64, log p(y) is the
    chunk's logsumexp minus log(chunk size), and an entry whose p(y|x) is 0 contributes 0 (0 log 0 = 0),
    so the score is finite for finite logits. Where ADM's float32 softmax does not underflow, both give
    the same number up to float32 rounding (about 1e-6 relative).
    """
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise InputError(f"adm_inception_score needs logits [N >= 1, K >= 1], got {tuple(logits.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for part in logits.split(split_size):
        logp = part.double().log_softmax(dim=1)
        log_marginal = logp.logsumexp(dim=0) - math.log(part.shape[0])
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - log_marginal), 0.0).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_distances_in(u: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) in `dtype`, evaluated left to right: inputs rounded to `dtype`, each
    squared coordinate rounded, every norm and dot product accumulated in float64 and rounded once, then
    the subtraction, addition and clamp in `dtype`."""
    a, b = u.to(dtype), v.to(dtype)
    norm_a = (a * a).double().sum(dim=1).to(dtype)
    norm_b = (b * b).double().sum(dim=1).to(dtype)
    dot = (a.double() @ b.double().T).to(dtype)
    return (norm_a[:, None] - 2 * dot + norm_b[None, :]).clamp_min(0)


def _sq_distances(u: Tensor, v: Tensor) -> Tensor:
    """ADM's distance block: squared distances [len(u), len(v)] of float32 rows as float32 values,
    computed in float16, or in float32 if any entry of the float16 block is not finite.

    ADM accumulates norms and dot products in whatever its kernel uses (float32 on GPUs); float64 gives
    the correctly rounded value, which a float32 accumulation misses by one float16 ulp in a small
    fraction of the entries (0.02-0.08 % for D = 2048 in numpy and CPU BLAS), depending on its summation
    order. float64 makes the result the same on every device and thread count.
    """
    d = _sq_distances_in(u, v, torch.float16)
    return d.float() if bool(torch.isfinite(d).all()) else _sq_distances_in(u, v, torch.float32)


def _radii(feats: Tensor, k: int, batch: int) -> Tensor:
    """Per row: the k-th smallest squared distance to all rows, itself included (index k in sorted order,
    the row's own distance, 0 in exact arithmetic, being among them), blocks of `batch` x `batch`."""
    radii = []
    for i in range(0, feats.shape[0], batch):
        nearest: Tensor | None = None
        for j in range(0, feats.shape[0], batch):
            d = _sq_distances(feats[i:i + batch], feats[j:j + batch])
            if nearest is not None:
                d = torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def adm_precision_recall(real: Tensor, fake: Tensor, k: int = 3, batch: int = 10_000) -> tuple[float, float]:
    """ADM's improved precision/recall (Kynkäänniemi et al.) of features real [N, D], fake [M, D].

    precision: share of fake rows inside some real row's ball; recall: share of real rows inside some
    fake row's ball. A ball's radius is the k-th smallest squared distance of its centre to its own set
    (itself included, see `_radii`); a point is inside when its squared distance to the centre is <= the
    radius. Distances are ADM's float16 blocks (`_sq_distances`, float32 where float16 overflows) of
    `batch` rows x `batch` columns (ADM's row/col_batch_size = 10,000), with real rows as the first
    operand in the cross distances, as ADM does (|u|^2 - 2 u.v + |v|^2 rounds differently from
    |v|^2 - 2 u.v + |u|^2 in float16). As in ADM the float32 fallback is decided per block, so one
    overflowing block does not change the arithmetic of the others.

    Why squared distances throughout, as ADM does: the k-th smallest value commutes with the monotone
    square root, so radii and comparisons are consistent either way in exact arithmetic; in floating
    point, though, sqrt maps distinct neighbouring squared values to one float32 value, so `d <= r` on
    square roots can hold where it fails on squares, and the counts could drift from ADM's. Comparing
    the rounded squared values themselves reproduces ADM's counts; `<=` (not `<`) puts a point exactly
    on the boundary, e.g. a duplicate of a centre whose radius is 0, inside.
    """
    if (real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]
            or real.shape[0] <= k or fake.shape[0] <= k):
        raise InputError(f"adm_precision_recall with k={k} needs real [N > {k}, D] and fake [M > {k}, D] "
                         f"features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or batch < 1:
        raise ValueError(f"k and batch must be >= 1, got k={k}, batch={batch}")
    real, fake = real.float(), fake.float()  # ADM feeds float32 features, then rounds them to float16
    real_radii, fake_radii = _radii(real, k, batch), _radii(fake, k, batch)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    for i in range(0, real.shape[0], batch):
        for j in range(0, fake.shape[0], batch):
            d = _sq_distances(real[i:i + batch], fake[j:j + batch])
            fake_in[j:j + batch] |= (d <= real_radii[i:i + batch, None]).any(dim=0)
            real_in[i:i + batch] |= (d <= fake_radii[None, j:j + batch]).any(dim=1)
    return float(fake_in.double().mean()), float(real_in.double().mean())
