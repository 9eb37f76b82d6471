"""`tb-demo --ablations`: the paper's ablation tables in miniature, on the demo digits.

Rows (same data split, same seeds for every variant):
  (a) reconstruction vs quantization levels B ∈ {4, 8, 16, 32, 64} (range ±5σ) and vs range ±3σ/±5σ/±7σ
      (B = 64): PSNR and digit-FID of decode(dequant(quant(z))) next to the continuous VAE (Table 1a/1b);
  (b) the dimension-wise AR head vs the parallel head, same model and step budget (Table 2a);
  (c) identity vs frequency channel order (Table 2b; the frequency order is the one precompute wrote
      into stats.json);
  (d) gaussian vs uniform vs empirical quantizer: reconstruction (as in (a)) and generation;
  (e) random vs confidence-guided generation order, on the default models (Figure 8).
The generative rows (b)–(e) train one short run per (variant, seed) with the demo's own jobs and score
class-consistency and digit-FID against the test split with the demo's digit classifier.

Here σ is the standard deviation of the scaled demo latents (the demo VAE's scaling factor makes it ≈1,
as 0.2325 does for KL-16 on ImageNet), so ±Rσ is a quantizer range qmin, qmax = ∓R.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from tb_model.quantizer import DimensionwiseQuantizer, QuantizerConfig
from tb_model.vae import LatentVAE
from tb_train.demo.digits import DigitExtractor, digit_fid, digit_stats
from tb_train.sample.job import to_uint8

LEVELS = (4, 8, 16, 32, 64)
RANGES = (3.0, 5.0, 7.0)
SCHEMES = ("gaussian", "uniform", "empirical")


def nchw_uint8(images: Tensor) -> Tensor:
    """VAE output [N, 3, H, W] in about [-1, 1] -> uint8 [N, 3, H, W] by the sampling job's rounding rule."""
    return to_uint8(images).permute(0, 3, 1, 2).contiguous()


