"""`tb-eval`: FID, IS, precision/recall and sFID of a sample set against a reference, the ADM way.

    tb-eval samples=runs/L/samples reference=VIRTUAL_imagenet256_labeled.npz \\
            inception_weights=weights-inception-2015-12-05-6726825d.pth [protocol=paper] [run_dir=runs/L]
    torchrun --nproc_per_node 8 -m tb_train.evaluate ...      (ranks split the feature extraction)

samples: a `tb-sample` folder (PNGs named `<index>_c<class>.png`, checked for gaps) or an `.npz` whose
`arr_0` is uint8 [N, H, W, 3]. reference: an ADM reference batch (`mu`, `sigma`, optional `mu_s`/
`sigma_s`, and `arr_0` images for precision/recall), or a folder / `.npz` of real images whose
statistics are computed once and cached beside it (`<reference>.tbeval-<key>.npz`, key = sha256 of its
content, the weights file and the extractor).

Metrics (docs/evaluation.md): FID and sFID are Fréchet distances of Gaussian fits to pool3 / ADM's
spatial features; IS uses the unbiased logits in 10 consecutive splits (ADM: no shuffling); precision
and recall compare k=3 nearest-neighbour balls of pool3 features against the reference images.
Writes `metrics.json` (beside the samples unless `out=`), prints one summary line, and logs
`eval/*` scalars to `<run_dir>/tensorboard` when `run_dir` is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from tb_core.config import load_config, to_dict
from tb_core.errors import InputError
from tb_core.fileio import atomic_write_json, atomic_write_with, sha256_file, sha256_files
from tb_train.cli import job_parser, run_main
from tb_train.sample import on_ranks

PAPER_COUNT = 50_000
SAMPLE_NAME = re.compile(r"^(\d+)_c(\d+)\.png$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FeatureExtractor(Protocol):
    """uint8 images [N, 3, H, W] -> {"pool": [N, D], optional "logits": [N, K], "spatial": [N, S]}."""

    name: str

    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...


# -- metrics -------------------------------------------------------------------------------------------
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


# -- image sources -------------------------------------------------------------------------------------
def npz_array(path: Path, key: str) -> np.ndarray:
    """One array of an .npz, memory-mapped when stored uncompressed (np.savez, ADM's files, tb-sample's),
    so a 10 GB `arr_0` is read slice by slice; compressed members are loaded whole."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    header = f.tell()
                with open(path, "rb") as raw:  # data offset = local header + its name/extra fields + npy header
                    raw.seek(info.header_offset + 26)
                    name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
                start = info.header_offset + 30 + int(name_len) + int(extra_len) + header
                return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape,
                                 order="F" if fortran else "C")
        return np.load(path)[key]
    except KeyError:
        raise InputError(f"{path}: no array '{key}'") from None
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from None


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from None


@dataclass
class ImageSet:
    """N uint8 images [H, W, 3] read by index range (so ranks read only their slice)."""

    path: Path
    count: int
    size: tuple[int, int]
    read: Callable[[int, int], np.ndarray]  # (start, stop) -> uint8 [n, H, W, 3]
    files: list[Path] = field(default_factory=list)

    def content_hash(self) -> str:
        if self.files:
            names = "\n".join(str(f.relative_to(self.path)) for f in self.files).encode()
            return hashlib.sha256(names + sha256_files(self.files).encode()).hexdigest()
        return sha256_file(self.path)


def _check_images(arr: np.ndarray, path: Path) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"{path}: arr_0 must be uint8 [N, H, W, 3] images, got {arr.dtype} {list(arr.shape)}")


def npz_images(path: Path) -> ImageSet:
    arr = npz_array(path, "arr_0")
    _check_images(arr, path)
    return ImageSet(path, arr.shape[0], (arr.shape[1], arr.shape[2]), lambda a, b: np.asarray(arr[a:b]))


def _sample_files(folder: Path) -> list[Path] | None:
    """tb-sample's PNGs in index order, checked for gaps; None if the folder is not a tb-sample folder."""
    found = {}
    for f in folder.iterdir():
        m = SAMPLE_NAME.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        return None
    expected = None
    meta = folder / "samples.json"
    if meta.is_file():
        expected = json.loads(meta.read_text()).get("num_samples")
    n = expected or max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise InputError(f"{folder}: sample folder has gaps: {len(missing)} of {n} samples missing "
                         f"(first: index {missing[0]}); rerun tb-sample to complete it")
    return [found[i] for i in range(n)]


