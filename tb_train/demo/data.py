"""Embedded demo dataset: scikit-learn's 1,797 handwritten 8×8 digits as 32×32 RGB images.

The data ships inside scikit-learn, so the demo and the tests run on a fresh machine with no download.
Each 8×8 image (values 0..16) is scaled to 0..255, resized to 32×32 with bicubic interpolation and
replicated into 3 channels (white digit on black). Classes are the digits "0".."9".

`demo_splits` cuts the set into three fixed, class-stratified parts: "train" (what the generative model
and the digit classifier learn from), "heldout" (what recipes are tuned on) and "test" (what the demo
report prints). The demo VAE (tools/train_demo_vae.py) was fitted on all 1,797 images before the split
existed; it is an autoencoder, not a generator, so it cannot leak labels into the numbers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tb_model.vae import sample_latents
from tb_train.data.shards import LatentShards

DEMO_SIZE = 32
DEMO_VAE = Path(__file__).resolve().parent / "assets" / "demo_vae"  # diffusers folder, tools/train_demo_vae.py
DEMO_CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "heldout", "test")
SPLIT_SEED = 20261203
_DONE = ".complete"


def demo_digits(size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [N, size, size, 3], labels int64 [N]) with N = 1797, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # [N, 8, 8]
    out = np.empty((len(small), size, size, 3), np.uint8)
    for i, img in enumerate(small):
        big = np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.BICUBIC))
        out[i] = big[..., None]
    return out, digits.target.astype(np.int64)


def demo_vae_path(latent_channels: int = 4) -> Path:
    """The shipped demo VAE folder for a latent channel count: `demo_vae` for 4 (the default demo, named
    before a second one existed), `demo_vae16` for 16 (the 16-channel miniature of KL-16)."""
    return DEMO_VAE if latent_channels == 4 else DEMO_VAE.with_name(f"demo_vae{latent_channels}")


def demo_splits(labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fixed class-stratified split of the 1,797 digits -> {"train", "heldout", "test": sorted indices}.

    Per class, a seeded permutation gives 1/6 to "heldout", 1/6 to "test" and the rest (~2/3) to
    "train": 1,205 / 296 / 296 images. The split depends on nothing but the labels and SPLIT_SEED.
    """
    if labels is None:
        labels = demo_digits(8)[1]
    rng = np.random.RandomState(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = len(idx) // 6
        parts["heldout"].append(idx[:k])
        parts["test"].append(idx[k:2 * k])
        parts["train"].append(idx[2 * k:])
    return {name: np.sort(np.concatenate(v)) for name, v in parts.items()}


def demo_split(split: str, size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [n, size, size, 3], labels int64 [n]) of one split ("all" = every image)."""
    images, labels = demo_digits(size)
    if split == "all":
        return images, labels
    if split not in SPLITS:
        raise ValueError(f"demo split must be one of all, {', '.join(SPLITS)}; got {split!r}")
    idx = demo_splits(labels)[split]
    return images[idx], labels[idx]


def ensure_demo_images(folder: str | os.PathLike, split: str = "all") -> Path:
    """Write the digits of `split` as an ImageFolder tree `folder/<digit>/<index>.png` once; -> `folder`.

    A marker file records completion; the tree is built in a sibling temporary folder and renamed, so
    a killed call never leaves a half-written tree that later calls would take as complete.
    """
    if split != "all" and split not in SPLITS:
        raise ValueError(f"demo split must be one of all, {', '.join(SPLITS)}; got {split!r}")
    folder = Path(folder)
    if (folder / _DONE).is_file():
        words = (folder / _DONE).read_text().split()
        done = words[1] if len(words) > 1 else "all"
        if done != split:
            raise FileExistsError(f"{folder}: holds the demo split {done!r}, not {split!r}")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: exists, is not empty and is not a finished demo image folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    images, labels = demo_digits()
    keep = np.arange(len(labels)) if split == "all" else demo_splits(labels)[split]
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name in DEMO_CLASSES:
            (tmp / name).mkdir()
        for i in keep:
            Image.fromarray(images[i]).save(tmp / DEMO_CLASSES[labels[i]] / f"{i:04d}.png")
        (tmp / _DONE).write_text(f"{len(keep)} {split}\n")
        try:
            if folder.exists():
                folder.rmdir()  # an empty folder (e.g. made by the caller) is replaced
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _DONE).is_file():  # not a concurrent caller finishing first: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


__all__ = ["DEMO_VAE", "DEMO_SIZE", "DEMO_CLASSES", "SPLITS", "demo_digits", "demo_split", "demo_splits",
           "ensure_demo_images"]


def shard_latents(latents_dir: str | os.PathLike, seed: int = 0) -> torch.Tensor:
    """A precomputed folder's training latents read back: one posterior sample × scale of each image's
    image view (the demo trains without flips) -> float32 [N, C, h, w], the same for the same seed."""
    shards = LatentShards(latents_dir, verify=False)
    try:
        moments = torch.stack([torch.from_numpy(shards.read(i)[0][0].astype("float32")) for i in range(len(shards))])
        scale = float(shards.manifest["vae"]["scale"])
    finally:
        shards.close()
    return sample_latents(moments, scale, generator=torch.Generator().manual_seed(seed))
