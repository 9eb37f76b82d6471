"""DimensionwiseQuantizer: the authors' table, index/value contract, schemes, state and dtypes."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from tb_model.quantizer import (
    DimensionwiseQuantizer, QuantizerConfig, gaussian_table, nearest_index, released_gaussian_table,
)

SCHEMES = ("gaussian", "uniform", "empirical")


def _quantizer(scheme: str, levels: int = 64, channels: int = 4, seed: int = 0) -> DimensionwiseQuantizer:
    q = DimensionwiseQuantizer(levels=levels, scheme=scheme, channels=channels)
    if scheme == "empirical":
        g = torch.Generator().manual_seed(seed)
        q.calibrate(torch.randn(64, channels, 8, 8, generator=g))
    return q


@pytest.mark.parametrize("levels", [2, 64])
def test_gaussian_table_matches_quadrature(levels):
    edges = np.clip(stats.norm.ppf(np.linspace(0.0, 1.0, levels + 1)), -3.0, 3.0)
    expected = []
    for a, b in zip(edges[:-1], edges[1:]):
        first_moment = integrate.quad(lambda t: t * stats.norm.pdf(t), a, b, epsabs=1e-14)[0]
        expected.append(first_moment / (stats.norm.cdf(b) - stats.norm.cdf(a)))
    np.testing.assert_allclose(gaussian_table(levels).numpy(), expected, rtol=0, atol=1e-10)


def _released_reference(levels: int) -> torch.Tensor:
    """The released table, written out independently: scipy's ppf of float32 probabilities, then the
    truncated mean of every bin in float32 with 0-dim tensors, one bin at a time."""
    probs = torch.linspace(0, 1, levels + 1, dtype=torch.float32)
    edges = torch.tensor(stats.norm.ppf(probs.numpy()), dtype=torch.float32).clamp(-3.0, 3.0)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        dens = [torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi) for t in (a, b)]
        mass = [0.5 * (1 + torch.erf(t / math.sqrt(2))) for t in (a, b)]
        out.append((dens[0] - dens[1]) / (mass[1] - mass[0]))
    return torch.tensor(out, dtype=torch.float32)


def _released_indices(x: torch.Tensor, table: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """The released assignment: normalize in x's dtype, clamp, argmin over the whole table (first on ties)."""
    x_n = ((x - qmin) / (qmax - qmin) * 6.0 - 3.0).clamp(-3.0, 3.0)
    return (x_n[..., None] - table).abs().argmin(dim=-1)


@pytest.mark.parametrize("levels", [2, 16, 64, 256])
def test_released_float32_table_and_its_latent_buffer(levels):
    table = released_gaussian_table(levels)
    assert table.dtype == torch.float32 and torch.equal(table, _released_reference(levels))
    exact = gaussian_table(levels)
    assert (table.double() - exact).abs().max() < 5e-5  # float32 cancellation in Phi(b) - Phi(a) near 1
    assert not torch.equal(table, exact.float()) or levels == 2  # it IS another table than the integral
    q = DimensionwiseQuantizer(levels=levels, qmin=-5.0, qmax=5.0)
    assert q.values.shape == (1, levels) and q.values.dtype == torch.float32
    assert torch.equal(q.values[0], (table + 3.0) / 6.0 * 10.0 + -5.0)  # the released dequantize values
    assert set(q.state_dict()) == {"values"}


def test_gaussian_indices_equal_released_argmin_also_at_midpoints():
    qmin, qmax = -4.0, 6.0
    q = DimensionwiseQuantizer(levels=64, qmin=qmin, qmax=qmax)
    table = released_gaussian_table(64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 16, 16, generator=g) * 3 + 1
    # inputs at (and one float32 step around) every bin midpoint in latent units: where rounding decides
    mid_n = 0.5 * (table[1:] + table[:-1])
    mid = ((mid_n.double() + 3) / 6 * (qmax - qmin) + qmin).float()
    near = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    for inp in (x, near.repeat(50)):
        official = _released_indices(inp, table, qmin, qmax)
        assert torch.equal(q.quantize(inp).long(), official)
    # the float64 integral's table would disagree with the release right there
    assert not torch.equal(_released_indices(near.double(), gaussian_table(64), qmin, qmax), _released_indices(
        near, table, qmin, qmax))


