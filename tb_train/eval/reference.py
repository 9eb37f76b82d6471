"""Reference statistics for `tb-eval`: given by an ADM reference batch (mu/sigma[, mu_s/sigma_s]) or
computed once from real images (a folder or an .npz) and cached beside them, keyed by the sha256 of their
content, the extractor's weights and its name.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tb_core.errors import InputError
from tb_core.fileio import atomic_write_with
from tb_train.eval.features import FeatureExtractor, extract_features
from tb_train.eval.metrics import Reference, feature_stats
from tb_train.eval.readers import ImageSet, images_reader, npz_array, npz_images, npz_keys, open_images


def _stats_of(feats: dict[str, Tensor]) -> dict[str, np.ndarray]:
    mu, sigma = feature_stats(feats["pool"])
    out = {"mu": mu, "sigma": sigma, "pool": feats["pool"].numpy()}
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_stats(feats["spatial"])
    return out


def cache_path(images: ImageSet, extractor_name: str, weights_sha: str) -> Path:
    key = hashlib.sha256(f"{images.content_hash()}/{weights_sha}/{extractor_name}".encode()).hexdigest()[:16]
    return images.path.with_name(f"{images.path.name}.tbeval-{key}.npz")


def reference_features(images: ImageSet, extractor: FeatureExtractor, weights_sha: str, rank: int, world: int,
                       batch_size: int) -> dict[str, np.ndarray] | None:
    """Statistics + pool features of real images, read from / written to the cache beside them.
    Collective; the result on rank 0, None elsewhere."""
    cache = cache_path(images, extractor.name, weights_sha) if rank == 0 else None
    hit = [bool(cache and cache.is_file())]
    if world > 1:
        import torch.distributed as tdist

        tdist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if rank != 0:
            return None
        with np.load(cache) as z:
            print(f"tb-eval: reference statistics from cache {cache}", flush=True)
            return {k: z[k] for k in z.files}
    feats = extract_features(images_reader(images), images.count, extractor, rank, world, batch_size,
                             desc="reference features")
    if rank != 0:
        return None
    stats = _stats_of(feats)
    try:
        atomic_write_with(cache, lambda f: np.savez(f, **stats))
    except OSError as e:
        print(f"tb-eval: warning: could not cache reference statistics beside {images.path} ({e})", flush=True)
    return stats


def open_reference(path: str) -> tuple[ImageSet | None, dict[str, np.ndarray]]:
    """Validate a reference (every rank, no collectives) -> (its images or None, its given statistics)."""
    p = Path(path).expanduser()
    if not (p.is_file() and p.suffix == ".npz"):
        return open_images(p), {}
    keys = npz_keys(p)
    given: dict[str, np.ndarray] = {}
    if "mu" in keys or "sigma" in keys:
        if not ("mu" in keys and "sigma" in keys):
            raise InputError(f"{p}: reference has {'mu' if 'mu' in keys else 'sigma'} but not "
                             f"{'sigma' if 'mu' in keys else 'mu'}")
        given = {k: np.asarray(npz_array(p, k), np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
        if given["mu"].ndim != 1 or given["sigma"].shape != given["mu"].shape * 2:
            raise InputError(f"{p}: mu {given['mu'].shape} / sigma {given['sigma'].shape} are not [D] / [D, D]")
        if ("mu_s" in given) != ("sigma_s" in given):
            raise InputError(f"{p}: reference has only one of mu_s / sigma_s")
    elif "arr_0" not in keys:
        raise InputError(f"{p}: reference has neither mu/sigma statistics nor arr_0 images (keys: {keys})")
    return (npz_images(p) if "arr_0" in keys else None), given


def load_reference(path: str, images: ImageSet | None, given: dict[str, np.ndarray], extractor: FeatureExtractor,
                   weights_sha: str, rank: int, world: int, batch_size: int) -> Reference | None:
    """Statistics (given ones win: an ADM file's mu/sigma describe the whole training set, its arr_0 only
    10k images) + pool features of the images for precision/recall. Collective; the result on rank 0."""
    computed = reference_features(images, extractor, weights_sha, rank, world, batch_size) if images else None
    if rank != 0:
        return None
    stats = {**(computed or {}), **given}
    return Reference(stats["mu"], stats["sigma"], stats.get("mu_s"), stats.get("sigma_s"),
                     torch.from_numpy(stats["pool"]) if computed else None,
                     images.count if images else None, images.size if images else None, path)