def to_unit(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    return images.float() / 127.5 - 1.0


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 image batches (peak 255, MSE over all pixels)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def encode_means(vae: LatentVAE, images: Tensor, batch: int = 256) -> Tensor:
    """uint8 images [N, 3, H, W] -> scaled posterior means [N, C, h, w] (deterministic latents)."""
    out = []
    for chunk in images.split(batch):
        mean, _ = vae.encode(to_unit(chunk)).chunk(2, dim=1)
        out.append(mean * vae.scale)
    return torch.cat(out)


@torch.no_grad()
def decode_uint8(vae: LatentVAE, latents: Tensor, batch: int = 256) -> Tensor:
    """Scaled latents [N, C, h, w] -> uint8 images [N, 3, H, W]."""
    return torch.cat([nchw_uint8(vae.decode(chunk)) for chunk in latents.split(batch)])


def roundtrip(latents: Tensor, cfg: QuantizerConfig, calibration: Tensor | None = None) -> Tensor:
    """dequant(quant(z)) for latents [N, C, h, w]; the empirical table is calibrated on `calibration`."""
    q = DimensionwiseQuantizer.from_config(cfg, channels=latents.shape[1])
    if cfg.scheme == "empirical":
        if calibration is None:
            raise ValueError("the empirical quantizer needs calibration latents")
        q.calibrate(calibration, channel_dim=1)
    return q.dequantize(q.quantize(latents, channel_dim=1), channel_dim=1)


@dataclass
class ReconRow:
    """One reconstruction measurement; `psnr_vs_vae` isolates the quantization error."""

    label: str
    scheme: str
    levels: int | None
    range_sigma: float | None
    latent_mse: float
    psnr_vs_real: float
    psnr_vs_vae: float
    digit_fid: float


def reconstruction_rows(vae: LatentVAE, extractor: DigitExtractor, images: Tensor, calibration: Tensor,
                        levels: Sequence[int] = LEVELS, ranges: Sequence[float] = RANGES,
                        schemes: Sequence[str] = SCHEMES) -> list[ReconRow]:
    """Rows (a) and the reconstruction half of (d) on real images uint8 [N, 3, H, W].

    calibration: scaled latents of OTHER images (the train split) for the empirical table.
    Order: continuous VAE; B sweep at ±5σ (gaussian); range sweep at B = 64 (gaussian); schemes at
    B = 64, ±5σ. digit-FID is against the real images themselves.
    """
    z = encode_means(vae, images)
    real_stats = digit_stats(extractor(images)["pool"])
    continuous = decode_uint8(vae, z)

    def row(label: str, scheme: str, b: int | None, r: float | None, zq: Tensor, img: Tensor) -> ReconRow:
        fid = digit_fid(digit_stats(extractor(img)["pool"]), real_stats)
        return ReconRow(label, scheme, b, r, float((zq - z).pow(2).mean()), psnr(img, images),
                        psnr(img, continuous), fid)

    rows = [row("continuous VAE", "-", None, None, z, continuous)]
    configs = [(f"B={b}, ±5σ", QuantizerConfig(levels=b, qmin=-5.0, qmax=5.0)) for b in levels]
    configs += [(f"B=64, ±{r:g}σ", QuantizerConfig(levels=64, qmin=-r, qmax=r)) for r in ranges if r != 5.0]
    configs += [(f"{s}, B=64, ±5σ", QuantizerConfig(levels=64, scheme=s)) for s in schemes if s != "gaussian"]
    for label, cfg in configs:
        zq = roundtrip(z, cfg, calibration)
        rows.append(row(label, cfg.scheme, cfg.levels, cfg.qmax, zq, decode_uint8(vae, zq)))
    return rows


def recon_table(rows: Sequence[ReconRow]) -> tuple[list[str], list[list[str]]]:
    header = ["quantizer", "latent MSE", "PSNR vs real (dB)", "PSNR vs continuous VAE (dB)", "digit-FID vs real"]
    body = [[r.label, f"{r.latent_mse:.2e}", f"{r.psnr_vs_real:.2f}",
             "—" if math.isinf(r.psnr_vs_vae) else f"{r.psnr_vs_vae:.2f}", f"{r.digit_fid:.3f}"] for r in rows]
    return header, body


@dataclass
class Variant:
    """A generative ablation arm: training overrides and sampling options, one run per seed."""

    row: str
    name: str
    train_overrides: list[str] = field(default_factory=list)
    sample_options: dict = field(default_factory=dict)
    run_name: str | None = None       # share the trained run of another variant (row (e))


def generative_variants(frequency_order: Sequence[int]) -> list[Variant]:
    """Arms of rows (b)–(e); the first is the demo's default recipe."""
    order = "[" + ",".join(str(int(c)) for c in frequency_order) + "]"
    return [
        Variant("(b)(c)(d)(e)", "default: AR head, identity order, gaussian, random order", run_name="default"),
        Variant("(b)", "parallel head", ["model.head_type=parallel"], run_name="parallel"),
        Variant("(c)", f"frequency channel order {order}", [f"model.channel_order={order}"], run_name="frequency"),
        Variant("(d)", "uniform quantizer", ["model.quantizer.scheme=uniform"], run_name="uniform"),
        Variant("(d)", "empirical quantizer", ["model.quantizer.scheme=empirical"], run_name="empirical"),
        Variant("(e)", "confidence-guided generation order", [], {"order": "confidence"}, run_name="default"),
    ]


def select_variants(variants: Sequence[Variant], rows: Sequence[str]) -> list[Variant]:
    """The arms that rows (letters "a".."e") need: the default arm (every row's reference) and each arm
    whose row tag names a selected row. Raises ValueError on an unknown row letter."""
    unknown = sorted(set(rows) - set("abcde"))
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; rows are a, b, c, d, e")
    return [v for i, v in enumerate(variants) if i == 0 or any(f"({r})" in v.row for r in rows)]


def summarize(values: Sequence[float]) -> str:
    """'mean ± spread' where spread is half the max-min range over seeds (one seed: the value alone)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def generative_rows(variants: Sequence[Variant], seeds: Sequence[int],
                    train_and_score: Callable[[Variant, int], dict]) -> list[dict]:
    """Run every (variant, seed); `train_and_score` trains (or reuses) the run and returns the scores dict
    of `tb_train.demo.digits.score_images` (plus the arm's run folder under "run", if it has one).
    -> one dict per variant with per-seed lists."""
    out = []
    for v in variants:
        scores = [train_and_score(v, seed) for seed in seeds]
        out.append({"row": v.row, "name": v.name, "seeds": list(seeds),
                    "class_consistency": [s["class_consistency"] for s in scores],
                    "digit_fid": [s["digit_fid"] for s in scores], "runs": [s.get("run") for s in scores]})
    return out


def generative_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["row", "variant", "seeds", "class-consistency", "digit-FID (test)"]
    body = [[r["row"], r["name"], ",".join(map(str, r["seeds"])), summarize(r["class_consistency"]),
             summarize(r["digit_fid"])] for r in rows]
    return header, body


_LABELS = {"class_consistency": "class-consistency", "digit_fid": "digit-FID"}


def _half_range(values: Sequence[float]) -> float:
    """Half the max-min range over seeds: two arms differ beyond seed noise when their ranges do not overlap,
    i.e. |mean difference| > the sum of their half-ranges (with 2 seeds, a weak but honest test)."""
    return (max(values) - min(values)) / 2


def verdicts(recon: Sequence[ReconRow], gen: Sequence[dict]) -> list[str]:
    """One sentence per ablation: the paper's direction, and whether it shows here beyond the seed spread."""
    out = []
    sweep = [r for r in recon if r.scheme == "gaussian" and r.range_sigma == 5.0]
    if len(sweep) >= 2:
        fids = [r.digit_fid for r in sweep]
        mono = all(a.psnr_vs_vae < b.psnr_vs_vae for a, b in zip(sweep, sweep[1:]))
        trend = "rises monotonically" if mono else "does NOT rise monotonically"
        out.append(f"(a) levels: PSNR vs the continuous VAE {trend} "
                   f"from B={sweep[0].levels} ({sweep[0].psnr_vs_vae:.1f} dB) to B={sweep[-1].levels} "
                   f"({sweep[-1].psnr_vs_vae:.1f} dB); digit-FID {fids[0]:.3f} -> {fids[-1]:.3f} (paper: more "
                   f"levels, better reconstruction, saturating near 64).")
    ranges = sorted((r for r in recon if r.scheme == "gaussian" and r.levels == 64 and r.range_sigma),
                    key=lambda r: r.range_sigma)
    if len(ranges) >= 2:
        best = max(ranges, key=lambda r: r.psnr_vs_vae)
        out.append("(a) range: PSNR vs the continuous VAE " + ", ".join(
            f"±{r.range_sigma:g}σ {r.psnr_vs_vae:.1f} dB" for r in ranges) +
            f"; best here ±{best.range_sigma:g}σ (paper: ±5σ best on KL-16).")

    def find(name_part: str) -> dict | None:
        return next((r for r in gen if name_part in r["name"]), None)

    base = find("default")
    if base is None:
        return out
    one_seed = min(len(r["class_consistency"]) for r in gen) < 2
    # paper's expectation for the arm against the default: +1 better, -1 worse, 0 no paper number
    for tag, part, paper, expected in (
            ("(b)", "parallel", "the AR head beats the parallel head", -1),
            ("(c)", "frequency", "frequency order beats the default order", +1),
            ("(d)", "uniform", "our extension; no paper number", 0),
            ("(d)", "empirical", "our extension; no paper number", 0),
            ("(e)", "confidence", "confidence-guided order improves FID", +1)):
        arm = find(part)
        if arm is None:
            continue
        d = {m: statistics.fmean(arm[m]) - statistics.fmean(base[m]) for m in _LABELS}
        head = (f"{tag} {arm['name']} minus default: class-consistency {d['class_consistency']:+.3f}, "
                f"digit-FID {d['digit_fid']:+.3f}")
        if one_seed:
            out.append(f"{head}; one seed only: the seed-to-seed spread was not measured, so this says nothing "
                       f"yet (paper: {paper}).")
            continue
        apart, better, parts = [], [], []
        for m, label in _LABELS.items():
            halves = (_half_range(arm[m]), _half_range(base[m]))
            if abs(d[m]) > sum(halves):      # the two seed ranges do not overlap
                apart.append(m)
                better.append((d[m] > 0) == (m == "class_consistency"))
            parts.append(f"{label} ±{halves[0]:.3f} vs ±{halves[1]:.3f} "
                         f"({'apart' if m in apart else 'overlapping'})")
        named = " and ".join(_LABELS[m] for m in apart)
        if not apart:
            verdict = "no difference beyond the seed ranges"
        elif all(better):
            verdict = f"the arm is better in {named} beyond the seed ranges"
        elif not any(better):
            verdict = f"the arm is worse in {named} beyond the seed ranges"
        else:
            verdict = "the two metrics disagree"
        if expected and apart and len(set(better)) == 1:
            verdict += "; the paper's direction is " + ("REPRODUCED" if better[0] == (expected > 0) else
                                                       "NOT reproduced (the OPPOSITE here)")
        elif expected:
            verdict += "; the paper's direction is NOT shown here"
        out.append(f"{head}; seed half-ranges arm vs default: {', '.join(parts)}: {verdict} (paper: {paper}).")
    return out


__all__ = ["LEVELS", "RANGES", "SCHEMES", "ReconRow", "Variant", "decode_uint8", "encode_means",
           "generative_rows", "generative_table", "generative_variants", "nchw_uint8", "psnr",
           "recon_table", "reconstruction_rows", "roundtrip", "select_variants", "summarize", "to_unit", "verdicts"]
