"""Input images for precompute: listing (ImageFolder tree or webdataset tars), decoding, ADM center crop.

Listing fixes the global sample order: a sample's index is its position in the sorted listing, the
same on every rank and on every rerun. Decoding runs in DataLoader workers and never raises for a bad
file: it reports the reason, so the job can list the file in rejected.txt and carry on.
"""
from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tb_core.errors import InputError
from tb_core.plugins import Registry
from tb_train.data.shards import PreadFiles, group_members, tar_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
SOURCE_GROUP = "tokenbridge.image_sources"  # entry points: NAME = module:fn, fn(arg) -> an ImageFolder path


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (PNG, TIFF) and 32-bit integer grayscale
WIDE_MAX = 65535


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    PIL's own conversion of a 16-bit grayscale image (modes I;16*, and I, which is how such PNGs may
    open) clips every value above 255, so a normal 16-bit photo comes out ~98% white. These modes are
    scaled instead: value / 257 rounded (0..65535 -> 0..255, so 65535 stays white), values outside
    0..65535 clipped. Every other mode goes through PIL's `convert("RGB")`.
    """
    if img.mode in WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.rint(np.clip(wide, 0, WIDE_MAX) / 257.0).astype(np.uint8))
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: PIL image (any mode, see `to_rgb8`) -> uint8 [size, size, 3].

    Halve with a box filter while the short side is at least 2·size (cheap, alias-free), then one
    bicubic resize so the short side is `size`, then crop the center (floor of the excess on top/left).
    """
    img = to_rgb8(img)
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    ratio = size / min(img.size)
    img = img.resize((round(img.width * ratio), round(img.height * ratio)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@dataclass(frozen=True)
class ImageList:
    """The sorted input listing.

    names: a display name per sample (relative path, or `tar:key`) for rejected.txt and errors.
    ImageFolder: `labels` are class ids from the sorted sub-folder names. Tars: `labels` are None (each
    sample's `.cls` member is read when it is decoded) and `spans` hold per-sample
    (tar id, image offset, image size, cls offset, cls size) with `tars` the tar paths.
    """
    root: str
    names: list[str]
    classes: list[str] | None
    labels: np.ndarray | None = None
    tars: list[str] | None = None
    spans: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_image_folder(root: Path) -> ImageList:
    """root/<class>/**/<file>: every visible file is a sample (a non-image file is rejected later, so it
    is reported rather than silently skipped); sorted by relative path, classes by sorted folder name."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d.name))
    names, labels = [], []
    for cid, cname in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cname, followlinks=True):
            dirnames[:] = [d for d in dirnames if _visible(d)]
            rel = Path(dirpath).relative_to(root).as_posix()
            found.extend(f"{rel}/{f}" for f in filenames if _visible(f))
        found.sort()
        names.extend(found)
        labels.extend([cid] * len(found))
    return ImageList(str(root), names, classes, labels=np.asarray(labels, np.int64))


def _expand_tars(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if path.is_file():
        return [str(path)]
    from braceexpand import braceexpand

    out = []
    for pattern in braceexpand(spec):
        out.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{spec}: {len(missing)} tar file(s) not found, e.g. {missing[0]}")
    return out


def list_tars(spec: str) -> ImageList:
    """Webdataset tars of <key>.{jpg,jpeg,png,webp,bmp} + <key>.cls, in tar order then member order.

    A sample without an image member or without a cls member is still listed (image span -1), so that
    decoding rejects it with a reason instead of dropping it unseen.
    """
    tars = _expand_tars(spec)
    names, spans = [], []
    for t, tar in enumerate(tars):
        for key, members in group_members(tar_members(tar)):
            img = next((members[e] for e in IMAGE_EXTS if e in members), (-1, 0))
            cls = members.get("cls", (-1, 0))
            names.append(f"{Path(tar).name}:{key}")
            spans.append((t, img[0], img[1], cls[0], cls[1]))
    return ImageList(spec, names, None, tars=tars, spans=np.asarray(spans, np.int64).reshape(-1, 5))


_SOURCES = Registry(SOURCE_GROUP)


def register_image_source(name: str, fn: Callable[[str], str | os.PathLike]) -> None:
    """Make `input=NAME:ARG` mean the ImageFolder that `fn(ARG)` returns (written on first use), in this
    process; a package declares one under the entry-point group `tokenbridge.image_sources` instead
    (the demo's `demo:FOLDER` is declared that way, so this module never imports the demo)."""
    _SOURCES.register(name, fn)


def _source(spec: str) -> Callable[[str], str | os.PathLike] | None:
    """The image source named by `spec`'s `NAME:` prefix, or None (a plain path; `C:\\` is not a name)."""
    name, sep, _ = spec.partition(":")
    if not sep or len(name) < 2 or not name.isidentifier():
        return None
    return _SOURCES.get(name)


def list_images(spec: str) -> ImageList:
    """An ImageFolder tree (a folder with class sub-folders), tars (a .tar, a folder of .tar files, or a
    brace/glob pattern), or `NAME:ARG` of a registered image source (e.g. `demo:FOLDER`, the embedded
    digits written to FOLDER on first use); a wrong path or an empty input is a one-line InputError."""
    source = _source(spec)
    if source is not None:
        spec = str(source(spec.partition(":")[2]))
    path = Path(spec)
    if path.is_dir() and any(d.is_dir() and _visible(d.name) for d in path.iterdir()):
        images = list_image_folder(path)
    elif path.exists() or any(c in spec for c in "{*?["):
        images = list_tars(spec)
    else:
        raise InputError(f"{spec}: input not found (want an ImageFolder tree or webdataset tars)")
    if len(images) == 0:
        raise InputError(f"{spec}: no images found (want class sub-folders with images, or .tar files)")
    return images


class ImageDataset(torch.utils.data.Dataset):
    """Global sample index -> (index, uint8 image [3, R, R] or None, class id, rejection reason).

    Runs in DataLoader workers; tar members are read with positioned reads (`PreadFiles`).
    """

    def __init__(self, images: ImageList, resolution: int):
        self.images = images
        self.resolution = resolution
        self._files = PreadFiles()

    def __len__(self) -> int:
        return len(self.images)

    def _read_tar(self, tar: int, offset: int, size: int) -> bytes:
        return self._files.read(self.images.tars[tar], offset, size)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        if self.images.spans is None:
            return Image.open(Path(self.images.root) / self.images.names[index]), int(self.images.labels[index])
        tar, img_off, img_size, cls_off, cls_size = (int(v) for v in self.images.spans[index])
        if img_off < 0:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")
        if cls_off < 0:
            raise ValueError("no cls member")
        label = int(self._read_tar(tar, cls_off, cls_size).decode("ascii").strip())
        return Image.open(io.BytesIO(self._read_tar(tar, img_off, img_size))), label

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, int, str]:
        try:
            img, label = self._load(index)
            with img:
                arr = adm_center_crop(img, self.resolution)
        except Exception as e:  # any decoder failure is a rejection with its reason, never a crash
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            return index, None, -1, reason
        return index, torch.from_numpy(np.array(arr)).permute(2, 0, 1), label, ""


def collate(items: list[tuple[int, torch.Tensor | None, int, str]]) -> dict:
    """-> {"indices": [b] kept global indices, "images": uint8 [b, 3, R, R], "labels": int64 [b],
    "rejected": [(index, reason)]}; b may be 0 when the whole batch was rejected."""
    ok = [it for it in items if it[1] is not None]
    return {
        "indices": [it[0] for it in ok],
        "images": torch.stack([it[1] for it in ok]) if ok else None,
        "labels": torch.tensor([it[2] for it in ok], dtype=torch.int64),
        "rejected": [(it[0], it[3]) for it in items if it[1] is None],
    }


__all__ = [
    "IMAGE_EXTS", "to_rgb8", "adm_center_crop", "ImageList", "list_image_folder", "list_tars",
    "list_images", "ImageDataset", "collate", "SOURCE_GROUP", "register_image_source",
]
