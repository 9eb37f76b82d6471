"""The metric math of `tb-eval` and evaluation during training: FID, IS, precision/recall, sFID.

FID and sFID are Fréchet distances of Gaussian fits (ADM's formula, float64 eigenvalues); IS here uses
`splits` equal consecutive splits (for N = 50,000 and 10 splits: ADM's chunks of 5,000); precision and
recall compare k-NN balls of pool features (Kynkäänniemi et al.) in float32. `adm.py` holds the variants
whose arithmetic follows ADM's evaluator for any N; `compute_metrics` picks by protocol (default "adm").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tb_core.errors import InputError
from tb_train.eval.adm import adm_inception_score, adm_precision_recall


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: Tensor | None        # pool3 features of the reference images (precision/recall)
    count: int | None          # images the features came from
    size: tuple[int, int] | None
    source: str


def feature_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of features [N, D] -> (mu [D], sigma [D, D]) in float64 (sigma: unbiased, N - 1)."""
    x = np.asarray(feats.double().cpu() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"need features [N >= 2, D] for statistics, got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2), in float64.

    tr((s1 s2)^1/2) is computed as tr((r s2 r)^1/2) with r = s1^1/2: the same eigenvalues, but of a
    symmetric PSD matrix, so no complex parts appear for the rank-deficient covariances of small sets
    (scipy's sqrtm, used by ADM, gives the same value on well-conditioned inputs).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise InputError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    return max(fid, 0.0)  # equal sets give about -1e-13 from rounding


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS of logits [N, K]: exp(E KL(p(y|x) || p(y))) per split of consecutive rows -> (mean, std).

    Splits are N*i//splits boundaries without shuffling (for 50,000 samples: ADM's 10 x 5,000).
    """
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise InputError(f"inception_score needs logits [N >= {splits}, K], got {tuple(logits.shape)}")
    logp = logits.double().log_softmax(dim=1)
    n = logp.shape[0]
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_marginal = part.exp().mean(dim=0).log()
        scores.append(float((part.exp() * (part - log_marginal)).sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radius(feats: Tensor, k: int, batch: int) -> Tensor:
    """Distance of each row to its k-th nearest other row (the row itself is the 0-th)."""
    return torch.cat([torch.cdist(part, feats).kthvalue(k + 1, dim=1).values for part in feats.split(batch)])


def _covered(points: Tensor, centres: Tensor, radii: Tensor, batch: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(part, centres) <= radii[None]).any(dim=1) for part in points.split(batch)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, batch: int = 10_000) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.; ADM's evaluator) of features [N, D].

    precision: share of fake points inside some real point's k-NN ball (radius = distance to its k-th
    nearest real neighbour); recall: the same with the roles swapped.
    """
    real, fake = real.float(), fake.float()
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} real and fake samples, "
                         f"got {real.shape[0]} and {fake.shape[0]}")
    precision = _covered(fake, real, _kth_radius(real, k, batch), batch)
    recall = _covered(real, fake, _kth_radius(fake, k, batch), batch)
    return precision, recall


def sfid(spatial: Tensor, mu_s: np.ndarray, sigma_s: np.ndarray) -> float:
    """sFID: Fréchet distance of the spatial features [N, S] to the reference's `mu_s`/`sigma_s`."""
    return frechet_distance(*feature_stats(spatial), mu_s, sigma_s)


PROTOCOLS = ("adm", "paper", "equal_splits")


def compute_metrics(feats: dict[str, Tensor], ref: Reference, splits: int = 10, k: int = 3,
                    protocol: str = "adm") -> dict[str, float]:
    """All metrics the features and the reference allow (rank-0 work, no collectives).

    protocol "adm" (and "paper", which is "adm" at N = 50,000): IS in ADM's consecutive chunks of 5,000
    and precision/recall on float16 squared distances (adm.py), as ADM's evaluator computes them;
    "equal_splits": IS over `splits` equal splits and float32 distances (equal to "adm" at N = 50,000 for
    IS; P/R counts may differ by a few points). FID and sFID are the same under every protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    adm = protocol != "equal_splits"
    pool = feats["pool"]
    if ref.mu.shape[0] != pool.shape[1]:
        raise InputError(f"{ref.source}: reference statistics have {ref.mu.shape[0]} dims, the extractor gives "
                         f"{pool.shape[1]} (different feature extractor?)")
    out = {"fid": frechet_distance(*feature_stats(pool), ref.mu, ref.sigma)}
    if "logits" in feats:
        out["is_mean"], out["is_std"] = (adm_inception_score(feats["logits"]) if adm
                                         else inception_score(feats["logits"], splits))
    if ref.pool is not None:
        out["precision"], out["recall"] = (adm_precision_recall if adm else precision_recall)(ref.pool, pool, k)
    if ref.mu_s is not None and "spatial" in feats:
        if ref.mu_s.shape[0] != feats["spatial"].shape[1]:
            raise InputError(f"{ref.source}: mu_s has {ref.mu_s.shape[0]} dims, spatial features have "
                             f"{feats['spatial'].shape[1]}")
        out["sfid"] = sfid(feats["spatial"], ref.mu_s, ref.sigma_s)
    return out


def summary_line(metrics: dict, count: int, reference: str) -> str:
    parts = [f"FID {metrics['fid']:.4f}"]
    if "is_mean" in metrics:
        parts.append(f"IS {metrics['is_mean']:.3f} ± {metrics['is_std']:.3f}")
    if "precision" in metrics:
        parts.append(f"precision {metrics['precision']:.4f} recall {metrics['recall']:.4f}")
    if "sfid" in metrics:
        parts.append(f"sFID {metrics['sfid']:.4f}")
    return " | ".join(parts) + f" | {count} samples vs {Path(reference).name}"
