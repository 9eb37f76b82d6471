"""TokenBridge model: sizes, training loss, masks, label dropout, generation schedule/orders, CFG, overfit,
and the exported weights file (`from_pretrained`)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from tb_core.config import load_config
from tb_core.errors import ConfigError, InputError
from tb_model.config import ModelConfig, resolve
from tb_model.mar import MAR, truncnorm_mask_ratio, truncnorm_mean_ratio
from tb_model.registry import count_params, create
from tb_model.tokenbridge import TokenBridge, mask_schedule

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(latent_size=4, latent_channels=4, num_classes=10, buffer_size=4)
LN64 = math.log(64)


def _flat_classifiers(model: TokenBridge, favored: int | None = None, margin: float = 30.0) -> TokenBridge:
    """Every head classifier outputs the same logits whatever z: uniform, or `margin` nats in favour of
    class `favored`. Then the loss is known in closed form, independently of MAR and the head trunk."""
    with torch.no_grad():
        for lin in model.head.classifiers:
            lin.weight.zero_()
            lin.bias.zero_()
            if favored is not None:
                lin.bias[favored] = margin
    return model


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights with non-zero adaLN so every part of the head matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_param_counts_L_H_on_meta() -> None:
    # Paper: L 486.9M, H 910.0M. The layout is the authors' (see docs/model.md), so the counts are exact.
    counts = {s: count_params(s)["total"] for s in ("L", "H")}
    assert abs(counts["L"] - 486.9e6) / 486.9e6 < 1e-3 and counts["L"] == 486_889_472
    assert abs(counts["H"] - 910.0e6) / 910.0e6 < 1e-3 and counts["H"] == 910_040_576
    with torch.device("meta"):
        model = create("H")
    assert all(p.is_meta for p in model.parameters())
    assert len(model.checkpoint_block_lists()) == 3
    assert [len(b) for b in model.checkpoint_block_lists()] == [20, 20, 6]


def test_resolve_fills_preset_and_order() -> None:
    cfg = resolve(ModelConfig(size="L"))
    assert (cfg.width, cfg.encoder_depth, cfg.head_width, cfg.head_depth, cfg.buffer_size) == (1024, 16, 1024, 4, 64)
    assert cfg.channel_order == "official_kl16"
    assert resolve(ModelConfig(latent_channels=4)).channel_order == "identity"
    assert resolve(ModelConfig(size="L", width=512)).width == 512
    with pytest.raises(ConfigError, match="model size 'XL' is unknown"):
        resolve(ModelConfig(size="XL"))
    with pytest.raises(ConfigError, match="channel_group 3 must divide"):
        resolve(ModelConfig(channel_group=3))
    with pytest.raises(ConfigError, match="model.num_heads 3 does not divide its width 64"):
        resolve(ModelConfig(num_heads=3))


def test_forward_rejects_wrong_shape() -> None:
    model = create("tiny", **SMALL)
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, 4, 4\]"):
        model(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long))


def test_flops_per_sample_matches_counted_matmuls() -> None:
    model = create("tiny", latent_size=8, latent_channels=4, num_classes=10)
    L, B = 64, 4
    mask = MAR.mask_from_orders(torch.rand(B, L).argsort(1), round(L * truncnorm_mean_ratio(0.7)))
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(B, 4, 8, 8), torch.randint(0, 10, (B,)), mask)["loss"].backward()
    assert counter.get_total_flops() / B == pytest.approx(model.flops_per_sample(), rel=0.03)


def test_tiny_trains_loss_falls() -> None:
    torch.manual_seed(0)
    model = create("tiny", **SMALL)
    x, y = 0.6 * torch.randn(8, 4, 4, 4), torch.randint(0, 10, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        out = model(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    # at init: ln 64 plus the excess of random (xavier) classifier logits over uniform ones
    assert LN64 < losses[0] < LN64 + 0.7
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


@pytest.mark.parametrize("head_type,group", [("ar", 1), ("ar", 2), ("parallel", 1)])
def test_uniform_logits_give_ln_levels_per_channel(head_type: str, group: int) -> None:
    """Uniform logits: every step's CE is ln(levels**group), so the loss in nats PER CHANNEL is ln 64
    whatever the grouping (dividing by steps instead of channels would give 2 ln 64 for group 2), and
    each channel's marginal CE is ln 64 too."""
    torch.manual_seed(0)
    model = _flat_classifiers(create("tiny", head_type=head_type, channel_group=group, **SMALL))
    out = model(0.5 * torch.randn(3, 4, 4, 4), torch.randint(0, 10, (3,)))
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(LN64, abs=1e-5)
    torch.testing.assert_close(out["ce_per_channel"], torch.full((4,), LN64), rtol=0, atol=1e-5)
    lat = model.generate(torch.tensor([1, 2]), num_iter=3, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 4, 4)


