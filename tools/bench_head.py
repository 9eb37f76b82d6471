"""Benchmark: per-position token sampling cost of TokenBridge's AR head vs MAR's diffusion head.

Part 1 (same z, random weights): per call of N positions, time of
  (a) the AR head with a KV cache (TokenBridge's default here),
  (b) the same head recomputing the prefix at every channel (the released code's loop),
  (c) MAR's diffusion head of the matching MAR size, 100 DDPM steps, CFG inside the head (2N rows),
while TokenBridge applies CFG to z and runs its head once on N rows. Ratios are measured in the same
run and printed next to the FLOP ratio (FLOPs counted by torch.utils.flop_counter on one call) that
bounds each speed-up.
Part 1b (rows with N = 1): one cached step against the memory bound. The step reads every trunk weight
once (a matrix-vector product per Linear), so its floor is (weight bytes the cached loop reads per call
/ steps) / memory bandwidth, the bandwidth measured in the same run (a 512 MiB copy and a 512 MiB sum,
the faster of the two, so the bound is the strict one); printed: both times and their ratio. This host's
bandwidth drifts with its neighbours' load (27 to 63 GB/s within an hour), so it is read just before and
just after the timed calls, and the faster reading sets the bound. A fresh buffer's rate also depends on
where its pages land, so the bound is read a second way: a read of the head's own weights (before and
after, best), and a third: each call timed right after one read of the weights, the ratio per pair
(median and range), so that drift between the reading and the call cancels.
Part 2: whole-image generation at num_iter 64 with CFG: the head's share of the total time, and the
default loop (batched CFG + KV cache) vs the official-style loop (two MAR passes + prefix recompute);
measured by running `generate` (--whole) or estimated from timed MAR passes and head calls (--estimate).

Usage: python tools/bench_head.py [--sizes tiny,L] [--batch 1,64] [--whole tiny] [--estimate L]
                                 [--dtype fp32|bf16] [--threads N] [--no-diffusion] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout (a lent GPU) too

from tb_core.measure import synchronize  # noqa: E402
from tb_model.baselines.diffloss import MAR_DIFFUSION_SIZES, DiffusionHead  # noqa: E402
from tb_model.head import ARHead, step_kernel  # noqa: E402
from tb_model.config import ModelConfig, resolve  # noqa: E402
from tb_model.registry import create  # noqa: E402
from tb_model.tokenbridge import mask_schedule  # noqa: E402

TINY_DIFFUSION = (2, 64)  # blocks x width for the tiny size (MAR has no tiny diffusion head)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn: Callable[[], object], min_time: float, max_repeats: int) -> float:
    """Median seconds per call; one untimed warm-up unless a call takes > 2 s."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 2.0:
        return first
    times: list[float] = []
    while len(times) < max_repeats and (sum(times) < min_time or len(times) < 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(fn: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def memory_bandwidth(nbytes: int = 512 * 2 ** 20, repeats: int = 5) -> dict[str, float]:
    """Bytes per second of a large copy (read + write counted) and of a large sum (read only), best of
    `repeats`: the rate a matrix-vector product over weights far larger than the caches can reach."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = {"copy": 0.0, "read": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best["copy"] = max(best["copy"], 2 * nbytes / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        src.sum()
        best["read"] = max(best["read"], nbytes / (time.perf_counter() - t0))
    return best


def weight_read_rate(head: ARHead, repeats: int = 3) -> float:
    """Bytes per second of reading the head's own parameters once (a sum of each), best of `repeats`:
    the rate at the pages the weights live on. A fresh 512 MiB buffer's rate varies by page placement on
    this host (43-69 GB/s between eight buffers of one process), so this is the bound's second reading."""
    params = list(head.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in params:
            p.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def cached_weight_bytes(head: ARHead) -> int:
    """Weight bytes one cached `sample` call reads: cond_proj and every modulation once, every step the
    trunk (blocks' Linears and norms, the final norm) and its own classifier."""
    once = [head.cond_proj, *(blk.adaLN_modulation for blk in head.blocks), head.final.adaLN_modulation,
            head.classifiers]
    per_step = [*(nn.ModuleList([blk.norm1, blk.attn, blk.norm2, blk.mlp]) for blk in head.blocks), head.norm]
    size = lambda mods: sum(p.numel() * p.element_size() for m in mods for p in m.parameters())  # noqa: E731
    return size(once) + head.steps * size(per_step)


def bench_heads(size: str, batch: int, dtype: torch.dtype, cfg_scale: float, args: argparse.Namespace) -> dict:
    cfg = resolve(ModelConfig(size=size))
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = ARHead(cfg.width, cfg.head_width, cfg.head_depth, cfg.head_num_heads, cfg.latent_channels,
                  cfg.quantizer.levels).to(device, dtype).eval()
    depth, width = MAR_DIFFUSION_SIZES.get(size, TINY_DIFFUSION)
    diff = DiffusionHead(cfg.latent_channels, cfg.width, width, depth).to(device, dtype).eval()
    z = torch.randn(batch, cfg.width, dtype=dtype).to(device)
    z2 = torch.randn(2 * batch, cfg.width, dtype=dtype).to(device)
    gen = torch.Generator(device).manual_seed(0)
    def runs(n: int) -> dict[str, Callable[[], object]]:
        fns = {
            "cache": lambda: head.sample(z[:n], 1.0, gen, use_cache=True),
            "prefix": lambda: head.sample(z[:n], 1.0, gen, use_cache=False),
            "diffusion": lambda: diff.sample(z2[:2 * n], 1.0, cfg_scale, steps=100, generator=gen),
        }
        if not args.diffusion:
            del fns["diffusion"]
        return fns

    out = {"size": size, "batch": batch, "steps": head.steps, "weight_bytes": cached_weight_bytes(head),
           "kernel": step_kernel(z)}
    with torch.inference_mode():
        bound = batch == 1 and device.type == "cpu"  # the weight-read bound of part 1b (host memory)
        for name, fn in runs(batch).items():
            if name == "cache" and bound:  # the host's bandwidth drifts: read it around the timed calls
                out["bandwidth"] = [memory_bandwidth(repeats=3)]
                out["weight_rate"] = [weight_read_rate(head)]
            out[f"t_{name}"] = timed(lambda: (fn(), synchronize(device)), args.min_time, args.repeats)
            if name == "cache" and bound:
                out["bandwidth"].append(memory_bandwidth(repeats=3))
                out["weight_rate"].append(weight_read_rate(head))
                pairs = []  # a read of the weights right before each call: the drift cancels within a pair
                for _ in range(args.repeats):
                    rate = weight_read_rate(head, repeats=1)
                    t0 = time.perf_counter()
                    fn()
                    pairs.append((time.perf_counter() - t0, rate))
                out["pairs"] = pairs
        counted = runs(1)  # FLOPs are linear in the number of positions
        # The same arithmetic on plain weights: the counter does not see oneDNN's packed GEMMs.
        counted["cache"] = lambda: head.sample(z[:1], 1.0, gen, step=lambda *a: head.sample_step(*a))
        for name, fn in counted.items():
            out[f"f_{name}"] = flops(fn)
    return out


def bench_whole(size: str, dtype: torch.dtype, cfg_scale: float, num_iter: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = create(size).to(dtype).eval()
    labels = torch.arange(batch) % model.config.num_classes
    head_time = [0.0]
    inner = model.head.sample

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        result = inner(*a, **k)
        head_time[0] += time.perf_counter() - t0
        return result

    model.head.sample = timed_sample
    out = {"size": size}
    for name, official in (("fast", False), ("official", True)):
        head_time[0] = 0.0
        t0 = time.perf_counter()
        model.generate(labels, num_iter=num_iter, cfg=cfg_scale, generator=torch.Generator().manual_seed(0),
                       official=official)
        out[f"t_{name}"] = time.perf_counter() - t0
        out[f"head_{name}"] = head_time[0]
    return out


def interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear interpolation through (xs, ys), xs increasing; x within [xs[0], xs[-1]]."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def estimate_whole(size: str, dtype: torch.dtype, cfg_scale: float, num_iter: int, batch: int) -> dict:
    """Whole-image time from component timings, for sizes too slow to generate on a CPU.

    MAR: one timed pass (batched CFG: 2 rows; official: 2 x 1 row) with 0, L/2 and L-1 known
    positions, linearly interpolated to each step's known count. Head: one timed call per distinct
    number of positions a step predicts (cached; official: prefix recomputed), times its multiplicity.
    """
    torch.manual_seed(0)
    model = create(size).to(dtype).eval()
    L, C = model.seq_len, model.config.latent_channels
    plan = [n for n, _ in mask_schedule(L, num_iter)]
    labels = torch.arange(batch) % model.config.num_classes
    values = torch.zeros(batch, L, C, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch * L, model.config.width, dtype=dtype)
    out = {"size": size}
    with torch.inference_mode():
        for name, two_pass in (("fast", False), ("official", True)):
            anchors = [0, L // 2, L - 1]
            t_mar = []
            for known in anchors:
                mask = torch.ones(batch, L, dtype=torch.bool)
                mask[:, :known] = False
                t0 = time.perf_counter()
                model.guided_features(values, mask, labels, cfg_scale, two_pass=two_pass)
                t_mar.append(time.perf_counter() - t0)
            mar_total, head_total, known = 0.0, 0.0, 0
            head_t: dict[int, float] = {}
            for n in plan:
                if n == 0:
                    continue
                mar_total += interp(known, anchors, t_mar)
                if n not in head_t:
                    t0 = time.perf_counter()
                    model.head.sample(z[:batch * n], 1.0, gen, use_cache=not two_pass)
                    head_t[n] = time.perf_counter() - t0
                head_total += head_t[n]
                known += n
            out[f"t_{name}"] = mar_total + head_total
            out[f"head_{name}"] = head_total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,L", help="part 1 sizes: tiny, base, L, H (H: ~15 min on a CPU)")
    ap.add_argument("--batch", default="1,64", help="comma list of positions per head call (part 1)")
    ap.add_argument("--whole", default="tiny", help="comma list of sizes for whole-image generation; '' = skip")
    ap.add_argument("--estimate", default="", help="comma list of sizes whose whole-image time is estimated "
                    "from component timings (for L/H on a CPU)")
    ap.add_argument("--no-diffusion", dest="diffusion", action="store_false",
                    help="skip MAR's diffusion head in part 1 (minutes at L)")
    ap.add_argument("--num-iter", type=int, default=64)
    ap.add_argument("--whole-batch", type=int, default=1, help="images per generate call in part 2")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--device", default="cpu", help="part 1's device (cuda: timed with synchronisation; "
                    "part 1b is CPU-only)")
    ap.add_argument("--repeats", type=int, default=5, help="max timed calls per measurement")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls to aim for")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, cfg {args.cfg}, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}")
    head_sizes = [s for s in args.sizes.split(",") if s]
    batches = [int(b) for b in args.batch.split(",") if b]
    if head_sizes:
        print("Part 1: head sampling per call (ms) and ratios (measured | FLOPs)")
        print(f"{'size':>5} {'N':>4} {'cache':>9} {'prefix':>9} {'diffusion':>10} "
              f"{'prefix/cache':>17} {'diffusion/cache':>18}")
    bound_lines = []
    for size in head_sizes:
        for batch in batches:
            r = bench_heads(size, batch, dtype, args.cfg, args)
            pc, fpc = r["t_prefix"] / r["t_cache"], r["f_prefix"] / r["f_cache"]
            if args.diffusion:
                diffusion = f"{1e3 * r['t_diffusion']:10.2f}"
                ratio = f"{r['t_diffusion'] / r['t_cache']:8.2f} | {r['f_diffusion'] / r['f_cache']:6.2f}"
            else:
                diffusion, ratio = f"{'-':>10}", f"{'-':>8} | {'-':>6}"
            print(f"{size:>5} {batch:>4} {1e3 * r['t_cache']:9.2f} {1e3 * r['t_prefix']:9.2f} "
                  f"{diffusion} {pc:7.2f} | {fpc:6.2f}  {ratio}", flush=True)
            if "bandwidth" in r:
                before, after = (max(b.values()) for b in r["bandwidth"])
                rate = max(before, after)
                step_bytes = r["weight_bytes"] / r["steps"]
                measured, bound = r["t_cache"] / r["steps"], step_bytes / rate
                own = max(r["weight_rate"])
                bound_lines.append(f"{size} N=1 (kernel {r['kernel']}): {1e3 * measured:.2f} ms/step measured, "
                                   f"{step_bytes / 1e6:.1f} MB/step weights -> {1e3 * bound:.2f} ms/step at "
                                   f"{rate / 1e9:.1f} GB/s; measured / bound {measured / bound:.2f} (bandwidth "
                                   f"{before / 1e9:.1f} GB/s just before the timed calls, "
                                   f"{after / 1e9:.1f} just after)")
                bound_lines.append(f"{size} N=1 against a read of the head's own weights ({own / 1e9:.1f} GB/s, best "
                                   f"of before {r['weight_rate'][0] / 1e9:.1f} / after "
                                   f"{r['weight_rate'][1] / 1e9:.1f}): bound {1e3 * step_bytes / own:.2f} ms/step, "
                                   f"measured / bound {measured * own / step_bytes:.2f}")
                paired = sorted(t / r["steps"] * read_rate / step_bytes for t, read_rate in r["pairs"])
                bound_lines.append(f"{size} N=1 paired (each call right after a read of the weights, {len(paired)} "
                                   f"pairs): measured / bound median {statistics.median(paired):.2f}, range "
                                   f"{paired[0]:.2f}-{paired[-1]:.2f}")
    if bound_lines:
        print("Part 1b: one cached step at N=1 vs weight bytes / memory bandwidth")
        print("\n".join(bound_lines), flush=True)
    sizes = [s for s in args.whole.split(",") if s]
    estimated = [s for s in args.estimate.split(",") if s]
    if sizes or estimated:
        print(f"Part 2: whole-image generation, batch {args.whole_batch}, num_iter {args.num_iter}, cfg {args.cfg} (s)")
        print(f"{'size':>5} {'fast':>8} {'head share':>10} {'official':>9} {'head share':>10} {'official/fast':>13}")
    runs = [(s, bench_whole, "") for s in sizes] + [(s, estimate_whole, "  (estimated)") for s in estimated]
    for size, fn, note in runs:
        r = fn(size, dtype, args.cfg, args.num_iter, args.whole_batch)
        print(f"{size:>5} {r['t_fast']:8.2f} {100 * r['head_fast'] / r['t_fast']:9.1f}% {r['t_official']:9.2f} "
              f"{100 * r['head_official'] / r['t_official']:9.1f}% {r['t_official'] / r['t_fast']:13.2f}{note}",
              flush=True)


if __name__ == "__main__":
    main()
