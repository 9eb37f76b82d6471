"""Per-rank memory of training: the analytic figure of each part next to the measured peak per rank.

    python tools/bench_memory.py --out /tmp/tb_mem [--measure tiny:1:0 tiny:2:3 base:1:0 base:2:3]
        [--rehearsal /tmp/tb_L/rehearsal.json]

1. Analytic (`tb_train.engine.memory.estimate`, formulas in its docstring), without allocating anything:
   L and H of the ImageNet recipes (bf16, 16x16x16 latents, the recipes' micro-batches) at 8 and 32 ranks,
   ZeRO stages 0-3, with and without activation checkpointing; which stage fits an 80 GB and a 141 GB GPU.
2. Measured: real `tb-train` runs (2 steps, fp32, micro-batch 1, data workers 1) on the demo's digit
   latents (8x8x4, 10 classes, written by `tb-demo`) for each SIZE:WORLD:STAGE given; the peak
   resident memory of every rank process is polled from /proc (`tb_core.measure.RankPeakMemory`), and the
   runtime's own footprint (python + torch + DeepSpeed + gloo, measured in a process that imports them and
   builds nothing) is subtracted, so "measured" is what the run added. The analytic figure is computed for
   the same model, stage, world and precision. The L row at world 2 comes from tools/rehearse_L.py's
   output (`--rehearsal`), which measures it the same way during its 8-step run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tb_core.measure import RankPeakMemory, descendants, machine_info, markdown_table  # noqa: E402
from tb_model.config import ModelConfig  # noqa: E402
from tb_train.engine.memory import estimate  # noqa: E402

GIB = 2 ** 30
GPUS = {"80 GB": 80e9, "141 GB": 141e9}
RECIPE_MICRO_BATCH = {"L": 64, "H": 32}   # tb_train/configs/jobs/imagenet256_{L,H}.yaml data.micro_batch
DEMO_SHAPE = dict(latent_size=8, latent_channels=4, num_classes=10)
# ZeRO-3 on a CPU rank: gathered weights bounded to 50M elements (200 MB fp32) instead of DeepSpeed's 1e9,
# which lets a recomputing backward keep the whole model gathered (+1.8 GiB per rank at L; memory.py)
LIVE_LIMIT = ["engine.ds_overrides.zero_optimization.stage3_max_live_parameters=50000000",
              "engine.ds_overrides.zero_optimization.stage3_max_reuse_distance=50000000"]
STEP_LINE = re.compile(r"^step (\d+) \|.*\| mem ")


def demo_latents(out: Path) -> Path:
    """The demo's precomputed digit latents: `tb-demo --out OUT` (or its --smoke) writes OUT/latents."""
    latents = out / "latents"
    if not (latents / "manifest.json").is_file():
        raise SystemExit(f"{latents}: no precomputed latents; run `tb-demo --out {out} --smoke` first")
    return latents


