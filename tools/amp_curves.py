"""Loss curves of the demo recipe under fp32, amp_bf16 and bf16 (a measurement, not a test).

    python tools/amp_curves.py [--steps 300] [--work /tmp/amp] [--figure docs/amp_curves.png]

Makes the demo latents once (`python -m tb_train precompute --config precompute_demo input=demo:WORK/images
output=WORK/latents`: all 1,797 digits through the shipped demo VAE), then trains the demo recipe
(`--config demo`: tiny model, ZeRO-2, batch 64, lr 2e-3, same seed and data order) for `--steps` steps
in each precision, one fresh `tb-train` process after the other, with nothing else in the job (no sample
grids, no evaluation, one checkpoint at the end) so that the step times are the training's own. The
curves are read back from each run's TensorBoard event files, as a user would see them; the figure
has the three loss curves and each curve's difference from fp32 (the curves themselves overlap).
Printed: the machine, the load average before and after, and a markdown table per precision of the final
loss (the mean of the last logged interval), the step time over the logged intervals after the first
(which holds the start-up) as the best interval and the median one, and the wall time of the process. On
a shared machine the best interval is the figure to compare: another job's burst slows whichever run is
going at the time, the median shows by how much. (MFU is left out: its peak is a GEMM timed at each run's
start, under whatever load there was.)

The runs share a seed, so the curves differ only by precision; how much of a difference is seed noise
is not measured here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tb_core.launcher import child_env
from tb_core.measure import machine_info, markdown_table

PRECISIONS = ("fp32", "amp_bf16", "bf16")
COLORS = {"fp32": "tab:blue", "amp_bf16": "tab:orange", "bf16": "tab:green"}
LOG_EVERY = 10


def bf16_isa() -> str:
    """The CPU's bf16 instructions as /proc/cpuinfo names them: without them (AVX2 only) a bf16 GEMM is
    emulated and ~20x slower than fp32; with AVX512-BF16 or AMX it is native."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return ", ".join(sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16")})) or "none (bf16 emulated)"


def run_job(args: list[str]) -> float:
    """`python -m tb_train JOB ...` in a child process; -> its wall time in seconds. Raises on failure."""
    env = child_env()
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "tb_train", *args], env=env).returncode
    if status != 0:
        raise SystemExit(f"amp_curves: `{' '.join(args[:3])} ...` exited with status {status}")
    return time.perf_counter() - t0


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The step-axis scalars of one TensorBoard folder -> {tag: [(step, value), ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def train(work: Path, precision: str, steps: int) -> dict:
    """One fresh run of the demo recipe in `precision`; -> its loss curve and figures."""
    run_dir = work / "runs" / precision
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous run's checkpoint would be resumed, not measured
    wall = run_job(["train", "--config", "demo", f"data.path={work / 'latents'}", f"run.dir={run_dir}",
                    f"engine.precision={precision}", f"run.max_steps={steps}", f"metrics.log_every={LOG_EVERY}",
                    "metrics.image_every=0", "eval.every_steps=0", f"checkpoint.every_steps={steps}"])
    scalars = read_scalars(run_dir / "tensorboard")
    loss = scalars["loss"]
    step_times = [v for _, v in scalars["perf/step_time_s"][1:]]
    return {"loss": loss, "final": loss[-1][1], "best": min(step_times), "median": statistics.median(step_times),
            "wall": wall}


def figure(results: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    curves, diffs = fig.subplots(1, 2)
    base = dict(results["fp32"]["loss"])
    for precision, r in results.items():
        steps, values = zip(*r["loss"])
        curves.plot(steps, values, label=precision, color=COLORS[precision], lw=1.2)
        if precision != "fp32":
            diffs.plot(steps, [v - base[s] for s, v in r["loss"]], label=f"{precision} - fp32",
                       color=COLORS[precision], lw=1.2)
    curves.set_title(f"demo recipe: training loss (mean of each {LOG_EVERY} steps)", fontsize=10)
    curves.set_ylabel("loss (nats per channel)")
    diffs.set_title("difference from the fp32 run (same seed and data order)", fontsize=10)
    diffs.axhline(0.0, color="grey", lw=0.8)
    for ax in (curves, diffs):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Demo-recipe loss curves in fp32, amp_bf16 and bf16.")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per precision")
    p.add_argument("--work", type=Path, default=Path("/tmp/amp"), help="demo images, latents and the runs")
    p.add_argument("--figure", type=Path, default=Path("docs/amp_curves.png"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    run_job(["precompute", "--config", "precompute_demo", f"input=demo:{args.work / 'images'}",
             f"output={args.work / 'latents'}"])   # resumable: a finished folder is kept as it is
    results = {precision: train(args.work, precision, args.steps) for precision in PRECISIONS}
    figure(results, args.figure)
    load_after = os.getloadavg()

    info = machine_info()
    info.pop("load average (1/5/15 min)", None)
    info["bf16 instructions"] = bf16_isa()
    print("\n" + "; ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{args.steps} steps per precision; total {time.perf_counter() - t0:.0f} s; figure {args.figure}\n")
    rows = [[precision, f"{r['final']:.4f}", f"{r['final'] - results['fp32']['final']:+.4f}",
             f"{r['best']:.3f}", f"{r['median']:.3f}", f"{r['wall']:.0f} s"]
            for precision, r in results.items()]
    print(markdown_table(["precision", f"final loss (steps {args.steps - LOG_EVERY + 1}-{args.steps})",
                          "vs fp32", "s/step (best)", "s/step (median)", "process wall time"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
