"""Ablation rows of tb-demo --ablations: (a) on the demo VAE, and the verdict logic of the generative rows."""
from __future__ import annotations

import pytest
import torch

from tb_model.quantizer import QuantizerConfig
from tb_model.vae import VAEConfig, load_vae
from tb_train.demo import ablations as ab
from tb_train.demo.data import DEMO_VAE
from tb_train.demo.digits import load_digit_extractor, real_images


@pytest.fixture(scope="module")
def recon_rows():
    vae = load_vae(VAEConfig(path=str(DEMO_VAE)))
    images = real_images("test")[0][:80]
    calibration = ab.encode_means(vae, real_images("train")[0][:300])
    return ab.reconstruction_rows(vae, load_digit_extractor(), images, calibration)


@pytest.mark.slow
def test_a_error_falls_monotonically_with_levels(recon_rows):
    sweep = [r for r in recon_rows if r.scheme == "gaussian" and r.range_sigma == 5.0]
    assert [r.levels for r in sweep] == [4, 8, 16, 32, 64]
    mse = [r.latent_mse for r in sweep]
    psnr = [r.psnr_vs_vae for r in sweep]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
    assert all(a < b for a, b in zip(psnr, psnr[1:])), psnr
    assert sweep[0].digit_fid > 10 * sweep[-1].digit_fid  # B=4 visibly damages the digits, B=64 does not
    continuous = recon_rows[0]
    assert continuous.label == "continuous VAE" and continuous.latent_mse == 0
    assert sweep[-1].psnr_vs_real <= continuous.psnr_vs_real + 0.5


@pytest.mark.slow
def test_a_range_and_d_schemes_are_measured(recon_rows):
    labels = [r.label for r in recon_rows]
    assert {"B=64, ±3σ", "B=64, ±7σ", "uniform, B=64, ±5σ", "empirical, B=64, ±5σ"} <= set(labels)
    header, body = ab.recon_table(recon_rows)
    assert len(body) == len(recon_rows) and len(header) == len(body[0])
    lines = ab.verdicts(recon_rows, [])
    assert lines[0].startswith("(a) levels: PSNR vs the continuous VAE rises monotonically")


def test_roundtrip_is_idempotent_and_empirical_needs_calibration():
    z = torch.randn(8, 4, 8, 8)
    for scheme in ("gaussian", "uniform"):
        cfg = QuantizerConfig(levels=16, scheme=scheme)
        once = ab.roundtrip(z, cfg)
        assert torch.equal(ab.roundtrip(once, cfg), once)
    with pytest.raises(ValueError, match="calibration"):
        ab.roundtrip(z, QuantizerConfig(scheme="empirical"))


def test_generative_verdicts_compare_against_seed_spread():
    rows = [{"row": "x", "name": "default: AR head", "seeds": [0, 1], "class_consistency": [0.60, 0.62],
             "digit_fid": [100.0, 110.0]},
            {"row": "(b)", "name": "parallel head", "seeds": [0, 1], "class_consistency": [0.40, 0.44],
             "digit_fid": [200.0, 190.0]},
            {"row": "(e)", "name": "confidence-guided generation order", "seeds": [0, 1],
             "class_consistency": [0.61, 0.60], "digit_fid": [101.0, 104.0]}]
    lines = ab.verdicts([], rows)
    # parallel vs default: both metrics worse, ranges apart -> the paper's direction (AR head better)
    assert "class-consistency -0.190" in lines[0] and "digit-FID +90.000" in lines[0]
    assert "class-consistency ±0.020 vs ±0.010 (apart)" in lines[0] and "REPRODUCED" in lines[0]
    # confidence vs default: within the ranges
    assert "digit-FID ±1.500 vs ±5.000 (overlapping)" in lines[1] and "NOT shown here" in lines[1]
    rows[2]["digit_fid"] = [150.0, 160.0]          # confidence order clearly worse: the opposite of the paper
    assert "the OPPOSITE here" in ab.verdicts([], rows)[1]
    rows[2]["class_consistency"] = [0.80, 0.82]    # better consistency, worse FID: no direction claimed
    assert "the two metrics disagree; the paper's direction is NOT shown" in ab.verdicts([], rows)[1]
    assert ab.summarize([0.5]) == "0.500" and ab.summarize([0.4, 0.6]) == "0.500 ± 0.100"
    header, body = ab.generative_table(rows)
    assert body[1][3] == "0.420 ± 0.020"


def test_one_seed_claims_no_spread():
    rows = [{"row": "x", "name": "default", "seeds": [0], "class_consistency": [0.6], "digit_fid": [100.0]},
            {"row": "(b)", "name": "parallel head", "seeds": [0], "class_consistency": [0.4], "digit_fid": [150.0]}]
    assert "spread was not measured" in ab.verdicts([], rows)[0]


def test_select_variants_keeps_the_default_arm_and_the_named_rows():
    variants = ab.generative_variants([2, 3, 0, 1])
    names = [v.run_name for v in ab.select_variants(variants, ["b", "c"])]
    assert names == ["default", "parallel", "frequency"]
    assert [v.run_name for v in ab.select_variants(variants, ["e"])] == ["default", "default"]  # (e) resamples
    assert len(ab.select_variants(variants, list("abcde"))) == len(variants)
    assert [v.run_name for v in ab.select_variants(variants, ["a"])] == ["default"]  # (a) has no generative arm
    with pytest.raises(ValueError, match=r"unknown ablation rows \['f'\]"):
        ab.select_variants(variants, ["b", "f"])
