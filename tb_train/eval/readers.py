"""Image sets for `tb-eval`: a tb-sample folder (checked for gaps), any image folder, or an ADM-style
.npz (memory-mapped, so a 10 GB `arr_0` is read slice by slice), each read by index range so ranks read
only their slice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from tb_core.errors import InputError
from tb_core.fileio import sha256_file, sha256_files

SAMPLE_NAME = re.compile(r"^(\d+)_c(\d+)\.png$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def images_reader(images: ImageSet) -> Callable[[int, int], Tensor]:
    """(start, stop) -> uint8 [n, 3, H, W] tensor of an ImageSet."""
    return lambda a, b: torch.from_numpy(np.array(images.read(a, b))).permute(0, 3, 1, 2)
