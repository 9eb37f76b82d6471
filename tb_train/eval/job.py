"""`tb-eval`: FID, IS, precision/recall and sFID of a sample set against a reference, the ADM way.

    tb-eval samples=runs/L/samples reference=VIRTUAL_imagenet256_labeled.npz \\
            inception_weights=weights-inception-2015-12-05-6726825d.pth [protocol=paper] [run_dir=runs/L]
    torchrun --nproc_per_node 8 -m tb_train.eval ...      (ranks split the feature extraction)

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

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tb_core.config import to_dict
from tb_core.errors import InputError
from tb_core.fileio import atomic_write_json
from tb_train.cli import job_main
from tb_train.dist import on_ranks
from tb_train.eval.features import FeatureExtractor, build_extractor, extract_features
from tb_train.eval.metrics import compute_metrics, summary_line
from tb_train.eval.readers import ImageSet, images_reader, open_images
from tb_train.eval.reference import load_reference, open_reference

PROG = "tb-eval"
PAPER_COUNT = 50_000


@dataclass
class EvaluateJobConfig:
    """Options of `tb-eval` (dotted `key=value` on the command line, or a YAML file via --config)."""

    samples: str                      # tb-sample folder or .npz (arr_0 uint8 [N, H, W, 3])
    reference: str                    # ADM reference .npz (mu, sigma[, mu_s, sigma_s][, arr_0]) or real images
    inception_weights: str            # local torch-fidelity inception-v3-compat weights (.pth)
    out: str | None = None            # metrics.json path (default: <samples>/metrics.json or <npz stem>.metrics.json)
    batch_size: int = 64              # images per Inception call per rank
    splits: int = 10                  # IS splits under protocol equal_splits (adm: chunks of 5,000)
    k: int = 3                        # precision/recall neighbourhood
    protocol: Literal["adm", "paper", "equal_splits"] = "adm"  # adm: ADM evaluator's IS/PR arithmetic at any N;
                                      # paper: adm + 50,000 samples expected (loud warning otherwise);
                                      # equal_splits: IS in `splits` equal splits, float32 P/R distances
    run_dir: str | None = None        # log eval/* scalars to <run_dir>/tensorboard
    step: int | None = None           # x of those scalars (default: model_step from samples.json, else 0)


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
    t0 = time.perf_counter()
    samples = open_images(cfg.samples)
    warnings = []
    if cfg.protocol == "paper" and samples.count != PAPER_COUNT:
        warnings.append(f"protocol 'paper' expects {PAPER_COUNT} samples, got {samples.count}: "
                        f"these numbers are NOT comparable to published ones")
    if extractor is None:
        extractor, weights_sha = build_extractor("inception", cfg.inception_weights, torch.device(device))
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
    metrics = compute_metrics(feats, ref, cfg.splits, cfg.k, cfg.protocol)
    meta = _sample_meta(samples)
    record = {**metrics, "num_samples": samples.count, "image_size": list(samples.size),
              "samples": str(samples.path), "reference": ref.source, "reference_images": ref.count,
              "extractor": extractor.name, "inception_weights": cfg.inception_weights,
              "inception_weights_sha256": weights_sha, "protocol": cfg.protocol, "warnings": warnings,
              "is_splits": cfg.splits if cfg.protocol == "equal_splits" else "chunks of 5000 (ADM)", "pr_k": cfg.k, "world_size": world,
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
    return job_main(PROG, argv, lambda cfg, source, args: _main(cfg))


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