def runtime_rss() -> int:
    """Resident bytes of a process that imported what a rank imports and joined a 1-rank gloo group."""
    code = ("import os, torch, deepspeed, tb_train.train.job as j; from tb_train.dist import init_distributed;"
            "init_distributed(); print('RSS', [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return int(out.split("VmRSS:")[1].split()[0]) * 1024


def train_overrides(size: str, stage: int, world: int, steps: int, ckpt: str, run_dir: Path, latents: Path,
                    every: int = 0) -> list[str]:
    """tb-train's overrides for a memory run: the demo job, `size`, ZeRO `stage`, fp32, micro-batch 1."""
    return [f"data.path={latents}", f"run.dir={run_dir}", "data.micro_batch=1", "data.num_workers=1",
            # the demo job shrinks the head and drops dropout for tiny: the preset's values for real sizes
            f"model.size={size}", "model.head_depth=null", "model.dropout=0.1", "model.attn_dropout=0.1",
            f"engine.deepspeed=zero{stage}", *(LIVE_LIMIT if stage == 3 else []), "engine.precision=fp32",
            f"engine.global_batch={world}", "engine.grad_accum=1", f"engine.activation_checkpointing={ckpt}",
            "eval.every_steps=0", "metrics.log_every=1", "metrics.image_every=0",
            f"checkpoint.every_steps={every}", "checkpoint.keep_last=1", f"run.max_steps={steps}"]


def kill_job(root: int) -> None:
    """SIGKILL the launcher and every process below it, as a node failure would. Not the launcher's process
    group: torchrun starts each rank in a session of its own, so killing the group left the ranks running
    (they finished the job and wrote its last checkpoint)."""
    for _ in range(2):  # a second pass catches a process started while the first one was killing
        for pid in [root, *descendants(root)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _lines_until_exit(proc: subprocess.Popen, grace_s: float = 10.0) -> Iterator[str]:
    """The launcher's output lines until it has exited. A process of the job that outlives the launcher
    (seen: a rank's data-loader forkserver after the other rank was OOM-killed) still holds the pipe, so
    EOF alone can wait for ever: once the launcher is gone what is left below it is killed, and reading stops
    `grace_s` later in any case."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    exited_at = None
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:
            return
        if line:
            yield line
        elif proc.poll() is not None:
            if exited_at is None:
                exited_at = time.monotonic()
                kill_job(proc.pid)
            elif time.monotonic() - exited_at > grace_s:
                return


def launch_train(overrides: list[str], world: int, log: Path, kill_after_step: int | None = None) -> dict:
    """tb-train --config demo with `overrides` on `world` ranks (torchrun), in its own process group.
    Returns {"exit": code, "peaks": {rank: bytes}, "workers": {rank: bytes}, "seconds": wall, "killed": bool};
    with kill_after_step the whole job is SIGKILLed as soon as that step's log line appears."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    if world == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29600 + os.getpid() % 1000))
    cmd = [sys.executable, *launcher, "-m", "tb_train.train", "--config", "demo", *overrides]
    started, killed = time.monotonic(), False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        with RankPeakMemory(proc.pid) as mem:
            for line in _lines_until_exit(proc):
                f.write(line)
                f.flush()
                m = STEP_LINE.match(line)
                if m:
                    print(f"    {line.strip()}", flush=True)
                    if kill_after_step is not None and int(m.group(1)) >= kill_after_step:
                        mem.poll()
                        kill_job(proc.pid)
                        killed = True
            code = proc.wait()
    return {"exit": code, "peaks": mem.ranks, "workers": mem.workers, "seconds": time.monotonic() - started,
            "killed": killed}


def analytic_rows() -> list[list[str]]:
    rows = []
    for size in ("L", "H"):
        cfg = ModelConfig(size=size)
        for world in (8, 32):
            for ckpt in ("none", "full"):
                for stage in (0, 1, 2, 3):
                    e = estimate(cfg, stage, world, "bf16", RECIPE_MICRO_BATCH[size], ckpt)
                    g = e.as_gib()
                    fits = [name for name, cap in GPUS.items() if e.total <= cap * 0.9]
                    rows.append([size, world, RECIPE_MICRO_BATCH[size], ckpt, stage, *(f"{g[k]:.1f}" for k in (
                        "params", "masters", "grads", "optimizer", "ema", "zero_buffers", "activations", "optimizer_step",
                        "total")),
                        ", ".join(fits) or "neither"])
    return rows


def run_estimate(size: str, world: int, stage: int, ckpt: str):
    """The analytic figure of a measured run (same model, stage, world, precision and ZeRO limits)."""
    zero = None
    if stage == 3:
        from tb_train.engine.engine import EngineConfig, deepspeed_config
        from tb_train.engine.optim import OptimConfig
        zero = deepspeed_config(EngineConfig(deepspeed="zero3", precision="fp32"), OptimConfig(), 1,
                                world)["zero_optimization"]
        zero.update({item.split("=")[0].rsplit(".", 1)[1]: float(item.split("=")[1]) for item in LIVE_LIMIT})
    return estimate(ModelConfig(size=size, **DEMO_SHAPE), stage, world, "fp32", 1, ckpt, zero=zero)


def measured_row(size: str, world: int, stage: int, ckpt: str, result: dict, runtime: int,
                 label: str | None = None) -> list[str]:
    e = run_estimate(size, world, stage, ckpt)
    peak = max(result["peaks"].values())
    added = peak - runtime
    return [label or size, world, stage, ckpt, f"{e.state / GIB:.2f}", f"{e.total / GIB:.2f}", f"{peak / GIB:.2f}",
            f"{added / GIB:.2f}", f"{added / e.total:.2f}",
            f"{max(result['workers'].values(), default=0) / GIB:.2f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="scratch folder (demo latents, runs, logs)")
    p.add_argument("--measure", nargs="*", default=["tiny:1:0", "tiny:2:3", "base:1:0", "base:2:3"],
                   metavar="SIZE:WORLD:STAGE", help="tb-train runs to measure (2 steps each)")
    p.add_argument("--rehearsal", type=Path, help="tools/rehearse_L.py's rehearsal.json: its measured L row")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("machine:", json.dumps(machine_info()), flush=True)

    print("\n## Analytic per-rank GiB, ImageNet recipes (bf16, 16x16x16 latents); 'fits' = total <= 90% of\n")
    header = ["size", "world", "micro-batch", "act. ckpt", "stage", "params", "masters", "grads", "Adam",
              "EMA", "ZeRO buffers", "activations", "opt. step", "total", "fits"]
    print(markdown_table(header, analytic_rows()), flush=True)

    latents = demo_latents(args.out)
    runtime = runtime_rss()
    print(f"\nruntime footprint of a rank (imports + gloo, nothing built): {runtime / GIB:.2f} GiB", flush=True)
    rows = []
    for spec in args.measure:
        size, world, stage = spec.split(":")
        world, stage = int(world), int(stage)
        ckpt = "full" if size in ("L", "H") else "none"
        run_dir = args.out / f"run_{size}_{world}_{stage}"
        print(f"\n{size} world {world} ZeRO-{stage} (2 steps) ...", flush=True)
        result = launch_train(train_overrides(size, stage, world, 2, ckpt, run_dir, latents), world,
                              args.out / f"{run_dir.name}.log")
        if result["exit"] != 0:
            print(f"{spec}: tb-train exited {result['exit']}; see {args.out / (run_dir.name + '.log')}")
            return 1
        rows.append(measured_row(size, world, stage, ckpt, result, runtime))
    if args.rehearsal and args.rehearsal.is_file():
        rec = json.loads(args.rehearsal.read_text())
        rows.append(measured_row("L", rec["world"], rec["stage"], rec["ckpt"], rec["memory"], rec["runtime_rss"],
                                 label="L (tools/rehearse_L.py)"))
    print("\n## Measured per rank (fp32, micro-batch 1, demo latents 8x8x4), GiB; 'added' = peak - runtime\n")
    print(markdown_table(["size", "world", "stage", "act. ckpt", "analytic state", "analytic total",
                          "measured peak RSS (max rank)", "added by the run", "added / analytic",
                          "data worker peak"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