def _latents_with_indices(model: TokenBridge, idx: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] whose quantizer indices are exactly `idx` [B, C, h, w]."""
    return model.quantizer.dequantize(idx.to(torch.uint8))


def test_only_masked_positions_count() -> None:
    """Classifiers certain of index 7: positions whose tokens are all 7 cost ~0 nats, any other costs
    ~30. Masking the all-7 positions gives loss ~0; masking half of them and half others gives ~15:
    the loss is the mean over MASKED positions only, whatever the unmasked ones hold."""
    model = _flat_classifiers(create("tiny", **SMALL), favored=7).eval()
    B, L = 2, 16
    sevens = torch.zeros(B, L, dtype=torch.bool)
    sevens[:, :8] = True
    idx = torch.where(sevens[:, None, :], 7, 40).expand(B, 4, L).reshape(B, 4, 4, 4)
    x, y = _latents_with_indices(model, idx), torch.tensor([1, 2])
    out = model(x, y, sevens)
    assert out["loss"].item() < 1e-6 and out["ce_per_channel"].max().item() < 1e-6
    half = torch.zeros(B, L, dtype=torch.bool)
    half[:, 4:12] = True  # 4 all-7 positions, 4 others
    expected = 0.5 * (30.0 + math.log1p(63 * math.exp(-30.0)))  # others: log(e^30 + 63)
    assert model(x, y, half)["loss"].item() == pytest.approx(expected, abs=1e-4)
    assert model(x, y, ~sevens)["loss"].item() == pytest.approx(2 * expected, abs=1e-4)


def test_ce_per_channel_is_in_generation_order_and_averages_to_the_loss() -> None:
    """Channel 2 is the only one holding index 7 at every position; with channel_order [1, 3, 0, 2] it is
    predicted at step 3, so ce_per_channel[3] (not [2]) is ~0; the per-channel CEs average to the loss."""
    model = _flat_classifiers(create("tiny", channel_order=[1, 3, 0, 2], **SMALL), favored=7).eval()
    idx = torch.full((2, 4, 4, 4), 50)
    idx[:, 2] = 7
    mask = MAR.mask_from_orders(torch.rand(2, 16, generator=torch.Generator().manual_seed(0)).argsort(1), 11)
    out = model(_latents_with_indices(model, idx), torch.tensor([3, 4]), mask)
    ce = out["ce_per_channel"]
    assert ce[3].item() < 1e-6 and (ce[:3] > 29.9).all()
    assert out["loss"].item() == pytest.approx(ce.mean().item(), rel=1e-6)


def test_loss_invariant_to_batch_order() -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL)).eval()
    x, y = 0.7 * torch.randn(6, 4, 4, 4), torch.randint(0, 10, (6,))
    mask = MAR.mask_from_orders(torch.rand(6, 16).argsort(1), 12)
    perm = torch.randperm(6)
    a, b = model(x, y, mask), model(x[perm], y[perm], mask[perm])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["ce_per_channel"], b["ce_per_channel"], rtol=1e-5, atol=1e-6)


def test_label_dropout_rate() -> None:
    mar = MAR(16, 4, 32, 1, 1, 4, num_classes=10, buffer_size=2, label_drop=0.1)
    labels = torch.randint(0, 10, (40000,))
    torch.manual_seed(0)
    emb = mar.train().class_embedding(labels)
    dropped = (emb == mar.fake_latent).all(1).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.006)
    assert not bool((mar.eval().class_embedding(labels) == mar.fake_latent).all(1).any())
    fake = mar.class_embedding(torch.full((3,), 10))
    assert bool((fake == mar.fake_latent).all())


def test_mask_ratio_distribution() -> None:
    mar = MAR(256, 4, 32, 1, 1, 4, num_classes=10, buffer_size=2, mask_ratio_min=0.7)
    torch.manual_seed(0)
    counts = torch.tensor([mar.sample_mask_count() for _ in range(2000)], dtype=torch.float64)
    assert int(counts.min()) >= math.ceil(0.7 * 256) and int(counts.max()) <= 256
    assert counts.mean().item() / 256 == pytest.approx(truncnorm_mean_ratio(0.7), abs=0.005)
    # inverse CDF agrees with scipy's truncnorm (MAR's generator)
    stats = pytest.importorskip("scipy.stats")
    u = torch.linspace(0.001, 0.999, 50, dtype=torch.float64)
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).ppf(u.numpy())
    torch.testing.assert_close(truncnorm_mask_ratio(u, 0.7), torch.from_numpy(ref), rtol=0, atol=1e-9)
    orders = mar.sample_orders(5, "cpu")
    assert torch.equal(orders.sort(1).values, torch.arange(256).expand(5, 256))
    mask = MAR.mask_from_orders(orders, 200)
    assert mask.sum(1).tolist() == [200] * 5


def _record_positions(model) -> list:
    """Wrap _sample_at to log the positions (and log-probs) chosen at every generation step."""
    log = []
    inner = model._sample_at

    def spy(z, positions, *args):
        tok, logp = inner(z, positions, *args)
        log.append((positions.clone(), logp.clone()))
        return tok, logp

    model._sample_at = spy
    return log


def _chosen(log: list, order: str) -> list:
    """Positions filled at each step [B, n]; for confidence, the candidates that left the masked set."""
    if order != "confidence":
        return [p for p, _ in log]
    cands = [c for c, _ in log]
    out = []
    for cur, nxt in zip(cands, cands[1:]):
        keep = ~(cur[:, :, None] == nxt[:, None, :]).any(-1)
        out.append(cur[keep].view(cur.shape[0], -1))
    return out + [cands[-1]]


@pytest.mark.parametrize("num_iter", [1, 2, 7, 64, 256])
@pytest.mark.parametrize("order", ["random", "raster", "confidence"])
def test_generate_fills_every_position_once(num_iter: int, order: str) -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL))
    log = _record_positions(model)
    lat = model.generate(torch.tensor([1, 5, 7]), num_iter=num_iter, cfg=1.5, order=order,
                         generator=torch.Generator().manual_seed(num_iter))
    assert lat.shape == (3, 4, 4, 4)
    steps = _chosen(log, order)
    assert len(steps) == min(num_iter, 16)  # steps with nothing to predict are skipped
    assert all(p.shape[1] >= 1 for p in steps)
    positions = torch.cat(steps, dim=1)
    assert positions.shape == (3, 16)
    assert torch.equal(positions.sort(1).values, torch.arange(16).expand(3, 16))
    if order == "raster":
        assert torch.equal(positions, torch.arange(16).expand(3, 16))
    if order == "random":
        assert not torch.equal(positions[0], positions[1])


def test_schedule_matches_mar_cosine() -> None:
    model = create("tiny", **SMALL)
    log = _record_positions(model)
    model.generate(torch.tensor([0]), num_iter=4, generator=torch.Generator().manual_seed(0))
    # L = 16: masked after step s = max(1, min(left - 1, floor(16 cos(pi/2 (s+1)/4)))) -> 14, 11, 6, 0
    assert [p.shape[1] for p, _ in log] == [2, 3, 5, 6]
    assert [n for n, _ in mask_schedule(16, 4)] == [2, 3, 5, 6]
    for L, num_iter in ((16, 1), (16, 7), (16, 40), (256, 64), (256, 256), (256, 300)):
        counts = [n for n, _ in mask_schedule(L, num_iter)]
        assert sum(counts) == L and min(counts) >= 0 and counts[-1] >= 1
        assert sum(c > 0 for c in counts) == min(num_iter, L)


def test_confidence_order_keeps_most_likely_positions() -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL), 0.2)
    log = _record_positions(model)
    model.generate(torch.tensor([2, 3]), num_iter=4, order="confidence", generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(2, 16, dtype=torch.bool)
    for step, (cand, logp) in enumerate(log):
        assert not bool(seen.gather(1, cand).any())  # candidates are exactly the still-masked positions
        assert cand.shape[1] == 16 - int(seen[0].sum())
        n = [2, 3, 5, 6][step]
        top = logp.topk(n, dim=1).indices
        seen.scatter_(1, cand.gather(1, top), True)
    assert bool(seen.all())


def test_temperature_zero_is_deterministic() -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL))
    labels = torch.tensor([1, 2, 3])
    for order in ("raster", "confidence"):
        a = model.generate(labels, num_iter=5, cfg=2.0, temperature=0.0, order=order,
                           generator=torch.Generator().manual_seed(0))
        b = model.generate(labels, num_iter=5, cfg=2.0, temperature=0.0, order=order,
                           generator=torch.Generator().manual_seed(99))
        assert torch.equal(a, b)
    c = model.generate(labels, num_iter=5, temperature=1.0, order="raster", generator=torch.Generator().manual_seed(0))
    d = model.generate(labels, num_iter=5, temperature=1.0, order="raster", generator=torch.Generator().manual_seed(99))
    assert not torch.equal(c, d)


def test_batched_cfg_equals_two_pass() -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL)).eval()
    values = 0.5 * torch.randn(3, 16, 4)
    mask = MAR.mask_from_orders(torch.rand(3, 16).argsort(1), 9)
    labels = torch.tensor([0, 4, 9])
    batched = model.guided_features(values, mask, labels, 3.0)
    two = model.guided_features(values, mask, labels, 3.0, two_pass=True)
    torch.testing.assert_close(batched, two, rtol=1e-5, atol=1e-5)
    cond = model.guided_features(values, mask, labels, None)
    assert not torch.allclose(batched, cond, atol=1e-3)  # guidance does change z


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_fast_generation_equals_official_loop(order: str) -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", **SMALL), 0.2).double()
    labels = torch.tensor([0, 3, 8])
    kw = dict(num_iter=5, cfg=3.0, temperature=0.9, order=order)
    fast = model.generate(labels, generator=torch.Generator().manual_seed(5), **kw)
    ref = model.generate(labels, generator=torch.Generator().manual_seed(5), official=True, **kw)
    assert torch.equal(fast, ref)


class _Ckpt(torch.nn.Module):
    """Stand-in for the engine's activation-checkpoint wrapper: passes positional args through."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        if torch.is_grad_enabled() and self.training:
            return checkpoint(self.inner, *args, use_reentrant=False)
        return self.inner(*args)


