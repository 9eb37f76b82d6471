"""The demo report: `<out>/report.md` and the PNGs it links, written from measured values only.

Pieces (each a function, so `tb-demo`, the ablations and the tests can use them alone):
- `curves_png`: training curves read back from the run's TensorBoard event files (loss, per-channel
  CE, lr, and every `eval/` scalar the periodic evaluation wrote), one panel per group.
- `quantization_png`: the paper's Figure 3 for the demo latents — the histogram of the scaled latents
  against the quantizer's bin values, and how many latents fall into each of the B bins (the Gaussian
  table assumes unit variance after normalization; a narrower latent distribution leaves most of the
  bins nearly empty).
- `write_report`: the report itself (atomic write); tables and machine facts come from tb_core.measure.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly: importing this module does
not switch the process-wide pyplot backend of whoever imports it.
"""
from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from tb_core.fileio import atomic_write_bytes, atomic_write_text
from tb_model.quantizer import DimensionwiseQuantizer, QuantizerConfig

NOT_IMAGENET = ("These are **not ImageNet / Inception numbers**: the features and the classifier are a small "
                "CNN trained on the 1,205-image train split of scikit-learn's digits, the FID is computed "
                "on a few hundred samples in a 64-dimensional feature space, and the values are comparable "
                "only with other rows of this report.")


def read_scalars(tb_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard folder (step axis only) -> {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("by_epoch1000x/"):
            continue
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may rewrite a step
        out[tag] = sorted(by_step.items())
    return out


def _groups(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    """Panels: loss, per-channel CE, lr, then one panel per eval metric."""
    groups: dict[str, list[str]] = defaultdict(list)
    for tag in sorted(scalars):
        if tag == "loss":
            groups["loss (nats per channel)"].append(tag)
        elif tag.startswith("ce/"):
            groups["cross-entropy per channel (nats)"].append(tag)
        elif tag == "lr":
            groups["learning rate"].append(tag)
        elif tag.startswith("eval/"):
            groups[tag].append(tag)
    return dict(groups)


def _figure(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, list]:
    """A figure and its axes grid [rows][cols], on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


def curves_png(tb_dir: str | os.PathLike, out_png: str | os.PathLike) -> list[str]:
    """Training curves as one PNG; -> the panel titles drawn (empty list: no scalars, no file)."""
    groups = _groups(read_scalars(tb_dir))
    if not groups:
        return []
    scalars = read_scalars(tb_dir)
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = _figure(rows, cols, (5 * cols, 3.2 * rows))
    for ax, (title, tags) in zip(axes.flat, groups.items()):
        for tag in tags:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=tag.split("/")[-1])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(tags) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, Path(out_png))
    return list(groups)


def bin_occupancy(latents: Tensor, cfg: QuantizerConfig) -> Tensor:
    """Share of latent scalars per bin index of a fixed-table quantizer -> float64 [levels] summing to 1."""
    q = DimensionwiseQuantizer.from_config(cfg)
    idx = q.quantize(latents.float().flatten()).long()
    return torch.bincount(idx, minlength=cfg.levels).double() / idx.numel()


def quantization_png(latents: Tensor, cfg: QuantizerConfig, out_png: str | os.PathLike) -> dict[str, float]:
    """Figure 3 for these latents: histogram vs bin values, and bin occupancy vs the equiprobable 1/B.

    latents: scaled latents [N, C, h, w] (what training quantizes). -> summary numbers for the report:
    std of the normalized latents x_n, share of bins holding < 1/(10 B) of the mass, entropy in bits.
    """
    if cfg.scheme == "empirical":
        raise ValueError("quantization_png draws a fixed table (gaussian or uniform), not 'empirical'")
    q = DimensionwiseQuantizer.from_config(cfg)
    values = q.values[0].double()
    flat = latents.double().flatten()
    occ = bin_occupancy(latents, cfg)
    x_n = ((flat - cfg.qmin) / (cfg.qmax - cfg.qmin) * 6 - 3)
    nonzero = occ[occ > 0]
    entropy = float(-(nonzero * nonzero.log2()).sum())
    fig, ((a, b),) = _figure(1, 2, (12, 3.6))
    a.hist(flat.numpy(), bins=200, range=(cfg.qmin, cfg.qmax), density=True, color="tab:blue", alpha=0.7,
           label="demo latents (scaled)")
    for v in values.numpy():
        a.axvline(v, color="tab:red", lw=0.4, alpha=0.6)
    a.plot([], [], color="tab:red", lw=0.8, label=f"{cfg.scheme} bin values (B={cfg.levels})")
    a.set_xlim(cfg.qmin, cfg.qmax)
    a.set_xlabel("latent value")
    a.set_title(f"latents vs bins over [{cfg.qmin:g}, {cfg.qmax:g}]", fontsize=10)
    a.legend(fontsize=8)
    b.bar(range(cfg.levels), occ.numpy(), width=1.0, color="tab:blue")
    b.axhline(1.0 / cfg.levels, color="tab:red", lw=1, label="equiprobable 1/B")
    b.set_xlabel("bin index")
    b.set_ylabel("share of latent scalars")
    b.set_title(f"bin occupancy: entropy {entropy:.2f} of {torch.log2(torch.tensor(cfg.levels)).item():.0f} bits",
                fontsize=10)
    b.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(out_png))
    return {"x_n_std": float(x_n.std()), "entropy_bits": entropy,
            "near_empty_bins": float((occ < 0.1 / cfg.levels).double().mean())}


def write_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """`# title`, then each (heading, markdown body) as a `##` section; written atomically."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    return atomic_write_text(path, "\n".join(parts))


__all__ = ["NOT_IMAGENET", "bin_occupancy", "curves_png", "quantization_png", "read_scalars", "write_report"]
