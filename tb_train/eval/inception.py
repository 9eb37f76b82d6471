"""The Inception feature extractor of published FID/IS numbers, loaded from a LOCAL weights file.

torch-fidelity's `inception-v3-compat` is a PyTorch port of the TensorFlow Inception graph
(`inception-2015-12-05`) that ADM's evaluator and the FID literature use: same bilinear resize to
299x299 as TF1, same padding quirks. Its weights file (`weights-inception-2015-12-05-6726825d.pth`)
must be given by path: torch-fidelity would otherwise try to download it, and jobs never touch the
network.

Outputs, for uint8 images [N, 3, H, W] (any H, W):
  "pool"    [N, 2048]  pool3 features (FID, precision/recall)
  "logits"  [N, 1008]  pool3 @ W without the bias ("logits_unbiased"; ADM and torch-fidelity's IS)
  "spatial" [N, 2023]  ADM's sFID features: the output of TF's `mixed_6/conv` (torch: Mixed_6d.branch1x1,
                       conv + BN + ReLU, [N, 192, 17, 17]), first 7 channels, flattened in TF's
                       channels-last order (h, w, c) so statistics match ADM's `mu_s`/`sigma_s`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch
from torch import Tensor, nn

from tb_core.errors import InputError
from tb_core.fileio import atomic_torch_save

NAME = "inception-v3-compat"
SPATIAL_CHANNELS = 7
DEFAULT_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"


def _build(path: Path | None):
    """torch-fidelity's module with the weights of `path` loaded strictly (None: PyTorch's default init,
    with its download replaced by nothing)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if path is None:
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
                mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
            return FeatureExtractorInceptionV3(NAME, ["2048", "logits_unbiased"])
    return FeatureExtractorInceptionV3(NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))


class InceptionExtractor(nn.Module):
    """uint8 images [N, 3, H, W] -> {"pool", "logits", "spatial"} float32 tensors (see module doc).

    A feature extractor in the project's protocol (`name`, call on uint8 images). Runs in fp32 on
    `device`; batching is the caller's.
    """

    name = NAME

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: Inception weights not found (give the local file "
                             f"{DEFAULT_FILE_NAME}; nothing is downloaded)")
        try:  # weights_only first: a damaged or foreign pickle is refused before torch-fidelity opens it
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise InputError(f"{path}: not a PyTorch weights file ({type(e).__name__})") from None
        if not isinstance(weights, dict):
            raise InputError(f"{path}: expected a state dict, got {type(weights).__name__}")
        del weights
        try:
            self.net = _build(path)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise InputError(f"{path}: not torch-fidelity inception-v3-compat weights ({first})") from None
        self.device = torch.device(device)
        self.net.to(self.device)
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"Inception input must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        with strict_fp32(self.device):
            pool, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool.float(), "logits": logits.float(), "spatial": spatial}


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """Full float32 arithmetic inside, whatever the caller set: TF32 off for cuDNN convolutions and
    matmuls (PyTorch's default for cuDNN convs is TF32 ON, which moves features on Ampere+ GPUs away
    from the reference network's float32 ones) and no autocast; the caller's settings are restored."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised weights file in torch-fidelity's layout (tests and speed benchmarks).

    PyTorch's default init makes the deep features ~1e-8 (every FID rounds to 0), so convolutions are
    drawn from N(0, 2/fan_in) (He) and the classifier from N(0, 1/2048), BN left at identity; the
    features then vary between images like a trained network's do.
    """
    gen = torch.Generator().manual_seed(seed)
    net = _build(None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
                m.bias.zero_()

    return atomic_torch_save(net.state_dict(), path)


__all__ = ["InceptionExtractor", "write_random_weights", "NAME", "DEFAULT_FILE_NAME"]
