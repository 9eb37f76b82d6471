"""Sampling: ONE component (`Sampler`) for the training grid, the demo, evaluation during training and
`tb-sample`, the distributed 50k-sample job.

    tb-sample model=L.safetensors out=runs/L/samples vae.path=kl16.ckpt num_samples=50000 \\
              sampling.num_iter=256 sampling.cfg=3.1 sampling.temperature=0.97
    torchrun --nproc_per_node 8 -m tb_train.sample ...       (ranks split the sample indices)

Sample i's class, MAR order and head random numbers come from (seed, i) alone — a generator per sample,
seeded with `sample_seed(seed, i)` — so the set of images is identical for any world size and batch size,
and a rerun after a crash only generates the indices whose PNG is missing. Output folder:
  <index>_c<class>.png     one per sample (index zero-padded to 6+ digits)
  samples.json             every setting, the seed and class rules, the float->uint8 rule
  samples.npz              ADM format: arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N] (written at the end,
                           streamed from the PNGs: never all images in memory)
  grid.png                 the first few samples of a few classes (one row per class)
  model.safetensors        only when `model` is a run folder: the EMA weights exported from its `latest`
"""
from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from tb_core.config import load_config, to_dict
from tb_core.errors import ConfigError, InputError, TBError
from tb_core.fileio import atomic_write_json, atomic_write_with, sha256_file
from tb_model.pretrained import read_config
from tb_model.tokenbridge import TokenBridge
from tb_model.vae import VAEConfig, load_vae
from tb_train.dist import any_flag, barrier
from tb_train.rng import derive_seed

SEED_STREAM = 2  # derive_seed stream of sampling (0: model randomness, 1: posterior noise in training)
UINT8_RULE = "uint8 = round_half_even(clamp((x + 1) / 2 * 255, 0, 255)) in float32, x = VAE decode in [-1, 1]"
SEED_RULE = ("sample i: torch.Generator (CPU) seeded with derive_seed(seed, i, 0, 2) (blake2b of 'seed/i/0/2', "
             "63 bits); its random order and head uniforms are drawn per sample")


@dataclass
class SamplingConfig:
    """How images are generated (also the trainer's grid and evaluation during training)."""

    num_iter: int = 64                                        # MAR steps (64 fast, 256 for the paper's numbers)
    cfg: float = 1.0                                          # guidance weight (paper: 3.1 L, 3.45 H)
    cfg_schedule: Literal["linear", "constant"] = "linear"    # linear: 1 -> cfg with the fraction generated
    temperature: float = 1.0                                  # paper: 0.97 L, 0.91 H
    order: Literal["random", "raster", "confidence"] = "random"
    batch_size: int = 32                                      # images per generate call per rank (no effect on images)
    precision: Literal["fp32", "bf16"] = "fp32"               # bf16: autocast of the model; VAE decode in fp32
    official: bool = False                                    # the released loop (2 MAR passes, no KV cache)

    def __post_init__(self) -> None:
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample `index` (a function of (seed, index) only)."""
    return derive_seed(seed, index, 0, SEED_STREAM)


def to_uint8(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] by UINT8_RULE (MAR's/ADM's rule)."""
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


