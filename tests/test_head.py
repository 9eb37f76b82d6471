"""Dimension-wise AR head: cached == uncached sampling, causality, grouping, sampling law."""
from __future__ import annotations

import pytest
import torch

from tb_model.head import ARHead, ParallelHead, pick_tokens


def _head(cls=ARHead, group: int = 1, channels: int = 6, levels: int = 8, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    head = cls(cond_dim=24, width=32, depth=2, num_heads=4, channels=channels, levels=levels, group=group)
    with torch.no_grad():  # adaLN-Zero starts as identity; perturb so every path matters
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return head.to(dtype).eval()


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_kv_cache_equals_prefix_recomputation(group: int, temperature: float) -> None:
    head = _head(group=group)
    z = torch.randn(200, 24, dtype=torch.float64)
    tok_c, lp_c = head.sample(z, temperature, torch.Generator().manual_seed(3), use_cache=True)
    tok_u, lp_u = head.sample(z, temperature, torch.Generator().manual_seed(3), use_cache=False)
    assert tok_c.shape == (200, 6) and tok_c.dtype == torch.long
    assert torch.equal(tok_c, tok_u)
    torch.testing.assert_close(lp_c, lp_u, rtol=0, atol=1e-10)
    # other random numbers -> other tokens (the test can fail if the generator were ignored)
    if temperature > 0:
        tok_o, _ = head.sample(z, temperature, torch.Generator().manual_seed(4))
        assert not torch.equal(tok_c, tok_o)


def test_kv_cache_float32_matches() -> None:
    head = _head(dtype=torch.float32)
    z = torch.randn(256, 24)
    a, _ = head.sample(z, 1.0, torch.Generator().manual_seed(0), use_cache=True)
    b, _ = head.sample(z, 1.0, torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)


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