def test_blocks_can_be_wrapped_for_activation_checkpointing() -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", dropout=0.0, attn_dropout=0.0, label_drop=0.0, **SMALL))
    x, y = 0.5 * torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    mask = MAR.mask_from_orders(torch.rand(2, 16).argsort(1), 12)
    ref = model(x, y, mask)["loss"]
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for blocks in model.checkpoint_block_lists():
        for i in range(len(blocks)):
            blocks[i] = _Ckpt(blocks[i])
    out = model(x, y, mask)["loss"]
    out.backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g)
    assert model.generate(y, num_iter=2, generator=torch.Generator().manual_seed(0)).shape == (2, 4, 4, 4)


def test_overfit_eight_images_and_regenerate() -> None:
    torch.manual_seed(0)
    model = create("tiny", latent_size=4, latent_channels=4, num_classes=8, dropout=0.0, attn_dropout=0.0,
                   label_drop=0.0, buffer_size=4, mask_ratio_min=0.05)
    x, y = 0.8 * torch.randn(8, 4, 4, 4), torch.arange(8)
    steps = 200
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        loss = model(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        assert model(x, y)["loss"].item() < 0.03
    target = model.quantizer.dequantize(model.quantizer.quantize(x))
    for order in ("random", "raster", "confidence"):
        # one step: every token from the class alone -> all 8 images exactly
        out = model.generate(y, num_iter=1, temperature=0.0, order=order, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, target), order
        # four steps feed generated tokens back; MAR's mask ratios (mostly > 0.7) rarely train the
        # sparse masks of the last steps, so allow a few wrong tokens
        out = model.generate(y, num_iter=4, temperature=0.0, order=order, generator=torch.Generator().manual_seed(0))
        assert (out == target).float().mean().item() > 0.95, order


def test_bf16_model_takes_fp32_latents() -> None:
    torch.manual_seed(0)
    ref = _perturbed(create("tiny", **SMALL)).eval()
    model = create("tiny", **SMALL).eval()
    model.load_state_dict(ref.state_dict())
    model.bfloat16()
    assert model.quantizer.values.dtype == torch.float32  # the table is never rounded to bf16
    x, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    mask = MAR.mask_from_orders(torch.rand(2, 16).argsort(1), 12)
    out = model(x, y, mask)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32  # CE is taken in fp32 on bf16 logits
    assert out["loss"].item() == pytest.approx(ref(x, y, mask)["loss"].item(), rel=0.02)
    lat = model.generate(torch.tensor([1, 2]), num_iter=3, cfg=2.0, order="confidence")
    assert lat.dtype == torch.float32 and lat.shape == (2, 4, 4, 4)
    table = model.quantizer.values[0]
    assert bool(torch.isin(lat, table).all())  # every generated value is a table value


def test_meta_build_then_materialize() -> None:
    with torch.device("meta"):
        model = create("tiny", **SMALL)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = create("tiny", **SMALL)
    torch.testing.assert_close(model.quantizer.values, ref.quantizer.values)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for blk in model.head.blocks:  # adaLN-Zero: every head block starts as the identity
        assert not blk.adaLN_modulation[-1].weight.any()
    mask = MAR.mask_from_orders(torch.rand(2, 16).argsort(1), 12)
    out = model.eval()(0.5 * torch.randn(2, 4, 4, 4), torch.tensor([0, 1]), mask)
    assert LN64 - 0.1 < out["loss"].item() < LN64 + 0.7  # initialised like a fresh model, not left as garbage


# ----------------------------------------------------------------------------- exported weights file
def test_save_and_from_pretrained_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = _perturbed(create("tiny", head_type="ar", channel_order=[3, 1, 0, 2], **SMALL))
    path = model.save_pretrained(tmp_path / "model.safetensors", metadata={"weights": "ema", "step": "7"})
    assert json.loads(path.with_suffix(".json").read_text())["channel_order"] == [3, 1, 0, 2]
    for where in (path, tmp_path):  # the file, or the folder holding model.safetensors
        loaded = TokenBridge.from_pretrained(where)
        assert not loaded.training and loaded.config == model.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    mask = MAR.mask_from_orders(torch.rand(2, 16).argsort(1), 9)
    x, y = 0.5 * torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    assert torch.equal(loaded(x, y, mask)["loss"], model.eval()(x, y, mask)["loss"])
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(loaded.generate(y, num_iter=3, generator=g[0]), model.generate(y, num_iter=3, generator=g[1]))


def test_from_pretrained_reads_the_sidecar_when_metadata_lacks_the_config(tmp_path) -> None:
    model = create("tiny", **SMALL)
    path = model.save_pretrained(tmp_path / "m.safetensors")
    save_file(load_file(str(path)), str(path))  # same tensors, no metadata: config from m.json
    assert TokenBridge.from_pretrained(path).config == model.config
    path.with_suffix(".json").unlink()
    with pytest.raises(InputError, match="no model config") as e:
        TokenBridge.from_pretrained(path)
    assert "\n" not in str(e.value)


def test_from_pretrained_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(InputError, match="exported weights not found"):
        TokenBridge.from_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="model.safetensors"):
        TokenBridge.from_pretrained(tmp_path)
    path = create("tiny", **SMALL).save_pretrained(tmp_path / "a.safetensors")
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputError, match="b.safetensors"):
        TokenBridge.from_pretrained(bad)
    other = create("tiny", latent_size=4, latent_channels=4, num_classes=12, buffer_size=4)
    cfg = json.loads(path.with_suffix(".json").read_text())
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "c.safetensors"),
              metadata={"config": json.dumps(cfg)})  # 12-class weights under a 10-class config
    with pytest.raises(InputError, match="weights do not fit its model config") as e:
        TokenBridge.from_pretrained(tmp_path / "c.safetensors")
    assert "\n" not in str(e.value) and "c.safetensors" in str(e.value)


