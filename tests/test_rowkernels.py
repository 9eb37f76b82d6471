"""tb_model.rowkernels: the AR head's cached sampling loop at one or two rows in C, built on first use."""
from __future__ import annotations

import os

import pytest
import torch

from tb_model import rowkernels
from tb_model.head import ARHead, step_kernel

FP32_LOGP = 1e-5  # as in tests/test_head.py: a few fp32 ulps of the summed log-probs


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    assert rowkernels.available(), rowkernels.unavailable_reason()  # x86-64 with AVX2 and a C compiler (CI has both)


def _odd_head() -> ARHead:
    """Sizes that leave tails everywhere: width 30 (not a multiple of 8), 3 heads of 10, hidden 75, 7
    classes, 5 steps; perturbed so that every path matters."""
    torch.manual_seed(0)
    head = ARHead(cond_dim=12, width=30, depth=2, num_heads=3, channels=5, levels=7, mlp_ratio=2.5)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return head.eval()


def _torch_step(head: ARHead):
    return lambda *args: head.sample_step(*args)  # not `sample_step` itself: the torch ops on plain weights


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_loop_equals_the_torch_step_at_odd_sizes(rows: int, temperature: float) -> None:
    """The C loop and the torch step on the same uniforms: the same tokens, log-probs within FP32_LOGP,
    the same keys and values in the cache (what the next step reads)."""
    head = _odd_head()
    z = torch.randn(rows, 12, generator=torch.Generator().manual_seed(rows))
    u = torch.rand(rows, head.steps, generator=torch.Generator().manual_seed(7))
    assert step_kernel(z) == "rows"
    tok, lp = head.sample(z, temperature, uniforms=u)
    ref_tok, ref_lp = head.sample(z, temperature, uniforms=u, step=_torch_step(head))
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=FP32_LOGP)
    assert len(set(tok.flatten().tolist())) > 2  # varied tokens, so equality says something
    caches = []
    with torch.inference_mode():
        cond = head.cond_proj(z)
        for kernel in ("rows", "linear"):
            weights = head.sampling_weights(kernel)
            state = head._sampling_state(cond, weights)
            x = cond + head.pos_embed[0, 0]
            for s in range(head.steps):  # one step per call: with the rows kernel the C loop runs one step
                if s:
                    x = head.token_embed[s - 1](picked) + head.pos_embed[0, s]
                picked, _ = head.sample_step(x, s, weights, state, u[:, s].contiguous(), temperature)
                assert torch.equal(picked, ref_tok[:, s]), (kernel, s)
            caches.append(state.caches)
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-5, atol=1e-5)
    assert caches[0].abs().sum() > 0


def test_sampling_law_of_the_c_pick() -> None:
    """The C pick is the inverse CDF of softmax(logits / T): over many uniforms the class frequencies of
    one position match the head's own probabilities (a wrong CDF or temperature would miss)."""
    head = _odd_head()
    z = torch.randn(1, 12)
    n = 4000
    u = torch.rand(n, head.steps, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(7)
    with torch.inference_mode():
        for i in range(n):
            tok, _ = head.sample(z, 0.7, uniforms=u[i:i + 1])
            counts[head.group_tokens(tok)[0, 0]] += 1
        logits = head(z, torch.zeros(1, 5, dtype=torch.long))[0, 0]  # step 0 sees no token
    expected = torch.softmax(logits / 0.7, -1) * n
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 5).all(), (counts, expected)


def test_bad_inputs_are_one_line_errors() -> None:
    head = _odd_head()
    loop = head.sampling_weights("rows").rows
    state = head._sampling_state(head.cond_proj(torch.randn(1, 12)), head.sampling_weights("rows"))
    picked, logp, u = torch.zeros(1, 5, dtype=torch.long), torch.zeros(1), torch.rand(1, 5)
    x = torch.randn(1, 30)
    with pytest.raises(ValueError, match=r"rowkernels: x must be a contiguous CPU float32 \[1, 30\], got \[1, 30\] "
                                         r"torch.float64"):
        loop(x.double(), 0, 5, state.mods, state.caches, u, 1.0, picked, logp, 1e-6)
    with pytest.raises(ValueError, match=r"uniforms must be .*\[1, 5\], got \[1, 4\]"):
        loop(x, 0, 5, state.mods, state.caches, u[:, :4], 1.0, picked, logp, 1e-6)
    with pytest.raises(ValueError, match=r"steps 3..5 of 5"):
        loop(x, 3, 6, state.mods, state.caches, u, 1.0, picked, logp, 1e-6)
    with pytest.raises(ValueError, match=r"block 0 tensor 2 must be .*\[90, 30\]"):
        rowkernels.HeadLoop([[t.t().contiguous() if i == 2 else t for i, t in enumerate(b)] for b in loop.tensors[:-1]],
                            loop.tensors[-1][:2], loop.tensors[-1][2:], loop.embeds, loop.pos_embed, 3)


def test_unavailable_falls_back_to_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot be built or run, one row samples on oneDNN (packed for one row), two on
    the default packing, and the reason is one line."""
    monkeypatch.setattr(rowkernels, "_state", {"lib": None, "reason": "CPU lacks avx2"})
    assert not rowkernels.available() and rowkernels.unavailable_reason() == "CPU lacks avx2"
    assert step_kernel(torch.zeros(1, 30)) == "onednn_rows1" and step_kernel(torch.zeros(2, 30)) == "onednn"
    head = _odd_head()
    tok, _ = head.sample(torch.randn(1, 12), 1.0, torch.Generator().manual_seed(0))
    assert tok.shape == (1, 5)


def test_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library is built into $TB_KERNEL_CACHE under a name keyed by source, flags and compiler, and
    a second call finds it instead of rebuilding; no temporary file is left. A missing compiler is one
    line naming it."""
    monkeypatch.setenv(rowkernels.CACHE_ENV, str(tmp_path))
    path = rowkernels._build()
    assert path.parent == tmp_path and path.name.startswith("tb_rowkernels_") and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert rowkernels._build() == path and path.stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler .*no-such-cc"):
        rowkernels._build()