def folder_images(folder: Path) -> ImageSet:
    from PIL import Image

    files = _sample_files(folder)
    if files is None:
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise InputError(f"{folder}: no images (.png/.jpg) in this folder")

    def read(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as im:
                return np.array(im.convert("RGB"))
        except OSError as e:
            raise InputError(f"{f}: unreadable image ({e})") from None

    size = read(files[0]).shape[:2]

    def load(f: Path) -> np.ndarray:
        arr = read(f)
        if arr.shape[:2] != size:
            raise InputError(f"{f}: image is {arr.shape[1]}x{arr.shape[0]}, the set's first image is "
                             f"{size[1]}x{size[0]} (all images must have one size)")
        return arr

    return ImageSet(folder, len(files), size, lambda a, b: np.stack([load(f) for f in files[a:b]]), files)


def open_images(path: str | os.PathLike) -> ImageSet:
    p = Path(path).expanduser()
    if p.is_dir():
        return folder_images(p)
    if p.is_file() and p.suffix == ".npz":
        return npz_images(p)
    raise InputError(f"{p}: not found or not an image folder / .npz")


# -- distributed feature extraction --------------------------------------------------------------------
def _gather_rows(t: Tensor, counts: list[int]) -> Tensor | None:
    """Rows of every rank's `t` ([counts[r], D] on rank r) concatenated in rank order on rank 0."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return t
    pad = torch.zeros(max(counts), *t.shape[1:], dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    rank = tdist.get_rank()
    bucket = [torch.empty_like(pad) for _ in counts] if rank == 0 else None
    tdist.gather(pad, bucket, dst=0)
    return torch.cat([b[:c] for b, c in zip(bucket, counts)]).cpu() if rank == 0 else None


def images_reader(images: ImageSet) -> Callable[[int, int], Tensor]:
    """(start, stop) -> uint8 [n, 3, H, W] tensor of an ImageSet."""
    return lambda a, b: torch.from_numpy(np.array(images.read(a, b))).permute(0, 3, 1, 2)


def extract_features(read: Callable[[int, int], Tensor], count: int, extractor: FeatureExtractor, rank: int = 0,
                     world: int = 1, batch_size: int = 64, desc: str = "features") -> dict[str, Tensor] | None:
    """Features of images 0..count-1 (`read(a, b)` -> uint8 [b - a, 3, H, W]), each rank computing the
    contiguous slice [r N / W, (r+1) N / W), so rows come out in image order for any world size.

    Collective when world > 1: returns the full dict on rank 0, None elsewhere.
    """
    from tqdm import tqdm

    bounds = [count * r // world for r in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    parts: dict[str, list[Tensor]] = {}
    bar = tqdm(total=count, desc=desc, unit="img", disable=rank != 0, dynamic_ncols=True)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        for k, v in extractor(read(a, b)).items():
            parts.setdefault(k, []).append(v.float())
        bar.update((b - a) * world)
    bar.close()
    if not parts:  # an empty slice (more ranks than images): one probe image gives the keys and widths
        parts = {k: [v.float()[:0]] for k, v in extractor(read(0, 1)).items()}
    counts = [bounds[r + 1] - bounds[r] for r in range(world)]
    out = {k: _gather_rows(torch.cat(v), counts) for k, v in sorted(parts.items())}
    return out if rank == 0 else None


# -- the job -------------------------------------------------------------------------------------------
@dataclass
class EvaluateJobConfig:
    """Options of `tb-eval` (dotted `key=value` on the command line, or a YAML file via --config)."""

    samples: str                      # tb-sample folder or .npz (arr_0 uint8 [N, H, W, 3])
    reference: str                    # ADM reference .npz (mu, sigma[, mu_s, sigma_s][, arr_0]) or real images
    inception_weights: str            # local torch-fidelity inception-v3-compat weights (.pth)
    out: str | None = None            # metrics.json path (default: <samples>/metrics.json or <npz stem>.metrics.json)
    batch_size: int = 64              # images per Inception call per rank
    splits: int = 10                  # Inception Score splits
    k: int = 3                        # precision/recall neighbourhood
    protocol: Literal["none", "paper"] = "none"  # paper: 50,000 samples expected (loud warning otherwise)
    run_dir: str | None = None        # log eval/* scalars to <run_dir>/tensorboard
    step: int | None = None           # x of those scalars (default: model_step from samples.json, else 0)


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


def compute_metrics(feats: dict[str, Tensor], ref: Reference, splits: int = 10, k: int = 3) -> dict[str, float]:
    """All metrics the features and the reference allow (rank-0 work, no collectives)."""
    pool = feats["pool"]
    if ref.mu.shape[0] != pool.shape[1]:
        raise InputError(f"{ref.source}: reference statistics have {ref.mu.shape[0]} dims, the extractor gives "
                         f"{pool.shape[1]} (different feature extractor?)")
    out = {"fid": frechet_distance(*feature_stats(pool), ref.mu, ref.sigma)}
    if "logits" in feats:
        out["is_mean"], out["is_std"] = inception_score(feats["logits"], splits)
    if ref.pool is not None:
        out["precision"], out["recall"] = precision_recall(ref.pool, pool, k)
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


def log_scalars(run_dir: str | os.PathLike, metrics: dict[str, float], step: int, prefix: str = "eval") -> None:
    """eval/<metric> scalars into the run's TensorBoard folder (the one tb-train writes)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    try:
        for name, value in metrics.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)
    finally:
        writer.close()


