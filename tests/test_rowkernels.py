"""tb_model.gemv: the few-row product kernel of the AR head's sampling step, built on first use."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tb_model import gemv


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    assert gemv.available(), gemv.unavailable_reason()  # x86-64 with AVX2 and a C compiler (CI has both)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n_out,n_in", [(3072, 1024), (1024, 4096), (7, 37), (5, 3)])
@pytest.mark.parametrize("gelu", [False, True])
def test_equals_float64_linear(rows: int, n_out: int, n_in: int, gelu: bool) -> None:
    """Every row, the 4-row blocks and the tails of both dimensions (out % 4, in % 16), bias + exact GELU:
    within fp32 rounding of the float64 result (relative 1e-6 of the sum of |w x|)."""
    g = torch.Generator().manual_seed(n_out * n_in + rows)
    x, w, b = (torch.randn(*s, generator=g) for s in ((rows, n_in), (n_out, n_in), (n_out,)))
    got = gemv.linear(x, w, b, gelu)
    ref = F.linear(x.double(), w.double(), b.double())
    ref = F.gelu(ref) if gelu else ref
    scale = F.linear(x.double().abs(), w.double().abs()) + b.double().abs()
    assert got.shape == (rows, n_out) and got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= 1e-6 * scale + 1e-6).all()
    assert not torch.equal(got, gemv.linear(x, w, b, not gelu))  # the flag does something


def test_without_bias_and_from_views() -> None:
    """No bias, and non-contiguous inputs: made contiguous, never read with the wrong strides."""
    x, w = torch.randn(2, 64), torch.randn(64, 40)
    xs, ws = x[:, ::2], w.t()[:, :32]  # [2, 32] and [40, 32], both strided
    assert not xs.is_contiguous() and not ws.is_contiguous()
    torch.testing.assert_close(gemv.linear(xs, ws), F.linear(xs, ws), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_one_line_errors() -> None:
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"gemv.linear: want .*got \(1, 16\).*\(8, 17\)"):
        gemv.linear(x, torch.randn(8, 17))
    with pytest.raises(ValueError, match="bias"):
        gemv.linear(x, w, torch.randn(9))
    with pytest.raises(ValueError, match="float64"):
        gemv.linear(x.double(), w)


def test_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library is built into $TB_KERNEL_CACHE under a name keyed by source, flags and compiler, and
    a second call finds it instead of rebuilding; no temporary file is left. A missing compiler is one
    line naming it."""
    monkeypatch.setenv(gemv.CACHE_ENV, str(tmp_path))
    path = gemv._build()
    assert path.parent == tmp_path and path.name.startswith("tb_gemv_") and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert gemv._build() == path and path.stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler .*no-such-cc"):
        gemv._build()
