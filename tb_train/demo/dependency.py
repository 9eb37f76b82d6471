"""How dependent a token's channels are: the room a dimension-wise AR head has over a parallel head.

The AR head predicts channel k of a token from the MAR context AND channels < k; the parallel head from
the context alone. What conditioning can buy at channel k is I(c_k; c_<k | context). Two measures:

- **From the precomputed tokens, no model** (`channel_dependency`): the entropy H(c_k) of each quantized
  channel and the mutual information I(c_j; c_k) between two channels of the same token (plug-in
  estimate from their joint histogram, in bits). max_{j<k} I(c_j; c_k) is a lower bound on
  I(c_k; c_<k) (context left out), so its sum over k, against the sum of H(c_k), bounds from below the
  share of a token's bits the earlier channels explain. The plug-in estimate is biased upwards by about
  (occupied cells − 1) / (2 N ln 2) bits: `shuffled_mi` is the same estimate after permuting one
  channel's rows — what independent channels score with this N — and is reported next to it.
- **From training, with the model** (`ce_gain`): the parallel head's per-channel cross-entropy minus the
  AR head's (tb-train logs both per channel as `ce/chNN`, in generation order), averaged over the
  last quarter of training: the gain actually realised by conditioning, given the same context.

    python -m tb_train.demo.dependency LATENTS_DIR [LATENTS_DIR ...]   # one row per precomputed folder
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from tb_core.measure import markdown_table
from tb_model.quantizer import DimensionwiseQuantizer, QuantizerConfig
from tb_train.demo.data import shard_latents

CE_TAIL = 0.25      # ce_gain averages the last quarter of the logged steps (the curves are flat there)


def entropy_bits(counts: Tensor) -> float:
    """Entropy in bits of a histogram (any shape; zero cells ignored)."""
    p = counts.double().flatten()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def mutual_information_bits(a: Tensor, b: Tensor, levels: int) -> float:
    """Plug-in I(a; b) in bits of two token sequences long [N] with values in [0, levels):
    H(a) + H(b) − H(a, b) from the joint histogram."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"need two token sequences of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    joint = torch.bincount(a.long() * levels + b.long(), minlength=levels * levels).view(levels, levels)
    return entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint)


def pairwise_mi(tokens: Tensor, levels: int) -> Tensor:
    """tokens long [N, C] -> float64 [C, C]: I(c_j; c_k) in bits, H(c_k) on the diagonal."""
    c = tokens.shape[1]
    mi = torch.zeros(c, c, dtype=torch.float64)
    for j in range(c):
        for k in range(j, c):
            mi[j, k] = mi[k, j] = mutual_information_bits(tokens[:, j], tokens[:, k], levels)
    return mi


@dataclass
class ChannelDependency:
    """Summary of `pairwise_mi` for one set of tokens (all figures in bits per token)."""

    channels: int
    tokens: int
    entropy: list[float]            # H(c_k) per channel (channel index order)
    mean_pair_mi: float             # mean of I(c_j; c_k) over pairs j < k
    max_pair_mi: float
    shuffled_mi: float              # mean plug-in MI of the same pairs after permuting one channel: the bias floor
    earlier_bound: float            # sum over k of max_{j before k in `order`} I(c_j; c_k)
    order: list[int]

    @property
    def explained_share(self) -> float:
        """earlier_bound / total entropy: a lower bound on the share of a token's bits that the earlier
        channels explain (no context)."""
        return self.earlier_bound / sum(self.entropy)


