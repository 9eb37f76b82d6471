"""tools/train_demo_vae.py: the latent channel count is an option, and each shipped demo VAE is what it builds."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tb_train.demo.data import DEMO_VAE, demo_vae_path

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("train_demo_vae", ROOT / "tools" / "train_demo_vae.py")
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)
FITTED = {"scaling_factor", "_diffusers_version", "_class_name"}   # set by training / the library, not the builder


@pytest.mark.parametrize("channels", [4, 16])
def test_shipped_asset_is_the_built_architecture(channels):
    folder = demo_vae_path(channels)
    shipped = json.loads((folder / "config.json").read_text())
    built = {k: list(v) if isinstance(v, tuple) else v for k, v in tool.build_demo_vae(channels).config.items()
             if not k.startswith("_")}
    assert shipped["latent_channels"] == channels
    assert {k: v for k, v in shipped.items() if k not in FITTED} == {k: v for k, v in built.items() if k not in FITTED}
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    result = tool.build_demo_vae(channels).load_state_dict(weights, strict=True)  # raises on a shape mismatch
    assert not result.missing_keys and not result.unexpected_keys
    assert weights["encoder.conv_out.weight"].shape[0] == 2 * channels           # mean ‖ logvar


def test_asset_folders_and_bad_channel_count(capsys):
    assert demo_vae_path() == DEMO_VAE == ROOT / "tb_train" / "demo" / "assets" / "demo_vae"
    assert demo_vae_path(16) == DEMO_VAE.with_name("demo_vae16") and demo_vae_path(16).is_dir()
    with pytest.raises(SystemExit) as e:
        tool.main(["--latent-channels", "0"])
    assert e.value.code == 2
    assert "error: --latent-channels must be >= 1, got 0" in capsys.readouterr().err
