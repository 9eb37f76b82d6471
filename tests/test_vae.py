"""VAE loading, conversion and latent convention (tb_model/vae.py).

The KL-16 checks build an independent LDM-layout reference module here (the layout of MAR's
`kl16.ckpt`), randomize every weight, save it as `{"model": state_dict}` and compare our converted
diffusers model against the reference forward on small images (the architecture works at any
multiple of 16, so 64×64 keeps the full-width 66M-parameter model cheap on CPU).
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tb_core.errors import InputError
from tb_model import vae as vae_mod
from tb_model.vae import (
    KL16_SCALE,
    VAEConfig,
    convert_ldm_vae_state_dict,
    kl16_config,
    load_vae,
    sample_latents,
)

KL16_PARAMS = 66_456_019


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class RefResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class RefAttn(nn.Module):
    """Single-head spatial self-attention with 1×1 conv projections (the LDM form)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(n).reshape(b, c, h * w)
        v = self.v(n).reshape(b, c, h * w)
        att = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefMid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = RefResBlock(c, c), RefAttn(c), RefResBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class RefLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, attn: bool):
        super().__init__()
        self.block = nn.ModuleList(RefResBlock(cin if j == 0 else cout, cout) for j in range(blocks))
        self.attn = nn.ModuleList(RefAttn(cout) for _ in range(blocks if attn else 0))

    def forward(self, x):
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
        return x


class RefConv(nn.Module):
    """Holds `.conv` so the keys read `downsample.conv` / `upsample.conv`."""

    def __init__(self, c: int, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=padding)


class RefEncoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), blocks=2, z=16, attn_last=True):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        widths = [ch * m for m in (1,) + tuple(ch_mult)]
        self.down = nn.ModuleList()
        for i in range(len(ch_mult)):
            level = RefLevel(widths[i], widths[i + 1], blocks, attn_last and i == len(ch_mult) - 1)
            if i != len(ch_mult) - 1:
                level.downsample = RefConv(widths[i + 1], stride=2, padding=0)  # after a (0,1,0,1) pad
            self.down.append(level)
        self.mid = RefMid(widths[-1])
        self.norm_out, self.conv_out = _norm(widths[-1]), nn.Conv2d(widths[-1], 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class RefDecoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), blocks=2, z=16):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z, widths[-1], 3, padding=1)
        self.mid = RefMid(widths[-1])
        self.up = nn.ModuleList()
        for i in range(len(ch_mult)):
            cin = widths[min(i + 1, len(widths) - 1)]
            level = RefLevel(cin, widths[i], blocks + 1, attn=False)
            if i != 0:
                level.upsample = RefConv(widths[i])
            self.up.append(level)
        self.norm_out, self.conv_out = _norm(widths[0]), nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefKL(nn.Module):
    """LDM/MAR-style KL autoencoder: reference forward for the converted diffusers model."""

    def __init__(self, z: int = 16):
        super().__init__()
        self.encoder, self.decoder = RefEncoder(z=z), RefDecoder(z=z)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def moments(self, x):
        m = self.quant_conv(self.encoder(x))
        mean, logvar = m.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


@pytest.fixture(scope="module")
def kl16(tmp_path_factory):
    """(reference module, path of its `{"model": sd}` checkpoint) with every weight random."""
    torch.manual_seed(0)
    ref = RefKL().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # GroupNorm affine: away from the 1/0 defaults so a swap shows
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("kl16") / "kl16.ckpt"
    torch.save({"model": ref.state_dict()}, path)
    return ref, path


@pytest.fixture(scope="module")
def kl16_vae(kl16):
    return load_vae(VAEConfig(path=str(kl16[1])))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _shape_only(sd: dict) -> dict:
    """Same keys and shapes, one stored element per tensor: tiny files for the error paths."""
    return {k: torch.zeros(()).expand(v.shape) for k, v in sd.items()}


def test_reference_has_kl16_layout(kl16):
    ref, _ = kl16
    assert sum(p.numel() for p in ref.parameters()) == KL16_PARAMS
    keys = ref.state_dict().keys()
    assert len([k for k in keys if k.startswith("encoder.down.4.attn.")]) == 20
    assert "decoder.up.1.block.0.nin_shortcut.weight" in keys and "encoder.down.3.downsample.conv.weight" in keys