def channel_dependency(tokens: Tensor, levels: int, order: Sequence[int] | None = None,
                       seed: int = 0) -> ChannelDependency:
    """tokens long [N, C] (one row per token, e.g. every position of every image) -> the summary.

    order: the generation order of the channels (default: identity) for `earlier_bound`."""
    n, c = tokens.shape
    order = list(range(c)) if order is None else [int(k) for k in order]
    if sorted(order) != list(range(c)):
        raise ValueError(f"order {order} is not a permutation of 0..{c - 1}")
    mi = pairwise_mi(tokens, levels)
    pairs = [(j, k) for j in range(c) for k in range(j + 1, c)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = [mutual_information_bits(tokens[:, j], tokens[perm, k], levels) for j, k in pairs]
    bound = sum(max(mi[order[i], order[k]] for i in range(k)) for k in range(1, c))
    return ChannelDependency(
        channels=c, tokens=n, entropy=mi.diagonal().tolist(),
        mean_pair_mi=statistics.fmean(float(mi[j, k]) for j, k in pairs) if pairs else 0.0,
        max_pair_mi=max((float(mi[j, k]) for j, k in pairs), default=0.0),
        shuffled_mi=statistics.fmean(shuffled) if pairs else 0.0, earlier_bound=float(bound), order=order)


def latent_tokens(latents: Tensor, quantizer: QuantizerConfig) -> Tensor:
    """Scaled latents [N, C, h, w] -> the model's token indices long [N·h·w, C] (one row per position)."""
    q = DimensionwiseQuantizer.from_config(quantizer, channels=latents.shape[1])
    return q.quantize(latents.float(), channel_dim=1).long().permute(0, 2, 3, 1).flatten(0, 2)


def final_ce(scalars: dict[str, list[tuple[int, float]]], tail: float = CE_TAIL) -> list[float]:
    """Per-channel CE at the end of a run from its `ce/chNN` series ({tag: [(step, value)]}, as
    `tb_train.demo.report.read_scalars` returns): the mean over the last `tail` of the logged points. Each
    point is already the mean over its `metrics.log_every` interval, so with 180 steps logged every 20 the
    last quarter is 3 points = the last 60 steps' batches (one batch alone is noisy: random masks)."""
    tags = sorted(t for t in scalars if t.startswith("ce/ch"))
    if not tags:
        raise ValueError("no ce/chNN scalars: the run logged no per-channel cross-entropy")
    out = []
    for tag in tags:
        values = [v for _, v in scalars[tag]]
        out.append(statistics.fmean(values[-max(1, math.ceil(tail * len(values))):]))
    return out


def ce_gain(ar: Sequence[Sequence[float]], parallel: Sequence[Sequence[float]]) -> dict:
    """Per-channel CE (nats; one list per seed) of AR-head and parallel-head runs -> the gain of conditioning:
    {"per_channel": mean over seeds of parallel − AR per channel, "total": its sum (nats per token),
    "relative": total / the parallel head's summed CE, "per_seed_total": sum per seed pair}."""
    if len(ar) != len(parallel) or not ar or any(len(a) != len(p) for a, p in zip(ar, parallel)):
        raise ValueError("ce_gain needs the same number of seeds and channels for both heads")
    per_seed = [[p - a for a, p in zip(ar_s, par_s)] for ar_s, par_s in zip(ar, parallel)]
    per_channel = [statistics.fmean(g) for g in zip(*per_seed)]
    parallel_total = statistics.fmean(sum(p) for p in parallel)
    return {"per_channel": per_channel, "total": sum(per_channel), "relative": sum(per_channel) / parallel_total,
            "per_seed_total": [sum(g) for g in per_seed]}


def dependency_table(rows: Sequence[tuple[str, ChannelDependency]]) -> tuple[list[str], list[list[str]]]:
    """Markdown table parts, one row per (label, summary)."""
    header = ["latents", "channels", "tokens", "H per channel (bits, mean)", "mean pairwise MI (bits)",
              "shuffled MI (bias floor)", "max pairwise MI", "Σ_k max_{j<k} MI (bits/token)",
              "share of token bits (lower bound)"]
    body = [[label, str(d.channels), str(d.tokens), f"{statistics.fmean(d.entropy):.3f}", f"{d.mean_pair_mi:.4f}",
             f"{d.shuffled_mi:.4f}", f"{d.max_pair_mi:.3f}", f"{d.earlier_bound:.3f}",
             f"{100 * d.explained_share:.1f}%"] for label, d in rows]
    return header, body


def latents_dependency(latents_dir: str | Path, quantizer: QuantizerConfig,
                       order: Sequence[int] | None = None) -> ChannelDependency:
    """`channel_dependency` of a precomputed folder's train latents (one posterior sample per image,
    the image view: what the demo trains on) quantized by `quantizer`."""
    return channel_dependency(latent_tokens(shard_latents(latents_dir), quantizer), quantizer.levels, order)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tb_train.demo.dependency", description=__doc__.split("\n")[0])
    p.add_argument("latents", nargs="+", type=Path, help="precomputed latents folders (tb-precompute output)")
    p.add_argument("--levels", type=int, default=64, help="quantizer levels B (the demo's: 64, range ±5)")
    args = p.parse_args(argv)
    missing = [str(d) for d in args.latents if not (d / "manifest.json").is_file()]
    if missing:
        p.error(f"not a finished precomputed folder (no manifest.json): {', '.join(missing)}")
    cfg = QuantizerConfig(levels=args.levels)
    rows = [(str(d), latents_dependency(d, cfg)) for d in args.latents]
    print(markdown_table(*dependency_table(rows)))
    for label, d in rows:
        print(f"{label}: {asdict(d)}")
    return 0


__all__ = ["CE_TAIL", "ChannelDependency", "ce_gain", "channel_dependency", "dependency_table", "entropy_bits",
           "final_ce", "latent_tokens", "latents_dependency", "mutual_information_bits", "pairwise_mi"]

if __name__ == "__main__":
    sys.exit(main())