def _metrics_path(cfg: EvaluateJobConfig, samples: ImageSet) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if samples.path.is_dir():
        return samples.path / "metrics.json"
    return samples.path.with_name(f"{samples.path.stem}.metrics.json")


def _sample_meta(samples: ImageSet) -> dict:
    folder = samples.path if samples.path.is_dir() else samples.path.parent
    meta = folder / "samples.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def evaluate(cfg: EvaluateJobConfig, rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
             extractor: FeatureExtractor | None = None, weights_sha: str | None = None) -> dict | None:
    """The whole tb-eval job on an initialised process group (or one process); returns the metrics
    record on rank 0 (None elsewhere) after writing metrics.json."""
    from tb_train.inception import InceptionExtractor

    t0 = time.perf_counter()
    samples = open_images(cfg.samples)
    warnings = []
    if cfg.protocol == "paper" and samples.count != PAPER_COUNT:
        warnings.append(f"protocol 'paper' expects {PAPER_COUNT} samples, got {samples.count}: "
                        f"these numbers are NOT comparable to published ones")
    if extractor is None:
        extractor = InceptionExtractor(cfg.inception_weights, device)
        weights_sha = sha256_file(cfg.inception_weights)
    ref_images, given = open_reference(cfg.reference)
    if ref_images is not None and ref_images.size != samples.size:
        raise InputError(f"{cfg.samples}: samples are {samples.size[1]}x{samples.size[0]}, reference images "
                         f"{ref_images.size[1]}x{ref_images.size[0]}")
    ref = load_reference(cfg.reference, ref_images, given, extractor, weights_sha or extractor.name, rank, world,
                         cfg.batch_size)
    t1 = time.perf_counter()
    feats = extract_features(images_reader(samples), samples.count, extractor, rank, world, cfg.batch_size,
                             desc="sample features")
    t_extract = time.perf_counter() - t1
    if rank != 0:
        return None
    metrics = compute_metrics(feats, ref, cfg.splits, cfg.k)
    meta = _sample_meta(samples)
    record = {**metrics, "num_samples": samples.count, "image_size": list(samples.size),
              "samples": str(samples.path), "reference": ref.source, "reference_images": ref.count,
              "extractor": extractor.name, "inception_weights": cfg.inception_weights,
              "inception_weights_sha256": weights_sha, "protocol": cfg.protocol, "warnings": warnings,
              "is_splits": cfg.splits, "pr_k": cfg.k, "world_size": world,
              "sample_images_per_s": samples.count / max(t_extract, 1e-9),
              "elapsed_s": time.perf_counter() - t0, "config": to_dict(cfg)}
    if meta:
        record["sample_settings"] = meta
    atomic_write_json(_metrics_path(cfg, samples), record)
    if cfg.run_dir:
        step = cfg.step if cfg.step is not None else int(meta.get("model_step") or 0)
        log_scalars(cfg.run_dir, metrics, step)
    return record


def main(argv: list[str] | None = None) -> int:
    args = job_parser("tb-eval", "FID / IS / precision-recall / sFID of samples against a reference "
                      "(docs/evaluation.md).", config_required=False).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("tb-eval", lambda: _main(load_config(EvaluateJobConfig, args.config, args.overrides)))


def _main(cfg: EvaluateJobConfig) -> int:
    for key in ("samples", "reference", "inception_weights"):  # before any process group or model
        if not Path(getattr(cfg, key)).expanduser().exists():
            raise InputError(f"{key}={getattr(cfg, key)}: not found")
    record = on_ranks(evaluate, cfg)
    if record is not None:
        for w in record["warnings"]:
            print(f"tb-eval: WARNING: {w}", file=sys.stderr, flush=True)
        print(summary_line(record, record["num_samples"], record["reference"])
              + (" | WARNING: " + "; ".join(record["warnings"]) if record["warnings"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
