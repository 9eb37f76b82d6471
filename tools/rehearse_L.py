"""Scale rehearsal: the real L model (486M parameters) trains, checkpoints, is killed and resumes exactly on
this 2-core 24 GB machine — ZeRO-3, activation checkpointing, fp32, 2 CPU ranks, micro-batch 1.

    python tools/rehearse_L.py --out /tmp/tb_L [--steps 8] [--kill-after 6] [--every 5]

On the demo's digit latents (8x8x4, 10 classes; the L preset's weights are the same as at 16x16x16 except
for the input/output projections and position tables), three tb-train runs of the same job:
1. reference: `--steps` steps uninterrupted;
2. interrupted: a checkpoint every `--every` steps; the whole job is SIGKILLed (like a node failure) as soon
   as step `--kill-after` is logged, i.e. after the checkpoint and before the next one;
3. the same command again: it resumes from the last checkpoint and runs to `--steps`.
Printed: each step's loss (TensorBoard's float32, read back) of the reference and of the interrupted +
resumed run, which must be equal; per-rank peak resident memory of every run (polled from /proc) against
the analytic figure (`tb_train.engine.memory.estimate`) plus the runtime's own footprint; seconds per step;
time to the first step of each start. Exit status 1 if a loss differs or a run fails. The result is also
written to <out>/rehearsal.json (tools/bench_memory.py --rehearsal reads its memory row).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import GIB, demo_latents, launch_train, run_estimate, runtime_rss, train_overrides  # noqa: E402
from tb_core.measure import machine_info, markdown_table  # noqa: E402
from tb_core.runlock import LOCK_NAME  # noqa: E402
from tb_train.engine.checkpoint import read_latest  # noqa: E402

WORLD, STAGE, CKPT = 2, 3, "full"


def losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in ea.Scalars("loss")}


def lock_holders(lock: Path) -> list[str]:
    """'pid cmdline' of every process with `lock` open (scanned from /proc/*/fd)."""
    out = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(lock):
                pid = fd.parent.parent.name
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
                out.append(f"{pid} {cmd}")
    return sorted(set(out))


def wait_unlocked(run_dir: Path, timeout: float = 180.0) -> float:
    """Seconds until the killed job's run lock (tb_core.runlock, a kernel flock) is free. A SIGKILLed rank
    lets go of it only when the kernel has torn the process down; a restart before that fails at once with
    'another job writes here', which is the lock doing its job, so the rehearsal waits instead."""
    lock, t0 = run_dir / LOCK_NAME, time.monotonic()
    fd = os.open(lock, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return time.monotonic() - t0
            except BlockingIOError:
                if time.monotonic() - t0 > timeout:
                    raise SystemExit(f"{lock}: still locked {timeout:.0f} s after the kill by {lock_holders(lock)}")
                time.sleep(0.2)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=5, help="checkpoint interval of the interrupted run")
    p.add_argument("--kill-after", type=int, default=6, help="SIGKILL the interrupted run once this step is logged")
    p.add_argument("--size", default="L")
    args = p.parse_args(argv)
    if not args.every < args.kill_after < args.steps:
        p.error("need --every < --kill-after < --steps")
    args.out.mkdir(parents=True, exist_ok=True)
    print("machine:", json.dumps(machine_info()), flush=True)
    latents = demo_latents(args.out)
    runtime = runtime_rss()
    starts = []

    def run(name: str, run_dir: Path, every: int, kill_after: int | None = None) -> dict:
        print(f"\n{name}: tb-train {args.size} ZeRO-{STAGE} act-ckpt {CKPT} fp32, {WORLD} ranks, micro-batch 1",
              flush=True)
        result = launch_train(train_overrides(args.size, STAGE, WORLD, args.steps, CKPT, run_dir, latents, every),
                              WORLD, args.out / f"{name}.log", kill_after)
        expected = -9 if kill_after is not None else 0
        if (result["exit"] == 0) != (expected == 0):
            raise SystemExit(f"{name}: tb-train exited {result['exit']}; see {args.out / (name + '.log')}")
        result["name"] = name
        starts.append(result)
        return result

    for d in ("reference", "interrupted"):
        shutil.rmtree(args.out / d, ignore_errors=True)
    t0 = time.monotonic()
    run("reference", args.out / "reference", every=0)
    run("interrupted", args.out / "interrupted", every=args.every, kill_after=args.kill_after)
    latest = read_latest(args.out / "interrupted" / "checkpoints")
    if latest != f"step_{args.every:08d}":
        raise SystemExit(f"interrupted: the kill after step {args.kill_after} did not land (latest checkpoint "
                         f"{latest}, expected step_{args.every:08d})")
    waited = wait_unlocked(args.out / "interrupted")
    print(f"\nrun lock of the killed job free {waited:.1f} s after it was killed; holders then: "
          f"{lock_holders(args.out / 'interrupted' / LOCK_NAME) or 'none'}", flush=True)
    run("resumed", args.out / "interrupted", every=args.every)
    ref, got = losses(args.out / "reference"), losses(args.out / "interrupted")
    steps = list(range(1, args.steps + 1))
    rows = [[s, f"{ref.get(s, float('nan')):.7f}", f"{got.get(s, float('nan')):.7f}",
             "yes" if s in ref and ref.get(s) == got.get(s) else "NO"] for s in steps]
    print("\n## Per-step loss\n")
    print(markdown_table(["step", "reference", "interrupted + resumed", "equal"], rows))

    est = run_estimate(args.size, WORLD, STAGE, CKPT)
    print(f"\n## Memory per rank (GiB); runtime footprint {runtime / GIB:.2f} GiB, analytic {est.total / GIB:.2f} "
          f"(state {est.state / GIB:.2f}, ZeRO buffers {est.zero_buffers / GIB:.2f}, activations "
          f"{est.activations / GIB:.3f}, optimizer step {est.optimizer_step / GIB:.2f})\n")
    mem_rows = []
    for r in starts:
        for rank in sorted(r["peaks"]):
            added = r["peaks"][rank] - runtime
            mem_rows.append([r["name"], rank, f"{r['peaks'][rank] / GIB:.2f}", f"{added / GIB:.2f}",
                             f"{added / est.total:.2f}", f"{r['workers'].get(rank, 0) / GIB:.2f}",
                             f"{r['seconds']:.0f}"])
    print(markdown_table(["run", "rank", "peak RSS", "added by the run", "added / analytic", "data worker peak",
                          "wall s"], mem_rows))
    equal = all(row[3] == "yes" for row in rows)
    worst = max(starts, key=lambda r: max(r["peaks"].values()))
    (args.out / "rehearsal.json").write_text(json.dumps({
        "size": args.size, "world": WORLD, "stage": STAGE, "ckpt": CKPT, "runtime_rss": runtime,
        "memory": {"peaks": worst["peaks"], "workers": worst["workers"]}, "losses_equal": equal,
        "reference": ref, "resumed": got, "wall_s": time.monotonic() - t0}, indent=1))
    print(f"\nlosses equal: {equal}; total wall {time.monotonic() - t0:.0f} s", flush=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
