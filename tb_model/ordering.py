"""Channel generation order for the dimension-wise AR head: low-frequency-dominant channels first.

The head predicts a token's channels one after another, so channels that carry coarse image
structure should come first and condition the detail channels. `x[:, perm]` puts channels in
generation order; `y[:, inverse]` undoes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

OFFICIAL_KL16_ORDER: tuple[int, ...] = (8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5)


def _with_inverse(perm: Tensor) -> tuple[Tensor, Tensor]:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return perm, inverse


def spectral_frequency(latents: Tensor) -> Tensor:
    """Energy-weighted mean radial spatial frequency of each channel: [N, C, h, w] -> float64 [C].

    Each image's per-channel mean is subtracted first: the DC term measures a channel's offset,
    not its spatial structure, and would otherwise make any channel with a large mean look smooth.
    The power spectrum |FFT2|^2 is summed over the batch; frequencies are in cycles per latent pixel
    (0 .. ~0.71). Scale-invariant per channel; a channel with no spatial variation scores 0.
    """
    if latents.dim() != 4:
        raise ValueError(f"frequency_order expects latents [N, C, h, w], got shape {tuple(latents.shape)}")
    x = latents.detach().to(torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square().sum(dim=0)  # [C, h, w]
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=x.device)[None, :]
    radius = torch.sqrt(fy * fy + fx * fx)  # [h, w]
    energy = power.sum(dim=(-2, -1))
    return (power * radius).sum(dim=(-2, -1)) / energy.clamp_min(torch.finfo(torch.float64).tiny)


def frequency_order(latents: Tensor) -> tuple[Tensor, Tensor]:
    """Channels sorted by ascending mean spatial frequency: latents [N, C, h, w] -> (perm, inverse) long [C].

    Ties keep channel index order (stable sort).
    """
    score = spectral_frequency(latents)
    perm = torch.sort(score, stable=True).indices.cpu()
    return _with_inverse(perm)


def resolve_order(spec: str | Sequence[int], channels: int) -> tuple[Tensor, Tensor]:
    """Named or explicit order -> (perm, inverse) long [channels].

    spec: "identity", "official_kl16" (the authors' KL-16 order, 16 channels only), or a list that
    is a permutation of range(channels).
    """
    if isinstance(spec, str):
        if spec == "identity":
            return _with_inverse(torch.arange(channels))
        if spec == "official_kl16":
            if channels != 16:
                raise ValueError(f"channel order 'official_kl16' is for 16 latent channels, got {channels}")
            return _with_inverse(torch.tensor(OFFICIAL_KL16_ORDER, dtype=torch.long))
        raise ValueError(f"unknown channel order {spec!r} (use 'identity', 'official_kl16' or a list)")
    order = list(spec)
    if any(isinstance(c, bool) or not isinstance(c, Integral) for c in order) or sorted(order) != list(range(channels)):
        raise ValueError(f"channel order {order} is not a permutation of 0..{channels - 1}")
    return _with_inverse(torch.tensor([int(c) for c in order], dtype=torch.long))
