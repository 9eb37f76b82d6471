"""Embedded demo dataset: scikit-learn's 1,797 handwritten 8×8 digits as 32×32 RGB images.

The data ships inside scikit-learn, so the demo and the tests run on a fresh machine with no download.
Each 8×8 image (values 0..16) is scaled to 0..255, resized to 32×32 with bicubic interpolation and
replicated into 3 channels (white digit on black). Classes are the digits "0".."9".
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_SIZE = 32
DEMO_VAE = Path(__file__).resolve().parent / "assets" / "demo_vae"  # diffusers folder, tools/train_demo_vae.py
DEMO_CLASSES = tuple(str(d) for d in range(10))
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


def ensure_demo_images(folder: str | os.PathLike) -> Path:
    """Write the digits as an ImageFolder tree `folder/<digit>/<index>.png` once and return `folder`.

    A marker file records completion; the tree is built in a sibling temporary folder and renamed, so
    a killed call never leaves a half-written tree that later calls would take as complete.
    """
    folder = Path(folder)
    if (folder / _DONE).is_file():
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: exists, is not empty and is not a finished demo image folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    images, labels = demo_digits()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name in DEMO_CLASSES:
            (tmp / name).mkdir()
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(tmp / DEMO_CLASSES[label] / f"{i:04d}.png")
        (tmp / _DONE).write_text(f"{len(images)}\n")
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


__all__ = ["DEMO_VAE", "DEMO_SIZE", "DEMO_CLASSES", "demo_digits", "ensure_demo_images"]