class Sampler:
    """model + VAE + settings -> images. Stateless apart from the modules it holds.

    model: a TokenBridge in eval mode on `device`; vae: a LatentVAE (None: `latents` only).
    """

    def __init__(self, model: torch.nn.Module, vae, settings: SamplingConfig, device: str | torch.device = "cpu"):
        self.model, self.vae, self.settings = model, vae, settings
        self.device = torch.device(device)

    def _autocast(self):
        if self.settings.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def latents(self, labels: Sequence[int] | Tensor, indices: Sequence[int], seed: int) -> Tensor:
        """Scaled latents [B, C, h, w] of samples `indices` with classes `labels` (one batch)."""
        s = self.settings
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        gens = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        with self._autocast():
            out = self.model.generate(labels, num_iter=s.num_iter, cfg=s.cfg, cfg_schedule=s.cfg_schedule,
                                      temperature=s.temperature, order=s.order, generator=gens,
                                      official=s.official)
        return out.float()

    @torch.no_grad()
    def images(self, labels: Sequence[int] | Tensor, indices: Sequence[int], seed: int) -> Tensor:
        """Decoded images [B, 3, H, W] in about [-1, 1], generated `settings.batch_size` at a time."""
        if self.vae is None:
            raise ConfigError("Sampler.images needs a VAE (vae.path)")
        labels, indices = list(map(int, labels)), list(map(int, indices))
        out = []
        for a in range(0, len(indices), self.settings.batch_size):
            b = a + self.settings.batch_size
            out.append(self.vae.decode(self.latents(labels[a:b], indices[a:b], seed)))
        return torch.cat(out)


# -- loading -------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """An exported model file -> (TokenBridge in eval mode, the file's metadata: step, weights, ...)."""
    _, meta = read_config(path)
    return TokenBridge.from_pretrained(path, device=device), meta


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
        from tb_train.export import export
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


IMAGE_KEYS = ("model_sha256", "vae_identity", "seed", "labels_sha256", "num_samples", "num_iter", "cfg",
              "cfg_schedule", "temperature", "order", "precision", "official")


def _record(cfg: SampleJobConfig, model_file: Path, meta: dict, vae, labels: list[int], rule: str,
            size: tuple[int, int], world: int) -> dict:
    import hashlib

    s = cfg.sampling
    return {"model": str(model_file), "model_sha256": sha256_file(model_file), "model_step": int(meta.get("step", 0)),
            "model_weights": meta.get("weights"), "vae": to_dict(cfg.vae), "vae_identity": vae.identity,
            "num_samples": len(labels), "seed": cfg.seed, "seed_rule": SEED_RULE, "labels_rule": rule,
            "labels_sha256": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest(),
            "num_iter": s.num_iter, "cfg": s.cfg, "cfg_schedule": s.cfg_schedule, "temperature": s.temperature,
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
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(cfg.vae, device=device)
    error = None
    try:
        model_file = resolve_model_file(cfg.model, out, rank)
    except TBError as e:
        error = e
    if any_flag(error is not None, device):  # rank 0 exports: the others must not wait for it forever
        raise error or InputError(f"{cfg.model}: rank 0 could not export this run folder (see its error)")
    model, meta = load_model(model_file, device)
    labels, rule = sample_labels(cfg, model.config.num_classes)
    side = model.config.latent_size * vae.downsample
    if vae.latent_channels != model.config.latent_channels:
        raise ConfigError(f"vae.path: the VAE has {vae.latent_channels} latent channels, the model "
                          f"{model.config.latent_channels}")
    record = _record(cfg, model_file, meta, vae, labels, rule, (side, side), world)
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
    from tb_train.cli import job_parser, run_main

    args = job_parser("tb-sample", "Generate N samples across ranks (docs/sampling.md).",
                      config_required=False).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("tb-sample", lambda: _main(load_config(SampleJobConfig, args.config, args.overrides)))


def on_ranks(job: Callable[..., dict | None], cfg) -> dict | None:
    """`job(cfg, rank, world, device)` inside this process's place in the process group (torchrun, Slurm,
    or a single process without a launcher); the group is torn down even when the job raises."""
    from tb_train.dist import init_distributed, shutdown

    dist = init_distributed()
    try:
        return job(cfg, dist.rank, dist.world, dist.device)
    finally:
        shutdown()


def _main(cfg: SampleJobConfig) -> int:
    record = on_ranks(run_sample, cfg)
    if record is not None:
        rate = record["images_per_s"]
        print(f"tb-sample: {record['num_samples']} samples in {cfg.out} ({record['generated_this_run']} generated "
              f"now" + (f", {rate:.2f} img/s" if rate else "") + "), samples.npz, grid.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
