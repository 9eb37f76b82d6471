"""The frozen KL-VAE between images and continuous latents: load, encode, sample, decode.

The paper's VAE is MAR's LDM-style KL-16 (`kl16.ckpt`, weights under "model"). diffusers'
`AutoencoderKL` expresses it exactly (`kl16_config()`), so we run it through diffusers and convert the
LDM keys (`convert_ldm_vae_state_dict`). Other VAEs (e.g. Stable Diffusion's, 4 channels, f8) load
from a diffusers folder or a `.safetensors` file with its config. Loading is strict: every weight in
the file must be used and every parameter filled, and nothing is ever downloaded — a wrong file is a
one-line `InputError` naming the file and the offending keys.

Latent convention (docs/vae.md): `encode` returns posterior moments (mean ‖ logvar); a latent is a
posterior sample times `scale` (0.2325 for KL-16, no mean shift); `decode` divides by `scale` first.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from tb_core.errors import InputError
from tb_core.fileio import sha256_files
from tb_core.paths import resolve_path

KL16_SCALE = 0.2325
LDM_SUFFIXES = (".ckpt", ".pt", ".pth")
_SHOWN_KEYS = 5


@dataclass
class VAEConfig:
    """Where the VAE weights are and how to read them.

    path: a `kl16.ckpt`-style LDM checkpoint (.ckpt/.pt/.pth, weights under "model" or "state_dict"),
      a diffusers folder (config.json + weights), or a `.safetensors` file whose AutoencoderKL config
      is JSON in the metadata key "config" or in a sidecar `<stem>.json`.
    arch: "auto" picks by path kind; "kl16" forces the KL-16 architecture (LDM or diffusers keys);
      "diffusers" requires a folder or a safetensors file with a config.
    scale: latent scale factor; None takes 0.2325 for KL-16 and `scaling_factor` from the config otherwise.
    """

    path: str
    arch: Literal["auto", "kl16", "diffusers"] = "auto"
    scale: float | None = None


def kl16_config() -> dict:
    """diffusers `AutoencoderKL` kwargs that rebuild the paper's KL-16 exactly (66,456,019 params).

    ch 128, ch_mult (1,1,2,2,4), 2 res-blocks per level, 16 latent channels, f16; the encoder's last
    level (16×16 at 256px) has attention, the decoder has attention only in its mid block.
    """
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 128, 256, 256, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * 5,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=256,
        scaling_factor=KL16_SCALE,
        force_upcast=False,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )


_LDM_BLOCK_ATTN = re.compile(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_LDM_TO_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _is_ldm_layout(sd: dict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd)


def _squeeze_to(src: Tensor, ndim: int, key: str) -> Tensor:
    """Drop trailing singleton dims (1×1 conv → linear); a non-singleton one means a wrong file."""
    if src.ndim == ndim:
        return src
    if any(s != 1 for s in src.shape[ndim:]):
        raise InputError(f"key '{key}' has shape {tuple(src.shape)}, expected a 1x1 conv kernel")
    return src.reshape(src.shape[:ndim])


def convert_ldm_vae_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """LDM-layout VAE weights (`encoder.down.0.block.0.conv1.weight`, …) → diffusers AutoencoderKL keys.

    Uses diffusers' own `convert_ldm_vae_checkpoint` for the name rules, and maps by hand what it
    leaves under LDM names: attention inside encoder down blocks (KL-16's `encoder.down.4.attn.*`),
    with 1×1 conv weights squeezed to linear. `loss.*` (the training discriminator) is dropped. Any
    other key the rules do not consume is returned under its own name, so a strict load reports it.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    keys = list(sd)
    down = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.(\d+)\.", k))}
    up = {int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up\.(\d+)\.", k))}
    layout = {"down_block_types": [None] * (max(down, default=-1) + 1),
              "up_block_types": [None] * (max(up, default=-1) + 1)}
    # Run diffusers' rules on tiny marker tensors (same ndim, value = source index) to learn the name
    # map and which sources it squeezes; then move the real tensors. This also finds keys it drops.
    markers = {k: torch.full((1,) * sd[k].ndim, float(i), dtype=torch.float64) for i, k in enumerate(keys)}
    mapped = convert_ldm_vae_checkpoint(markers, layout)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for new_key, marker in mapped.items():
        src_key = keys[int(marker.reshape(-1)[0].item())]
        used.add(src_key)
        match = _LDM_BLOCK_ATTN.match(new_key)
        if match:
            i, j, part, kind = match.groups()
            new_key = f"encoder.down_blocks.{i}.attentions.{j}.{_LDM_TO_DIFFUSERS_ATTN[part]}.{kind}"
            ndim = 2 if kind == "weight" and part != "norm" else 1
        else:
            ndim = marker.ndim
        out[new_key] = _squeeze_to(sd[src_key], ndim, src_key)
    for k in keys:
        if k not in used:
            out[k] = sd[k]
    return out


def _first(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _strict_load(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Fill every parameter of a meta-device `model` from `sd`, using every entry of `sd`, or raise."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise InputError(f"{source}: weights do not fit the VAE architecture: " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise InputError(f"{source}: {len(wrong)} keys have the wrong shape (file vs model): {_first(wrong)}")
    model.load_state_dict(sd, strict=True, assign=True)


@functools.lru_cache(maxsize=16)
def _cached_hash(files: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    """`stamps` (size, mtime_ns per file) is only part of the cache key: a rewritten file is rehashed."""
    return sha256_files(list(files))


def weights_identity(files: list[str]) -> str:
    """sha256 of the weight file(s); cached per (path, size, mtime) so a process hashes a file once."""
    files_t = tuple(os.path.realpath(f) for f in files)
    stamps = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, files_t))
    return _cached_hash(files_t, stamps)


class LatentVAE(nn.Module):
    """A frozen diffusers `AutoencoderKL` with the project's latent convention.

    Attributes: `scale` (latent = posterior sample × scale), `latent_channels` (C),
    `downsample` (image side / latent side), `identity` (sha256 of the weight files, computed on
    first use). Outputs are float32 whatever the model dtype.
    """

    def __init__(self, model: nn.Module, scale: float, weight_files: list[str]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scale = float(scale)
        self.latent_channels = int(model.config.latent_channels)
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)
        self.weight_files = list(weight_files)

    @functools.cached_property
    def identity(self) -> str:
        return weights_identity(self.weight_files)

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] → moments [B, 2C, H/f, W/f]: mean ‖ logvar (clamped to [-30, 20])."""
        p = self._param()
        dist = self.model.encode(images.to(p.device, p.dtype)).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1).float()

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """moments [B, 2C, h, w] → scaled posterior sample [B, C, h, w]."""
        return sample_latents(moments, self.scale, generator)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """scaled latents [B, C, h, w] → images [B, 3, h·f, w·f] in about [-1, 1]."""
        p = self._param()
        return self.model.decode(latents.to(p.device, p.dtype) / self.scale).sample.float()


def sample_latents(moments: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """Posterior sample × scale from moments [B, 2C, h, w] (mean ‖ logvar) → [B, C, h, w].

    The noise is drawn on the generator's device (CPU generators work for GPU moments) so a seed
    gives the same latents on any device; the logvar clamp matches diffusers' posterior.
    """
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
    return (mean + std * eps) * scale


def _build(config: dict, source: str) -> nn.Module:
    """An AutoencoderKL on the meta device (no init cost; every parameter comes from the file)."""
    from diffusers import AutoencoderKL

    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise InputError(f"{source}: config is for {name}, only AutoencoderKL is supported")
    try:
        with torch.device("meta"):
            return AutoencoderKL.from_config(config)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: bad AutoencoderKL config: {str(e).splitlines()[0]}") from None


def _read_ldm_checkpoint(path: Path) -> dict[str, Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot read as a torch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not sd:
        raise InputError(f"{path}: no tensors found (expected weights under 'model' or 'state_dict')")
    return sd


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: cannot read safetensors: {e}") from None
    return sd, metadata


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read config JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: config JSON must be an object")
    return data


def _safetensors_config(path: Path, metadata: dict) -> dict | None:
    if "config" in metadata:
        try:
            return json.loads(metadata["config"])
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: metadata 'config' is not valid JSON: {e}") from None
    sidecar = path.with_suffix(".json")
    return _read_json(sidecar) if sidecar.is_file() else None


def _folder_weights(folder: Path) -> list[Path]:
    """The weight file(s) of a diffusers folder: the shards of an index, or its one weight file."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(folder.glob(pattern))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise InputError(f"{folder}: several weight files ({names}); keep one")
        if found:
            return found
    raise InputError(f"{folder}: no weight file (*.safetensors or *.bin)")


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], dict, list[Path]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = " (a pipeline folder? point to its vae/ subfolder)" if (folder / "vae" / "config.json").is_file() else ""
        raise InputError(f"{folder}: no config.json{hint}")
    files = _folder_weights(folder)
    sd: dict[str, Tensor] = {}
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: weight file named in the index is missing")
        part = _read_safetensors(f)[0] if f.suffix == ".safetensors" else _read_ldm_checkpoint(f)
        sd.update(part)
    return sd, _read_json(config_path), files


def load_vae(cfg: VAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentVAE:
    """Build the VAE named by `cfg` from local files only, strictly (see the module docstring)."""
    path = resolve_path(cfg.path)
    if not path.exists():
        raise InputError(f"{path}: VAE weights not found (a local path is required; nothing is downloaded)")
    if cfg.arch not in ("auto", "kl16", "diffusers"):
        raise InputError(f"{path}: unknown arch {cfg.arch!r} (auto, kl16 or diffusers)")
    if path.is_dir():
        if cfg.arch == "kl16":
            raise InputError(f"{path}: arch 'kl16' needs a weight file, got a folder (use arch 'diffusers')")
        sd, config, files = _read_folder(path)
        is_kl16 = False
    elif path.suffix == ".safetensors":
        sd, metadata = _read_safetensors(path)
        is_kl16 = cfg.arch == "kl16"
        config = kl16_config() if is_kl16 else _safetensors_config(path, metadata)
        if config is None:
            raise InputError(
                f"{path}: no AutoencoderKL config (metadata 'config' or sidecar {path.with_suffix('.json').name});"
                " set arch 'kl16' if these are KL-16 weights")
        files = [path]
    elif path.suffix in LDM_SUFFIXES:
        if cfg.arch == "diffusers":
            raise InputError(f"{path}: arch 'diffusers' needs a folder or a .safetensors file")
        sd, config, files, is_kl16 = _read_ldm_checkpoint(path), kl16_config(), [path], True
    else:
        raise InputError(f"{path}: unknown VAE file type (want .ckpt/.pt/.pth, .safetensors, or a folder)")

    if _is_ldm_layout(sd):
        sd = convert_ldm_vae_state_dict(sd)
    if is_kl16:
        _check_kl16_channels(sd, path)
    model = _build(config, str(path))
    _strict_load(model, {k: v.to(dtype) for k, v in sd.items()}, str(path))
    scale = cfg.scale if cfg.scale is not None else (KL16_SCALE if is_kl16 else model.config.scaling_factor)
    return LatentVAE(model, scale, [str(f) for f in files]).to(device)


def _check_kl16_channels(sd: dict[str, Tensor], path: Path) -> None:
    """Name the real cause when a checkpoint for another VAE is read as KL-16."""
    w = sd.get("quant_conv.weight")
    if w is not None and w.shape[0] != 2 * 16:
        raise InputError(
            f"{path}: checkpoint has {w.shape[0] // 2} latent channels, KL-16 has 16"
            " (give a diffusers folder or a .safetensors file with its config)")