def test_nearest_index_breaks_ties_to_the_lower_index():
    table = torch.tensor([0.0, 1.0, 2.0, 4.0])
    x = torch.tensor([0.5, 1.5, 3.0, -9.0, 9.0, 1.0, 2.9, 3.1])
    assert nearest_index(x, table).tolist() == [0, 1, 2, 0, 3, 1, 2, 3]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shapes_dtypes_and_channel_dim(scheme):
    q = _quantizer(scheme)
    x = torch.randn(2, 4, 3, 5)
    idx = q.quantize(x)
    assert idx.shape == x.shape and idx.dtype == torch.uint8
    assert int(idx.max()) < 64
    y = q.dequantize(idx)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert q.dequantize(idx, dtype=torch.bfloat16).dtype == torch.bfloat16
    tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
    assert torch.equal(q.quantize(tokens, channel_dim=-1), idx.flatten(2).transpose(1, 2))
    assert torch.equal(q.dequantize(idx.flatten(2).transpose(1, 2), channel_dim=-1), y.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("levels", [2, 64, 256])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_idempotent(scheme, levels):
    q = _quantizer(scheme, levels=levels)
    every = torch.arange(levels, dtype=torch.uint8).view(1, 1, -1).expand(3, 4, -1)
    y = q.dequantize(every)
    assert torch.equal(q.quantize(y), every)
    assert torch.equal(q.dequantize(q.quantize(y)), y)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_error_shrinks_with_levels(scheme):
    x = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    mse = []
    for levels in (8, 16, 32, 64):
        q = _quantizer(scheme, levels=levels)
        mse.append(float((q.dequantize(q.quantize(x)) - x).square().mean()))
    assert all(a > b for a, b in zip(mse, mse[1:])), mse


@pytest.mark.parametrize("scheme", SCHEMES)
def test_out_of_range_clamps_to_end_bins(scheme):
    q = _quantizer(scheme, levels=16)
    x = torch.tensor([-1e4, -5.01, -math.inf, 5.01, 1e4, math.inf]).view(1, 1, 6).expand(1, 4, 6)
    idx = q.quantize(x)
    assert (idx[..., :3] == 0).all() and (idx[..., 3:] == 15).all()
    ends = q.dequantize(idx)
    assert (ends >= -5.0).all() and (ends <= 5.0).all()


def test_empirical_bins_are_equal_count_means():
    q = DimensionwiseQuantizer(levels=8, scheme="empirical", channels=3)
    x = torch.randn(2, 3, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    q.calibrate(x)
    samples = np.clip(x.movedim(1, 0).reshape(3, -1).numpy(), -5, 5)  # 128 per channel, 16 per bin
    expected = np.sort(samples, axis=1).reshape(3, 8, 16).mean(axis=2)
    np.testing.assert_allclose(q.values.numpy(), expected, rtol=0, atol=1e-6)


def test_empirical_ties_stay_strictly_increasing():
    q = DimensionwiseQuantizer(levels=16, scheme="empirical", channels=2)
    q.calibrate(torch.zeros(4, 2, 8, 8))
    assert (q.values.diff(dim=1) > 0).all()
    every = torch.arange(16, dtype=torch.uint8).view(1, 1, 16).expand(1, 2, 16)
    assert torch.equal(q.quantize(q.dequantize(every)), every)


def test_empirical_state_round_trip():
    q = _quantizer("empirical", channels=4, seed=5)
    fresh = DimensionwiseQuantizer(levels=64, scheme="empirical", channels=4)
    with pytest.raises(RuntimeError, match="not calibrated"):
        fresh.quantize(torch.zeros(1, 4))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 4, 8, 8) * 1.5
    assert torch.equal(fresh.quantize(x), q.quantize(x))
    assert torch.equal(fresh.dequantize(q.quantize(x)), q.dequantize(q.quantize(x)))


def test_empirical_errors():
    with pytest.raises(ValueError, match="needs channels"):
        DimensionwiseQuantizer(scheme="empirical")
    q = DimensionwiseQuantizer(levels=8, scheme="empirical", channels=4)
    with pytest.raises(ValueError, match="channels"):
        q.calibrate(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 8 samples"):
        q.calibrate(torch.randn(1, 4, 2, 2))
    q.calibrate(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="expects 4 channels"):
        q.quantize(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="only for scheme 'empirical'"):
        DimensionwiseQuantizer().calibrate(torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_low_and_high_precision_inputs(scheme, dtype):
    q = _quantizer(scheme)
    x = torch.randn(2, 4, 8, 8).to(dtype)
    assert torch.equal(q.quantize(x), q.quantize(x.double()))


def test_table_stays_float32_under_module_casts():
    q = _quantizer("empirical")
    before = q.values.clone()
    q.bfloat16()
    assert q.values.dtype == torch.float32 and torch.equal(q.values, before)
    q.half().to(torch.float64)
    assert torch.equal(q.values, before)


def test_meta_build_then_materialize():
    with torch.device("meta"):
        q = DimensionwiseQuantizer(levels=32)
    assert q.values.is_meta
    q.to_empty(device="cpu")
    q.reset_parameters()
    assert torch.equal(q.values, DimensionwiseQuantizer(levels=32).values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"levels": 1}, "levels must be an integer in 2..256"),
        ({"levels": 257}, "levels must be an integer in 2..256"),
        ({"levels": 8.0}, "levels must be an integer in 2..256"),
        ({"qmin": 1.0, "qmax": 1.0}, "qmin < qmax"),
        ({"scheme": "lloyd"}, "scheme must be one of"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        DimensionwiseQuantizer(**kwargs)


def test_from_config():
    q = DimensionwiseQuantizer.from_config(QuantizerConfig(levels=16, scheme="uniform"))
    torch.testing.assert_close(q.values[0], torch.linspace(-5 + 10 / 32, 5 - 10 / 32, 16))
