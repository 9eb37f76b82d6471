"""A small digit classifier: the feature extractor behind the demo's digit-FID and class-consistency.

Inception features mean nothing on 32×32 grey digits, so the demo measures its samples with a network
that knows this data: a 3-layer CNN trained on the demo's "train" split (tb_train/demo/data.py) and
shipped as a ~190 KB safetensors file (tb_train/demo/assets/digits_cnn.safetensors). It follows the
feature-extractor protocol of the evaluation code:

    extractor(images uint8 [N, 3, H, W]) -> {"pool": penultimate features float32 [N, 64],
                                             "logits": float32 [N, 10]}

so digit-FID runs the same Fréchet-distance code as an ImageNet FID, with another network. Images are
read as grey (channel mean), resized to 32×32 if needed and scaled to [-1, 1].

Training is deterministic on one CPU thread (fixed seed, fixed augmentation stream) and takes a few
seconds; `python -m tb_train.demo.digits --out PATH` retrains and prints the held-out accuracy, which is
also stored in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from tb_core.errors import InputError
from tb_core.fileio import atomic_write_bytes, sha256_file
from tb_train.demo.data import DEMO_SIZE, demo_split
from tb_train.eval.metrics import feature_stats, frechet_distance

DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_cnn.safetensors"
FEATURE_DIM = 64


class DigitCNN(nn.Module):
    """Grey 32×32 digit -> 64 penultimate features (after ReLU) -> 10 logits. ~48k parameters."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 16 x 16 x 16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 8 x 8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 4 x 4
        )
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.out = nn.Linear(feature_dim, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x float [N, 1, 32, 32] in [-1, 1] -> (features [N, D], logits [N, 10])."""
        feats = F.relu(self.fc(self.convs(x).flatten(1)))
        return feats, self.out(feats)


def to_input(images: Tensor) -> Tensor:
    """uint8 [N, 3 or 1, H, W] -> float32 [N, 1, 32, 32] in [-1, 1] (channel mean, bilinear resize)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"digit classifier expects uint8 images [N, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True) / 127.5 - 1.0
    if x.shape[-2:] != (DEMO_SIZE, DEMO_SIZE):
        x = F.interpolate(x, size=(DEMO_SIZE, DEMO_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class DigitExtractor:
    """The protocol object: call it on uint8 images; `name` identifies the feature space in reports."""

    name = "digits-cnn"
    predicts_model_classes = True  # its 10 logits are the demo model's classes (evaluation logs class-consistency)

    def __init__(self, model: DigitCNN, metadata: dict[str, str] | None = None, batch: int = 512) -> None:
        self.model = model.eval()
        self.metadata = dict(metadata or {})
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 [N, 3, H, W] -> {"pool": [N, 64], "logits": [N, 10]} (float32, CPU)."""
        x = to_input(images.cpu())
        feats, logits = zip(*(self.model(chunk) for chunk in x.split(self.batch))) if len(x) else ((), ())
        if not feats:
            return {"pool": x.new_zeros(0, self.model.fc.out_features), "logits": x.new_zeros(0, 10)}
        return {"pool": torch.cat(feats), "logits": torch.cat(logits)}


def images_nchw(images_nhwc: np.ndarray) -> Tensor:
    """uint8 numpy [N, H, W, 3] (demo_data layout) -> uint8 Tensor [N, 3, H, W] (protocol layout)."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def accuracy(extractor: DigitExtractor, images: Tensor, labels: Tensor) -> float:
    """Share of images [N, 3, H, W] uint8 whose arg-max class equals labels [N]."""
    return float((extractor(images)["logits"].argmax(1) == labels).float().mean())


@dataclass
class DigitTrainConfig:
    """Recipe of the shipped weights (retraining with it reproduces them on one thread)."""

    epochs: int = 30
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = 2            # random translation up to ±shift pixels (samples are never perfectly centred)
    seed: int = 0


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image [N, 1, H, W] by its own random (dy, dx) in [-max_shift, max_shift], zero fill."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    flat = padded[:, 0].flatten(1)
    return flat.gather(1, (rows * (w + 2 * max_shift) + cols).flatten(1)).view(n, 1, h, w)


def train_classifier(cfg: DigitTrainConfig = DigitTrainConfig(), log: bool = False) -> DigitCNN:
    """Train on the demo "train" split; deterministic for a given torch build and thread count."""
    torch.manual_seed(cfg.seed)
    images, labels = demo_split("train")
    x_all, y_all = to_input(images_nchw(images)), torch.from_numpy(labels)
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x_all) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for idx in perm.split(cfg.batch):
            loss = F.cross_entropy(model(_shift(x_all[idx], cfg.shift, gen))[1], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log and (epoch % 10 == 9 or epoch == cfg.epochs - 1):
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_all):.4f}", flush=True)
    return model.eval()


def real_images(split: str) -> tuple[Tensor, Tensor]:
    """A demo split as protocol tensors: (uint8 [n, 3, 32, 32], int64 labels [n])."""
    images, labels = demo_split(split)
    return images_nchw(images), torch.from_numpy(labels)


def digit_stats(feats: Tensor) -> tuple:
    """(mu, sigma) of penultimate features [N, D], by the evaluation code's own function."""
    return feature_stats(feats)


def digit_fid(stats_a: tuple, stats_b: tuple) -> float:
    """Fréchet distance between two (mu, sigma) pairs, by the evaluation code's own function."""
    return float(frechet_distance(*stats_a, *stats_b))


def score_images(extractor: DigitExtractor, images: Tensor, labels: Tensor, reference: tuple) -> dict:
    """Generated images uint8 [N, 3, H, W] for requested classes labels [N] vs real reference (mu, sigma).

    -> {"class_consistency": share classified as requested, "per_class": [10 shares],
        "digit_fid": Fréchet distance of the penultimate features to the reference, "n": N}
    """
    out = extractor(images)
    correct = (out["logits"].argmax(1) == labels.cpu()).float()
    per_class = [float(correct[labels.cpu() == c].mean()) if bool((labels == c).any()) else float("nan")
                 for c in range(10)]
    return {"class_consistency": float(correct.mean()), "per_class": per_class,
            "digit_fid": digit_fid(digit_stats(out["pool"]), reference), "n": int(len(images))}


def split_accuracy(extractor: DigitExtractor, split: str) -> float:
    """Classifier accuracy on one demo split ("train", "heldout", "test")."""
    return accuracy(extractor, *real_images(split))


def save_classifier(model: DigitCNN, path: Path, metadata: dict[str, str]) -> None:
    """Weights + metadata (recipe, accuracies) as one safetensors file, written atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=metadata))


def load_digit_extractor(path: str | Path = DIGITS_WEIGHTS) -> DigitExtractor:
    """The shipped (or a retrained) classifier as a feature extractor."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: digit classifier weights not found (python -m tb_train.demo.digits --out {path})")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
        model = DigitCNN()
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise InputError(f"{path}: not a digit classifier weights file ({str(e).splitlines()[0]})") from e
    return DigitExtractor(model, metadata)


