"""`tb-sample`: the distributed 50k-sample job on top of the `Sampler` component (sampler.py).

    tb-sample model=L.safetensors out=runs/L/samples vae.path=kl16.ckpt num_samples=50000 \\
              sampling.num_iter=256 sampling.guidance=3.1 sampling.temperature=0.97
    torchrun --nproc_per_node 8 -m tb_train.sample ...       (ranks split the sample indices)

The set of images is identical for any world size and batch size (sampler.py: sample i depends on
(seed, i) only), and a rerun after a crash only generates the indices whose PNG is missing. Output folder:
  <index>_c<class>.png     one per sample (index zero-padded to 6+ digits)
  samples.json             every setting, the seed and class rules, the float->uint8 rule
  samples.npz              ADM format: arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N] (written at the end,
                           streamed from the PNGs: never all images in memory)
  grid.png                 the first few samples of a few classes (one row per class)
  model.safetensors        only when `model` is a run folder: the EMA weights exported from its `latest`
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tb_core.config import to_dict
from tb_core.errors import ConfigError, InputError
from tb_core.fileio import atomic_write_json, atomic_write_with, sha256_file
from tb_core.runlock import RunLock
from tb_model.vae import VAEConfig, load_vae
from tb_train.cli import job_main
from tb_train.dist import DistInfo, agreed, barrier, on_ranks
from tb_train.sample.sampler import SEED_RULE, UINT8_RULE, Sampler, SamplingConfig, load_model, to_uint8

PROG = "tb-sample"


# -- the model file ------------------------------------------------------------------------------------
def resolve_model_file(spec: str, out: Path, rank: int) -> Path:
    """A .safetensors file as is; a run / checkpoint folder -> its EMA weights exported to
    out/model.safetensors by rank 0 (callers barrier before reading it)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(f"{p}: model not found (an exported .safetensors file or a run folder)")
    target = out / "model.safetensors"
    if rank == 0 and not target.is_file():
        from tb_train.engine.export import export
        export(p, target)
    return target


# -- output files --------------------------------------------------------------------------------------
def png_name(index: int, label: int, width: int) -> str:
    return f"{index:0{width}d}_c{label:04d}.png"


def index_width(num_samples: int) -> int:
    return max(6, len(str(num_samples - 1)))


def save_png(image: Tensor, path: Path) -> None:
    """uint8 [H, W, 3] -> PNG, atomically (a killed run never leaves half a file that counts as done)."""
    from PIL import Image

    atomic_write_with(path, lambda f: Image.fromarray(image.numpy()).save(f, format="png"))


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def write_npz(path: Path, files: Sequence[Path], labels: Sequence[int], size: tuple[int, int]) -> Path:
    """ADM-format npz (arr_0 uint8 [N, H, W, 3], arr_1 int64 [N]) streamed from PNGs one image at a time,
    uncompressed (np.load / mmap read it like np.savez output)."""
    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": (len(files), *size, 3)})
                for file in files:
                    arr = read_png(file)
                    if arr.shape != (*size, 3):
                        raise InputError(f"{file}: image is {arr.shape}, expected {(*size, 3)}")
                    member.write(np.ascontiguousarray(arr).tobytes())
            with zf.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    return atomic_write_with(path, write)


def grid_png(path: Path, files_by_class: dict[int, list[Path]], classes: int = 8, per_class: int = 8) -> Path:
    """The first `per_class` samples of `classes` classes spread over the label range, one row each."""
    from torchvision.utils import make_grid, save_image

    keys = sorted(files_by_class)
    picked = [keys[round(i * (len(keys) - 1) / max(classes - 1, 1))] for i in range(min(classes, len(keys)))]
    picked = list(dict.fromkeys(picked))
    rows = [[torch.from_numpy(read_png(f)).permute(2, 0, 1) for f in files_by_class[c][:per_class]] for c in picked]
    width = max(len(r) for r in rows)
    blank = torch.zeros_like(rows[0][0])
    tiles = [t for r in rows for t in r + [blank] * (width - len(r))]
    grid = make_grid(torch.stack(tiles).float() / 255, nrow=width, padding=2)
    atomic_write_with(path, lambda f: save_image(grid, f, format="png"))
    return path


# -- the job -------------------------------------------------------------------------------------------
@dataclass
class SampleJobConfig:
    """Options of `tb-sample` (dotted key=value on the command line, or a YAML file via --config)."""

    model: str                                 # exported .safetensors, or a run folder (EMA of its latest checkpoint)
    out: str                                   # output folder (rerun the same command to resume)
    vae: VAEConfig                             # decoder of the model's latents
    num_samples: int = 50_000
    labels: list[int] | None = None            # class of each sample (then num_samples = its length); None: balanced
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grid_classes: int = 8
    grid_per_class: int = 8