def test_kl16_loads_strictly_and_matches_reference(kl16, kl16_vae, images):
    ref, path = kl16
    vae = kl16_vae
    assert sum(p.numel() for p in vae.parameters()) == KL16_PARAMS
    assert (vae.scale, vae.latent_channels, vae.downsample) == (KL16_SCALE, 16, 16)
    moments = vae.encode(images)
    assert moments.shape == (2, 32, 4, 4) and moments.dtype == torch.float32
    with torch.no_grad():
        mean, logvar = ref.moments(images)
        z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
        ref_images = ref.decode(z)
    torch.testing.assert_close(moments[:, :16], mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(moments[:, 16:], logvar, atol=1e-4, rtol=0)
    decoded = vae.decode(z * KL16_SCALE)
    assert decoded.shape == (2, 3, 64, 64)
    torch.testing.assert_close(decoded, ref_images, atol=1e-3, rtol=0)
    assert vae.identity == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_mapping_is_visible(kl16, images):
    """The tolerances above discriminate: swapping q and k of one encoder attention moves the mean ~5e-2."""
    ref = kl16[0]
    sd = convert_ldm_vae_state_dict(ref.state_dict())
    a = "encoder.down_blocks.4.attentions.0."
    sd[a + "to_q.weight"], sd[a + "to_k.weight"] = sd[a + "to_k.weight"], sd[a + "to_q.weight"]
    model = vae_mod._build(kl16_config(), "swapped")
    model.load_state_dict(sd, assign=True)
    with torch.no_grad():
        swapped = model.encode(images).latent_dist.mean
        mean, _ = ref.moments(images)
    assert (swapped - mean).abs().max() > 1e-2


def test_kl16_ldm_safetensors(kl16, kl16_vae, images, tmp_path):
    """arch kl16 takes a .safetensors file of LDM keys (no config) and gives the same model."""
    from safetensors.torch import save_file

    path = tmp_path / "kl16.safetensors"
    save_file(kl16[0].state_dict(), path)
    vae = load_vae(VAEConfig(path=str(path), arch="kl16"))
    assert vae.scale == KL16_SCALE
    torch.testing.assert_close(vae.encode(images[:1]), kl16_vae.encode(images[:1]), atol=0, rtol=0)


def test_converter_maps_block_attention_and_squeezes():
    sd = _shape_only(RefKL().state_dict())
    out = convert_ldm_vae_state_dict({**sd, "loss.logvar": torch.zeros(())})
    assert len(out) == len(sd)
    assert out["encoder.down_blocks.4.attentions.1.to_out.0.weight"].shape == (512, 512)
    assert out["encoder.down_blocks.4.attentions.1.group_norm.bias"].shape == (512,)
    assert out["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert not any(".down.4.attn" in k or k.startswith("loss.") for k in out)


@pytest.mark.parametrize(
    "edit, expected",
    [
        ("drop", "1 missing keys (encoder.down_blocks.4.attentions.1.to_q.weight)"),
        ("extra", "1 unexpected keys (encoder.extra.weight)"),
        ("shape", "1 keys have the wrong shape (file vs model): post_quant_conv.bias (8,) vs (16,)"),
    ],
)
def test_kl16_mismatch_is_one_line_error(tmp_path, edit, expected):
    sd = _shape_only(RefKL().state_dict())
    if edit == "drop":
        del sd["encoder.down.4.attn.1.q.weight"]
    elif edit == "extra":
        sd["encoder.extra.weight"] = torch.zeros(())
    else:
        sd["post_quant_conv.bias"] = torch.zeros(8)
    path = tmp_path / "bad.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(InputError) as err:
        load_vae(VAEConfig(path=str(path)))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and expected in msg


def test_other_latent_channels_named(tmp_path):
    sd = _shape_only(RefKL(z=4).state_dict())
    path = tmp_path / "sd_vae.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(InputError, match="checkpoint has 4 latent channels, KL-16 has 16"):
        load_vae(VAEConfig(path=str(path)))


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(InputError, match="not found .*nothing is downloaded"):
        load_vae(VAEConfig(path=str(tmp_path / "kl16.ckpt")))
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown VAE file type"):
        load_vae(VAEConfig(path=str(odd)))
    with pytest.raises(InputError, match="arch 'kl16' needs a weight file"):
        load_vae(VAEConfig(path=str(tmp_path), arch="kl16"))
    ckpt = tmp_path / "kl16.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(InputError, match="arch 'diffusers' needs a folder or a .safetensors file"):
        load_vae(VAEConfig(path=str(ckpt), arch="diffusers"))
    with pytest.raises(InputError, match="cannot read as a torch checkpoint"):
        load_vae(VAEConfig(path=str(ckpt)))


def _small_diffusers():
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, scaling_factor=0.5,
    ).eval()


def _check_same(vae, model, images):
    assert (vae.scale, vae.latent_channels, vae.downsample) == (0.5, 4, 2)
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        z = dist.mean
        ref_images = model.decode(z).sample
    torch.testing.assert_close(vae.encode(images), torch.cat([dist.mean, dist.logvar], 1))
    torch.testing.assert_close(vae.decode(z * 0.5), ref_images)


def test_diffusers_folder_round_trip(tmp_path, images):
    model = _small_diffusers()
    model.save_pretrained(tmp_path / "vae")
    vae = load_vae(VAEConfig(path=str(tmp_path / "vae")))
    _check_same(vae, model, images)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae.identity == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert load_vae(VAEConfig(path=str(tmp_path / "vae"), scale=0.25)).scale == 0.25
    double = load_vae(VAEConfig(path=str(tmp_path / "vae")), dtype=torch.float64)
    assert next(double.parameters()).dtype == torch.float64 and double.encode(images).dtype == torch.float32
    torch.testing.assert_close(double.encode(images), vae.encode(images), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="no config.json .*vae/ subfolder"):
        load_vae(VAEConfig(path=str(tmp_path)))


def test_safetensors_round_trip(tmp_path, images):
    from safetensors.torch import save_file

    model = _small_diffusers()
    config = json.dumps(dict(model.config))
    with_meta = tmp_path / "meta.safetensors"
    save_file(model.state_dict(), with_meta, metadata={"config": config})
    _check_same(load_vae(VAEConfig(path=str(with_meta))), model, images)
    bare = tmp_path / "sidecar.safetensors"
    save_file(model.state_dict(), bare)
    with pytest.raises(InputError, match="no AutoencoderKL config .*sidecar.json"):
        load_vae(VAEConfig(path=str(bare)))
    (tmp_path / "sidecar.json").write_text(config)
    _check_same(load_vae(VAEConfig(path=str(bare), arch="diffusers")), model, images)


def test_identity_hashed_once(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights" * 1000)
    calls = []
    real = vae_mod.sha256_files
    monkeypatch.setattr(vae_mod, "sha256_files", lambda files: calls.append(files) or real(files))
    first = vae_mod.weights_identity([str(path)])
    assert vae_mod.weights_identity([str(path)]) == first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(calls) == 1


def test_sample_latents_scaling_and_seed():
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(4, 3, 8, 8, generator=gen)
    logvar = torch.randn(4, 3, 8, 8, generator=gen)
    moments = torch.cat([mean, logvar], 1)
    eps = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    got = sample_latents(moments, 0.2325, torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, (mean + torch.exp(0.5 * logvar) * eps) * 0.2325)
    big = torch.cat([torch.full((1, 1, 64, 64), 2.0), torch.full((1, 1, 64, 64), 100.0)], 1)
    std = (sample_latents(big, 0.5, torch.Generator().manual_seed(1)) / 0.5 - 2.0).std()
    assert abs(std.item() / torch.exp(torch.tensor(10.0)).item() - 1) < 0.05  # logvar clamped at 20


def test_vae_sample_uses_its_scale(kl16_vae):
    moments = torch.randn(1, 32, 2, 2)
    a = kl16_vae.sample(moments, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, sample_latents(moments, KL16_SCALE, torch.Generator().manual_seed(0)))