def extractor_factory(weights: str | None, device: torch.device) -> tuple[DigitExtractor, str]:
    """The entry point `digits` of the group `tokenbridge.extractors` (setup.cfg): evaluation uses the
    demo's classifier by name without tb_train importing the demo. weights None: the shipped file."""
    path = Path(weights).expanduser() if weights else DIGITS_WEIGHTS
    return load_digit_extractor(path), sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tb_train.demo.digits",
                                description="Train the demo's digit classifier and write its weights.")
    p.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    p.add_argument("--epochs", type=int, default=DigitTrainConfig.epochs)
    p.add_argument("--seed", type=int, default=DigitTrainConfig.seed)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    cfg = DigitTrainConfig(epochs=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    model = train_classifier(cfg, log=True)
    seconds = time.perf_counter() - t0
    extractor = DigitExtractor(model)
    acc = {split: split_accuracy(extractor, split) for split in ("train", "heldout", "test")}
    print(f"trained in {seconds:.1f} s on 1 thread; accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    save_classifier(model, args.out, {"recipe": json.dumps(asdict(cfg)), "torch": torch.__version__,
                                      **{f"accuracy_{k}": f"{v:.4f}" for k, v in acc.items()}})
    print(f"wrote {args.out}")
    return 0


__all__ = ["DigitCNN", "DigitExtractor", "DigitTrainConfig", "DIGITS_WEIGHTS", "FEATURE_DIM", "accuracy",
           "digit_fid", "digit_stats", "images_nchw", "load_digit_extractor", "real_images", "score_images",
           "split_accuracy", "to_input", "train_classifier"]

if __name__ == "__main__":
    sys.exit(main())