def test_exported_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        path = create("tiny", **SMALL).save_pretrained(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, path.with_suffix(".json").stat().st_mode & 0o777) == (0o640, 0o640)


_NO_TRAIN = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tb_train", "deepspeed"):
            raise ImportError("refused: " + name)
sys.meta_path.insert(0, Refuse())
import torch
from tb_model.tokenbridge import TokenBridge
model = TokenBridge.from_pretrained(sys.argv[1])
lat = model.generate(torch.tensor([1, 2]), num_iter=2, generator=torch.Generator().manual_seed(0))
print(tuple(lat.shape))
"""


def test_from_pretrained_needs_neither_tb_train_nor_deepspeed(tmp_path) -> None:
    path = create("tiny", **SMALL).save_pretrained(tmp_path / "m.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _NO_TRAIN, str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "(2, 4, 4, 4)"


@pytest.mark.parametrize("name,total", [("tiny", 411_968), ("base", 218_024_704), ("L", 486_889_472),
                                        ("H", 910_040_576)])
def test_model_config_files_load_and_count(name: str, total: int) -> None:
    """configs/model/<size>.yaml are what people copy into jobs: each loads strictly and builds the
    documented size (tiny: the demo's 8x8x4 latents and 10 classes)."""
    cfg = load_config(ModelConfig, ROOT / "configs" / "model" / f"{name}.yaml")
    assert cfg.size == name and count_params(cfg)["total"] == total
