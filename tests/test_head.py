"""Dimension-wise AR head: cached == uncached sampling, causality, grouping, sampling law."""
from __future__ import annotations

import pytest
import torch

from tb_model import rowkernels
from tb_model.head import ARHead, ParallelHead, pick_tokens, step_kernel


FP32_LOGP = 1e-5  # summed log-prob agreement of two fp32 sampling loops (rounding only)


def _head(cls=ARHead, group: int = 1, channels: int = 6, levels: int = 8, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    head = cls(cond_dim=24, width=32, depth=2, num_heads=4, channels=channels, levels=levels, group=group)
    with torch.no_grad():  # adaLN-Zero starts as identity; perturb so every path matters
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return head.to(dtype).eval()


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("batch", [1, 200])
def test_kv_cache_equals_prefix_recomputation(group: int, temperature: float, batch: int) -> None:
    head = _head(group=group)
    z = torch.randn(batch, 24, dtype=torch.float64)
    tok_c, lp_c = head.sample(z, temperature, torch.Generator().manual_seed(3), use_cache=True)
    tok_u, lp_u = head.sample(z, temperature, torch.Generator().manual_seed(3), use_cache=False)
    assert tok_c.shape == (batch, 6) and tok_c.dtype == torch.long
    assert torch.equal(tok_c, tok_u)
    torch.testing.assert_close(lp_c, lp_u, rtol=0, atol=1e-10)
    # other random numbers -> other tokens (the test can fail if the generator were ignored)
    if temperature > 0 and batch > 1:
        tok_o, _ = head.sample(z, temperature, torch.Generator().manual_seed(4))
        assert not torch.equal(tok_c, tok_o)


def _plain_step(head: ARHead):
    """A step function that is not `head.sample_step` itself: `sample` then gives it the plain (unpacked)
    weights, as it does a compiled step."""
    return lambda *args: head.sample_step(*args)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("batch,kernel", [(1, "rows"), (2, "rows"), (1, "onednn_rows1"), (256, "onednn")])
def test_fused_step_float32_equals_prefix_recomputation(group: int, temperature: float, batch: int, kernel: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 (the CPU sampling precision): the fused cached step on each CPU kernel (tb_model.rowkernels'
    C block at 1-2 rows, oneDNN packed for one row where it is off, oneDNN's default packing), the same step
    on plain weights (kernel `linear`) and the released prefix-recompute loop pick the same tokens from
    the same uniforms. The summed log-probs agree to FP32_LOGP (a few fp32 ulps of logits of magnitude
    ~10-30, summed over 6 steps); the cached loop before the fusion differed from the prefix loop by up
    to 5.7e-6 here too, and in float64 both agree to 1e-10 (test above)."""
    if kernel == "onednn_rows1":
        monkeypatch.setattr(rowkernels, "MAX_ROWS", 0)
    head = _head(group=group, dtype=torch.float32)
    z = torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
    assert step_kernel(z) == kernel  # rows, device and dtype decide
    runs = {name: head.sample(z, temperature, torch.Generator().manual_seed(0), use_cache=cache, step=step)
            for name, cache, step in ((kernel, True, None), ("linear", True, _plain_step(head)),
                                      ("prefix", False, None))}
    tok, lp = runs["prefix"]
    assert tok.shape == (batch, 6)
    for name in (kernel, "linear"):
        assert torch.equal(runs[name][0], tok), name
        torch.testing.assert_close(runs[name][1], lp, rtol=0, atol=FP32_LOGP, msg=name)
    if batch > 2:
        assert len(torch.unique(tok, dim=0)) > batch // 2  # varied tokens, so equality says something


def test_step_kernel_follows_rows_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU float32: tb_model.rowkernels on the parameters themselves at 1-2 rows (no copy), oneDNN-packed
    weights from 3 rows (or for one row where it is off); float64, or a step that is not `sample_step`
    (a compiled one), gets the parameters and F.linear. One set of weights per kernel, kept."""
    assert rowkernels.available(), rowkernels.unavailable_reason()  # x86-64 with AVX2 and a C compiler (CI has both)
    head = _head(dtype=torch.float32)
    z = torch.randn(4, 24)
    assert [step_kernel(torch.zeros(n, 32)) for n in (1, 2, 3, 64)] == ["rows", "rows", "onednn", "onednn"]
    assert step_kernel(torch.zeros(1, 32, dtype=torch.float64)) == "linear"
    from tb_model.head import _SAMPLING_WEIGHTS
    head.sample(z)
    head.sample(z[:1])
    head.sample(z, step=_plain_step(head))
    assert set(_SAMPLING_WEIGHTS[head][1]) == {"onednn", "rows", "linear"}
    qkv = head.blocks[0].attn.qkv.weight
    assert head.sampling_weights("onednn").blocks[0].qkv[0].is_mkldnn
    for kernel in ("rows", "linear"):
        w = head.sampling_weights(kernel).blocks[0].qkv[0]
        assert not w.is_mkldnn and w.data_ptr() == qkv.data_ptr()
    monkeypatch.setattr(rowkernels, "MAX_ROWS", 0)
    head.sample(z[:1])
    assert head.sampling_weights("onednn_rows1").blocks[0].fc1[0].is_mkldnn
    assert "onednn_rows1" in _SAMPLING_WEIGHTS[head][1]
    mod_rows = torch.cat([head.blocks[0].adaLN_modulation[-1].weight, head.blocks[1].adaLN_modulation[-1].weight,
                          head.final.adaLN_modulation[-1].weight])
    assert torch.equal(head.sampling_weights("linear").mod[0], mod_rows)  # blocks 0, 1, the final one: one GEMM
    with pytest.raises(ValueError, match="sampling kernel 'mkl'"):
        head.sampling_weights("mkl")


def test_sampling_weights_follow_parameter_changes() -> None:
    """The fused step's derived weights are rebuilt after an in-place update (an optimizer step, an EMA
    swap) and after load_state_dict: the cached loop then matches the prefix loop of the NEW weights.
    Sampling leaves the state dict, deepcopy and parameter names untouched."""
    import copy

    head = _head(dtype=torch.float32)
    z = torch.randn(64, 24)
    names = [k for k, _ in head.state_dict().items()]
    before, _ = head.sample(z, 1.0, torch.Generator().manual_seed(0))
    other = _head(dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for change in ("in_place", "load_state_dict"):
        if change == "in_place":
            with torch.no_grad():
                for p, q in zip(head.parameters(), other.parameters()):
                    p.copy_(q)
        else:
            head.load_state_dict(_head(dtype=torch.float32).state_dict())
        got, lp = head.sample(z, 1.0, torch.Generator().manual_seed(0))
        ref, ref_lp = head.sample(z, 1.0, torch.Generator().manual_seed(0), use_cache=False)
        assert torch.equal(got, ref), change
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=FP32_LOGP)
        assert not torch.equal(got, before) or change == "load_state_dict"
    assert torch.equal(got, before)  # back to the original weights: the original tokens
    assert list(head.state_dict()) == names
    clone = copy.deepcopy(head)
    assert torch.equal(clone.sample(z, 1.0, torch.Generator().manual_seed(0))[0], before)


@pytest.mark.parametrize("cls", [ARHead, ParallelHead])
def test_sampled_logprob_equals_teacher_forced(cls) -> None:
    head = _head(cls)
    z = torch.randn(64, 24, dtype=torch.float64)
    tok, lp = head.sample(z, 0.8, torch.Generator().manual_seed(1))
    logits = head(z, tok)
    ref = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0].sum(1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-10)


def test_causality() -> None:
    head = _head()
    z = torch.randn(8, 24, dtype=torch.float64)
    tok = torch.randint(0, 8, (8, 6))
    base = head(z, tok)
    for j in range(6):
        changed = tok.clone()
        changed[:, j] = (changed[:, j] + 1) % 8
        out = head(z, changed)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1])  # steps <= j never see t_j
        if j < 5:
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])


