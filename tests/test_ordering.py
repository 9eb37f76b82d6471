"""Channel frequency order and named/explicit order resolution."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tb_model.ordering import OFFICIAL_KL16_ORDER, frequency_order, resolve_order


def _synthetic_batch() -> torch.Tensor:
    """[8, 3, 16, 16]: ch 0 white noise + a large offset, ch 1 smooth, ch 2 mildly smoothed noise."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 3, 16, 16, generator=g)
    blur = lambda t, k: F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="circular"), k, stride=1)  # noqa: E731
    return torch.stack(
        [noise[:, 0] + 10.0, blur(noise[:, 1:2], 7)[:, 0] * 0.01, blur(noise[:, 2:3], 3)[:, 0] * 5.0], dim=1
    )


def test_smooth_channels_come_first():
    perm, inverse = frequency_order(_synthetic_batch())
    assert perm.tolist() == [1, 2, 0]
    assert perm.dtype == inverse.dtype == torch.long


def test_perm_and_inverse_undo_each_other():
    x = torch.randn(2, 5, 8, 8)
    x[:, 3] = 1.0  # a constant channel scores 0 (smoothest), not NaN
    perm, inverse = frequency_order(x)
    assert perm[0] == 3
    assert torch.equal(x[:, perm][:, inverse], x)
    assert torch.equal(perm[inverse], torch.arange(5))


def test_frequency_order_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        frequency_order(torch.randn(4, 16, 8))


def test_resolve_named_and_explicit_orders():
    perm, inverse = resolve_order("identity", 4)
    assert perm.tolist() == inverse.tolist() == [0, 1, 2, 3]
    perm, inverse = resolve_order("official_kl16", 16)
    assert tuple(perm.tolist()) == OFFICIAL_KL16_ORDER
    assert torch.equal(perm[inverse], torch.arange(16)) and torch.equal(inverse[perm], torch.arange(16))
    perm, inverse = resolve_order(np.array([2, 0, 1]), 3)
    assert perm.tolist() == [2, 0, 1] and inverse.tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    "spec, channels, message",
    [
        ("official_kl16", 4, "is for 16 latent channels, got 4"),
        ("frequency", 4, "unknown channel order 'frequency'"),
        ([0, 1, 1], 3, "not a permutation of 0..2"),
        ([0, 1], 3, "not a permutation of 0..2"),
        ([0, 1, 2.0], 3, "not a permutation of 0..2"),
    ],
)
def test_resolve_order_errors(spec, channels, message):
    with pytest.raises(ValueError, match=message):
        resolve_order(spec, channels)
