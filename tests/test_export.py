"""tb-export: EMA/raw weights of a 2-rank ZeRO-3 run → one safetensors file loadable without tb_train."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tb_core.config import from_dict
from tb_model.config import ModelConfig
from tb_model.registry import create
from tb_model.tokenbridge import TokenBridge
from tb_train.engine.ema import consolidate
from tb_train.engine.export import main
from tb_train.engine.rng import MODEL_SEED_STREAM, derive_seed


def _plain_load(path) -> torch.nn.Module:
    """What a user without tb_train does: safetensors + the JSON config + tb_model.registry.create."""
    cfg = from_dict(ModelConfig, json.loads(path.with_suffix(".json").read_text()))
    model = create(cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


@pytest.mark.slow
@pytest.mark.distributed
def test_export_ema_and_raw(train_setup, tmp_path):
    ref = train_setup.reference
    assert main([str(ref), "--out", str(tmp_path / "ema.safetensors")]) == 0
    assert main([str(ref / "checkpoints"), "--raw", "--out", str(tmp_path / "raw.safetensors")]) == 0
    ema_model, raw_model = _plain_load(tmp_path / "ema.safetensors"), _plain_load(tmp_path / "raw.safetensors")
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["weights"] == "ema" and meta["step"] == "10"

    ckpt = ref / "checkpoints" / "step_00000010"
    pieces = [torch.load(f, weights_only=False)["ema"] for f in sorted(ckpt.glob("train_state_rank*.pt"))]
    ema = consolidate(pieces)
    ema_sd, raw_sd = ema_model.state_dict(), raw_model.state_dict()
    assert set(ema) == {n for n, _ in ema_model.named_parameters()}
    assert all(torch.equal(ema_sd[k], v) for k, v in ema.items())
    torch.manual_seed(derive_seed(0, 0, MODEL_SEED_STREAM, 0))
    init = create(ema_model.config).state_dict()
    moved_raw = sum((raw_sd[k] - init[k]).abs().sum() for k in ema)
    moved_ema = sum((ema_sd[k] - init[k]).abs().sum() for k in ema)
    assert 0 < moved_ema < 0.01 * moved_raw             # decay 0.9999 over 10 steps stays near the init
    assert torch.equal(ema_sd["quantizer.values"], init["quantizer.values"])

    model = TokenBridge.from_pretrained(tmp_path / "ema.safetensors")
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in ema_sd.items())
    latents = model.generate(torch.tensor([0, 1]), num_iter=2, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint found" in err and err.startswith("tb-export: error:")