def test_grouping_roundtrip_and_marginals() -> None:
    head = _head(group=3, channels=6, levels=4)
    assert (head.steps, head.classes) == (2, 64)
    tok = torch.randint(0, 4, (10, 6))
    classes = head.group_tokens(tok)
    assert classes.shape == (10, 2) and int(classes.max()) < 64
    assert torch.equal(head.ungroup_tokens(classes), tok)
    assert int(head.group_tokens(torch.tensor([[1, 2, 3, 0, 0, 1]]))[0, 0]) == 1 * 16 + 2 * 4 + 3
    marg = head.marginal_logprobs(torch.randn(5, 2, 64, dtype=torch.float64))
    assert marg.shape == (5, 6, 4)
    torch.testing.assert_close(marg.exp().sum(-1), torch.ones(5, 6, dtype=torch.float64))


def test_pick_tokens_follows_tempered_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(40000, 4)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.5):
        tok, lp = pick_tokens(logits, u, temperature)
        freq = torch.bincount(tok, minlength=4).double() / tok.numel()
        want = torch.softmax(logits[0].double() / temperature, -1)
        assert (freq - want).abs().max() < 0.01
        torch.testing.assert_close(lp, torch.log_softmax(logits[0], -1)[tok])
    tok, _ = pick_tokens(logits, u, 0.0)
    assert bool((tok == 2).all())


def test_bad_group_rejected() -> None:
    with pytest.raises(ValueError, match="channel_group 3 must divide"):
        ARHead(8, 8, 1, 2, channels=4, levels=4, group=3)
