"""Fixtures for the precompute tests: a tiny random-init VAE folder and small image sets with bad files."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "eel")
CORRUPT = ("dog/broken.jpg", "eel/garbage.png")  # truncated JPEG, random bytes


def tiny_vae(folder: Path) -> Path:
    """A random-init diffusers AutoencoderKL (4 latent channels, downsample 2, ~30k params), saved
    with save_pretrained so tb_model.vae.load_vae reads it like any diffusers folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
                        mid_block_add_attention=False, scaling_factor=0.5)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth colour gradient + a bright disc + noise: compressible like a photo, not constant."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
    cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.3) * min(h, w)
    disc = ((np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2) < r * r
    base[disc] = 255 - base[disc]
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_images(root: Path, per_class: int = 7, seed: int = 0) -> list[str]:
    """ImageFolder tree with `per_class` images per class (jpg and png, assorted sizes and aspect
    ratios, a grayscale and an RGBA one) plus the two CORRUPT files; returns the good relative paths."""
    rng = np.random.default_rng(seed)
    good = []
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(16, 48)), int(rng.integers(16, 48))
            img = _image(rng, h, w)
            if i == 1:
                img = img.convert("L")
            if i == 2:
                img = img.convert("RGBA")
            name = f"{c}/img{i:02d}.{'jpg' if i % 2 else 'png'}"
            img.save(root / name)
            good.append(name)
    buf = io.BytesIO()
    _image(rng, 32, 32).save(buf, format="JPEG")
    (root / CORRUPT[0]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / CORRUPT[1]).write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return sorted(good)


def make_tars(image_root: Path, out: Path, per_tar: int = 8) -> Path:
    """The same images as webdataset tars (<key>.<ext> + <key>.cls), keys in sorted-path order."""
    classes = sorted(d.name for d in image_root.iterdir() if d.is_dir())
    files = sorted(p.relative_to(image_root).as_posix() for p in image_root.rglob("*") if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(files), per_tar):
        with tarfile.open(out / f"part-{t // per_tar:04d}.tar", "w") as tar:
            for k, rel in enumerate(files[t:t + per_tar], start=t):
                ext = rel.rsplit(".", 1)[1]
                for name, data in ((f"{k:06d}.{ext}", (image_root / rel).read_bytes()),
                                   (f"{k:06d}.cls", str(classes.index(rel.split("/")[0])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def run_cli(args: list[str], env: dict | None = None, code: str | None = None) -> subprocess.Popen:
    """Start `python -m tb_train.precompute ARGS` (or `python -c CODE ARGS`) with one CPU thread; the
    caller waits or kills. Rank variables come only from `env`."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        if env is None or k not in env:
            full_env.pop(k, None)
    entry = ["-c", code] if code is not None else ["-m", "tb_train.precompute"]
    return subprocess.Popen([sys.executable, *entry, *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_images(root)
    return root
