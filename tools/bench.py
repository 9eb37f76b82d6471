"""All benchmarks in one run, one markdown table: head, train, precompute and sampling.

    python tools/bench.py [--threads 2] [--out bench.md] [--quick] [--skip sample ...]

Runs tools/bench_head.py, bench_train.py, bench_precompute.py and bench_sample.py one after the other,
each as a subprocess with the same thread count (they measure time, so they must not overlap), reads
the figures each one prints (bench_train: its JSON file) and writes ONE table: every figure and every
ratio measured in the same run, with the CPU model, the thread count, torch and the load average at the
start and the end (a loaded machine makes every time longer; the ratios move less). A benchmark that
fails or is missing gets a row saying so and its last output lines on stderr; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(ROOT))

from tb_core.measure import machine_info, markdown_table  # noqa: E402

Row = tuple[str, str, str, str]   # benchmark, figure, value, note
NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def head_rows(out: str) -> list[Row]:
    """bench_head part 1 (ms per call, ratios measured | FLOP bound; '-' where the diffusion head was
    skipped), part 1b (N=1 step vs weight bytes / bandwidth) and part 2 (whole-image seconds)."""
    rows: list[Row] = []
    part1 = re.compile(rf"^\s*(\w+)\s+(\d+)\s+({NUM})\s+({NUM})\s+({NUM}|-)\s+({NUM}) \|\s*({NUM})"
                       rf"\s+({NUM}|-) \|\s*({NUM}|-)\s*$")
    part1b = re.compile(rf"^(\w+) N=1 \(kernel (\w+)\): ({NUM}) ms/step measured, ({NUM}) MB/step weights -> ({NUM}) "
                        rf"ms/step at ({NUM}) GB/s; measured / bound ({NUM}) \(bandwidth ({NUM}) GB/s just before the "
                        rf"timed calls, ({NUM}) just after\)$")
    own = re.compile(rf"^(\w+) N=1 against a read of the head's own weights \(({NUM}) GB/s.*measured / bound ({NUM})$")
    paired = re.compile(rf"^(\w+) N=1 paired .*?(\d+) pairs\): measured / bound median ({NUM}), range ({NUM})-({NUM})$")
    part2 = re.compile(rf"^\s*(\w+)\s+({NUM})\s+({NUM})%\s+({NUM})\s+({NUM})%\s+({NUM})(.*)$")
    for line in out.splitlines():
        if m := part1.match(line):
            size, n, cache, prefix, diff, pc, fpc, dc, fdc = m.groups()
            rows += [("head", f"AR head with KV cache (fused step), {size}, {n} positions per call",
                      f"{float(cache):.2f} ms", ""),
                     ("head", f"prefix recompute / KV cache, {size}, N={n}", f"{float(pc):.2f}×",
                      f"FLOP ratio {float(fpc):.2f}")]
            if dc != "-":
                rows.append(("head", f"MAR diffusion head / AR head, {size}, N={n}", f"{float(dc):.2f}×",
                             f"FLOP ratio {float(fdc):.2f}"))
        elif m := part1b.match(line):
            size, kernel, step, mb, bound, rate, ratio, before, after = m.groups()
            rows.append(("head", f"cached step at N=1, {size}: measured / weight-bytes bound", f"{float(ratio):.2f}",
                         f"{float(step):.2f} ms vs {float(bound):.2f} ms ({float(mb):.1f} MB at {float(rate):.1f} "
                         f"GB/s, a 512 MiB buffer; {float(before):.1f} before, {float(after):.1f} after the timed "
                         f"calls; kernel {kernel})"))
        elif m := own.match(line):
            size, rate, ratio = m.groups()
            rows.append(("head", f"cached step at N=1, {size}: measured / bound from a read of the weights",
                         f"{float(ratio):.2f}", f"{float(rate):.1f} GB/s (best before/after)"))
        elif m := paired.match(line):
            size, n, median, low, high = m.groups()
            rows.append(("head", f"cached step at N=1, {size}: measured / bound, each call paired with a read",
                         f"{float(median):.2f}", f"median of {n} pairs, range {float(low):.2f}-{float(high):.2f}"))
        elif m := part2.match(line):
            size, fast, share, official, share_o, ratio, note = m.groups()
            rows += [("head", f"whole image, {size}, default loop", f"{float(fast):.2f} s",
                      f"head share {share}%{note.strip() and ' ' + note.strip()}"),
                     ("head", f"whole image, {size}, official loop / default", f"{float(ratio):.2f}×",
                      f"head share {share_o}%")]
    return rows


def train_rows(data: dict) -> list[Row]:
    """bench_train JSON: step time and MFU per (dtype, checkpointing, compile), the compiled/uncompiled
    ratio; ZeRO memory per rank vs stage 0."""
    from bench_train import compile_speedup

    rows: list[Row] = []
    ckpt = data.get("ckpt", [])
    base = {(r["dtype"], r["compiled"]): r for r in ckpt if r["policy"] == "none"}
    for r in ckpt:
        ref = base.get((r["dtype"], r["compiled"]))
        note = f"{r['step_time_s'] / ref['step_time_s']:.2f}× no checkpointing" if ref and ref is not r else ""
        speedup = compile_speedup(r, ckpt)
        if speedup:
            note += f"{'; ' if note else ''}{speedup:.2f}× the uncompiled speed (compile {r['compile_s']:.0f} s)"
        what = f"{r['dtype']}, checkpointing {r['policy']}{', engine.compile' if r['compiled'] else ''}"
        rows.append(("train", f"step time, {what}", f"{r['step_time_s']:.3f} s",
                     f"MFU vs GEMM {r['mfu_vs_gemm']:.1%}; GEMM share {r['gemm_share']:.0%}"
                     + (f"; {note}" if note else "")))
    per_stage: dict[int, int] = {}
    for r in data.get("zero", []):
        if r["rank"] == 0:
            per_stage[r["stage"]] = r["param_bytes"] + r["master_bytes"] + r["optim_state_bytes"]
    for stage, total in sorted(per_stage.items()):
        ref = per_stage.get(0)
        rows.append(("train", f"ZeRO-{stage} params+optimizer per rank (2 ranks)", f"{total / 2 ** 20:.2f} MiB",
                     f"{total / ref:.2f}× stage 0" if ref else ""))
    return rows


def precompute_rows(out: str) -> list[Row]:
    rows: list[Row] = []
    bare = re.search(rf"bare encoder[^:]*:\s*({NUM}) img/s", out)
    if bare:
        rows.append(("precompute", "bare VAE encoder (image + flip)", f"{float(bare.group(1)):.1f} img/s", ""))
    for m in re.finditer(rf"(\d+) DataLoader worker\(s\): whole job\s*({NUM}) img/s = \s*({NUM})%", out):
        rows.append(("precompute", f"whole job, {m.group(1)} decode worker(s)", f"{float(m.group(2)):.1f} img/s",
                     f"{float(m.group(3)):.1f}% of the bare encoder"))
    return rows


def sample_rows(out: str) -> list[Row]:
    """bench_sample: default vs official generation per size (its markdown rows: img/s, ratio, the MAR /
    head split of each path, the head-free bound), Inception img/s."""
    rows: list[Row] = []
    row = re.compile(rf"^\| (\w+) \| (\d+) \| (\d+) \| ({NUM}) \| (\w+) \| ({NUM}) \([^)]*\) \|"
                     rf"(?: ({NUM}) \([^)]*\) \| ({NUM}) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ({NUM}) \|)?\s*$")
    for line in out.splitlines():
        if m := row.match(line):
            size, batch, num_iter, cfg, prec, fast, official, ratio, same, split, split_o, bound = m.groups()
            what = f"{size}, batch {batch}, {num_iter} steps, cfg {cfg}, {prec}"
            rows.append(("sample", f"generation img/s (latents), {what}", f"{float(fast):.3f} img/s",
                         split.strip() if split else ""))
            if ratio:
                rows.append(("sample", f"official loop time / default, {what}", f"{float(ratio):.2f}×",
                             f"same latents: {same.strip()}; official {split_o.strip()}; bound with a free head "
                             f"{float(bound):.2f}×"))
    if m := re.search(rf"^(Inception features[^:]*):\s*({NUM}) img/s", out, re.M):
        rows.append(("sample", m.group(1) + " (random weights)", f"{float(m.group(2)):.2f} img/s", ""))
    return rows


def run_tool(script: str, args: list[str], threads: int, timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, str(TOOLS / script), *args], env=env, capture_output=True, text=True,
                             timeout=timeout)
        return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per benchmark")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--quick", action="store_true", help="tiny sizes only (a few minutes on 2 cores)")
    p.add_argument("--skip", nargs="*", default=[], choices=["head", "train", "precompute", "sample"])
    p.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")
    args = p.parse_args(argv)
    t = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        train_json = Path(tmp) / "train.json"
        plan: list[tuple[str, str, list[str], Callable[[str], list[Row]]]] = [
            ("head", "bench_head.py", ["--threads", t, "--sizes", "tiny" if args.quick else "tiny,L",
                                       "--batch", "1,64", "--whole", "tiny"], head_rows),
            ("train", "bench_train.py", ["--threads", t, "--size", "tiny" if args.quick else "base", "--dtypes", "fp32",
                                         "--policies", "none", "full", "--zero-stages", "0", "2",
                                         "--compile", "off", *([] if args.quick else ["on"]),
                                         "--zero-dtype", "fp32", "--out", str(train_json)],
             lambda out: train_rows(json.loads(train_json.read_text()))),
            ("precompute", "bench_precompute.py", ["--images", "256" if args.quick else "512", "--workers", "1"],
             precompute_rows),
            ("sample", "bench_sample.py", ["--threads", t, "--sizes", "tiny" if args.quick else "tiny,base",
                                           "--batch", "4", "--num-iter", "16"], sample_rows),
        ]
        info = machine_info()
        load0 = os.getloadavg()
        rows: list[Row] = []
        for name, script, tool_args, read in plan:
            if name in args.skip:
                continue
            if not (TOOLS / script).is_file():
                rows.append((name, f"tools/{script}", "not run", "script not found"))
                continue
            print(f"bench: {script} {' '.join(tool_args)}", file=sys.stderr, flush=True)
            status, out, seconds = run_tool(script, tool_args, args.threads, args.timeout)
            try:
                got = read(out) if status == 0 else []
            except (OSError, ValueError, KeyError) as e:
                got, status = [], f"unreadable output ({e})"
            if not got:
                print(f"bench: {script} gave no figures (status {status}); its last lines:\n"
                      + "\n".join(out.splitlines()[-15:]), file=sys.stderr, flush=True)
                rows.append((name, f"tools/{script}", "failed", f"status {status}"))
            rows += got
            rows.append((name, "benchmark wall time", f"{seconds:.0f} s", ""))
        load1 = os.getloadavg()
    head = (f"CPU: {info['cpu']}, {args.threads} threads per benchmark ({info['cores usable']} cores usable), "
            f"torch {info['torch']}, GPU: {info['gpu']}; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at "
            f"the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    text = head + "\n\n" + markdown_table(["benchmark", "figure", "value", "measured in the same run"], rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