def sample_labels(cfg: SampleJobConfig, num_classes: int) -> tuple[list[int], str]:
    """The class of every global index and the rule, in words (balanced: the 50 x 1000 protocol)."""
    if cfg.labels is not None:
        if cfg.num_samples != len(cfg.labels) and cfg.num_samples != SampleJobConfig.num_samples:
            raise ConfigError(f"num_samples={cfg.num_samples} but labels has {len(cfg.labels)} entries")
        bad = [x for x in cfg.labels if not 0 <= x <= num_classes]
        if bad:
            raise ConfigError(f"labels: {bad[0]} is outside 0..{num_classes} ({num_classes} = unconditional)")
        return list(cfg.labels), "given list (labels)"
    if cfg.num_samples < 1 or cfg.num_samples % num_classes:
        raise ConfigError(f"num_samples={cfg.num_samples} is not a positive multiple of the model's {num_classes} "
                          f"classes (balanced classes); give labels=[...] for another split")
    per = cfg.num_samples // num_classes
    return [i // per for i in range(cfg.num_samples)], f"balanced: index i has class i // {per}"


IMAGE_KEYS = ("model_sha256", "vae_identity", "seed", "labels_sha256", "num_samples", "num_iter", "guidance",
              "guidance_schedule", "temperature", "order", "precision", "official")


def _record(cfg: SampleJobConfig, model_file: Path, meta: dict, vae, labels: list[int], rule: str,
            size: tuple[int, int], world: int) -> dict:
    s = cfg.sampling
    return {"model": str(model_file), "model_sha256": sha256_file(model_file), "model_step": int(meta.get("step", 0)),
            "model_weights": meta.get("weights"), "vae": to_dict(cfg.vae), "vae_identity": vae.identity,
            "num_samples": len(labels), "seed": cfg.seed, "seed_rule": SEED_RULE, "labels_rule": rule,
            "labels_sha256": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest(),
            "num_iter": s.num_iter, "guidance": s.guidance, "guidance_schedule": s.guidance_schedule, "temperature": s.temperature,
            "order": s.order, "precision": s.precision, "official": s.official, "batch_size": s.batch_size,
            "image_size": list(size), "uint8_rule": UINT8_RULE, "png_name": "<index>_c<class:04d>.png",
            "npz": "samples.npz (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels)", "world_size": world,
            "torch": torch.__version__, "complete": False}


def _check_resume(out: Path, record: dict) -> None:
    path = out / "samples.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for k in IMAGE_KEYS:
        if old.get(k) != record.get(k):
            raise ConfigError(f"{path}: this folder holds samples made with {k}={old.get(k)!r}, now {k}="
                              f"{record.get(k)!r}; use another out= or the same settings")


def _existing(out: Path, width: int) -> set[int]:
    done = set()
    for name in os.listdir(out):
        if name.endswith(".png") and name[:width].isdigit() and name[width:width + 2] == "_c":
            done.add(int(name[:width]))
    return done


def run_sample(cfg: SampleJobConfig, rank: int, world: int, device: torch.device) -> dict | None:
    """The tb-sample job on an initialised process group (or one process); the record on rank 0."""
    out = Path(cfg.out)
    info = DistInfo.for_rank(rank, world, device)
    lock = agreed(info, lambda: RunLock(out, PROG).acquire() if rank == 0 else None)  # one job per out folder
    try:
        return _sample(cfg, out, info)
    finally:
        if lock is not None:
            lock.release()


def _sample(cfg: SampleJobConfig, out: Path, info: DistInfo) -> dict | None:
    from tqdm import tqdm

    rank, world, device = info.rank, info.world, info.device
    vae = load_vae(cfg.vae, device=device)
    # rank 0 exports a run folder: a failure there must stop the others, not leave them waiting
    model_file = agreed(info, lambda: resolve_model_file(cfg.model, out, rank))
    model, meta = load_model(model_file, device)
    labels, rule = sample_labels(cfg, model.config.num_classes)
    side = model.config.latent_size * vae.downsample
    if vae.latent_channels != model.config.latent_channels:
        raise ConfigError(f"vae.path: the VAE has {vae.latent_channels} latent channels, the model "
                          f"{model.config.latent_channels}")
    record = _record(cfg, model_file, meta, vae, labels, rule, (side, side), world)
    record["precision"] = Sampler.resolve_precision(cfg.sampling.precision, device)  # "auto" as resolved here
    _check_resume(out, record)
    width = index_width(len(labels))
    done = _existing(out, width)
    barrier()  # every rank has listed the folder before anyone writes into it
    if rank == 0 and not (out / "samples.json").is_file():
        atomic_write_json(out / "samples.json", record)
    todo = [i for i in range(len(labels)) if i not in done]
    mine = todo[rank::world]
    sampler = Sampler(model, vae, cfg.sampling, device)
    bs = cfg.sampling.batch_size
    bar = tqdm(total=len(todo), initial=0, desc=f"tb-sample ({world} rank{'s' * (world > 1)})", unit="img",
               disable=rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    for a in range(0, len(mine), bs):
        idx = mine[a:a + bs]
        imgs = to_uint8(sampler.images([labels[i] for i in idx], idx, cfg.seed))
        for i, img in zip(idx, imgs):
            save_png(img, out / png_name(i, labels[i], width))
        bar.update(len(idx) * world)
    bar.close()
    elapsed = time.perf_counter() - t0
    barrier()
    if rank != 0:
        return None
    files = [out / png_name(i, labels[i], width) for i in range(len(labels))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{out}: {len(missing)} samples missing after sampling (first: {missing[0].name})")
    write_npz(out / "samples.npz", files, labels, (side, side))
    by_class: dict[int, list[Path]] = {}
    for i, f in enumerate(files):
        by_class.setdefault(labels[i], []).append(f)
    grid_png(out / "grid.png", by_class, cfg.grid_classes, cfg.grid_per_class)
    record.update(complete=True, generated_this_run=len(todo), seconds_this_run=elapsed,
                  images_per_s=len(todo) / elapsed if todo and elapsed > 0 else None, world_size=world)
    atomic_write_json(out / "samples.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    return job_main(PROG, argv, lambda cfg, source, args: _main(cfg))


def _main(cfg: SampleJobConfig) -> int:
    record = on_ranks(run_sample, cfg)
    if record is not None:
        rate = record["images_per_s"]
        print(f"tb-sample: {record['num_samples']} samples in {cfg.out} ({record['generated_this_run']} generated "
              f"now" + (f", {rate:.2f} img/s" if rate else "") + "), samples.npz, grid.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
