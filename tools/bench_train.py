"""Training benchmark (a measurement, not a test): MFU, activation-checkpointing cost, ZeRO memory per rank.

Runs the real training engine (tb_train.engine.engine.build_engine: DeepSpeed, AdamW, EMA) on random latents,
each configuration in a fresh subprocess so that its memory figures are its own:

1. checkpointing none / full / every_2 × fp32 / bf16 × `--compile off on` (`engine.compile`, torch.compile
   per block, backend `--compile-backend`), one process, ZeRO stage 0 (`--ckpt-stage`):
   step time; model FLOP/s (model.flops_per_sample() × samples / step time, recomputation not counted)
   ÷ the GEMM FLOP/s of the same dtype measured in the same process (tb_train.train.logger.measure_peak_flops);
   activation memory = RSS after a training-mode forward (graph alive) − RSS before it; step peak =
   highest RSS during a step − RSS before it (activations + gradients + temporaries). Compiled runs warm
   up until a step compiles nothing (the second masked count makes the blocks' shapes dynamic), and report
   that compile time (and any compilation during the timed steps). One extra step under torch.profiler
   gives the share of the step spent in GEMMs (mm/addmm/bmm/baddbmm): compile does not make a GEMM faster
   (inductor calls the same BLAS), so 1 / GEMM share bounds the speed-up it can buy.
2. ZeRO stage 0 / 1 / 2 / 3 at 2 ranks (gloo): bytes per rank of the parameter storage the rank holds
   (its partition under stage 3), the optimizer's own parameter copies (fp32 masters where DeepSpeed keeps
   them), the optimizer state (Adam moments) and the EMA, after one step; plus RSS growth since before
   the model was built.

RSS is read from /proc/self/status (VmRSS, VmHWM; VmHWM reset through /proc/self/clear_refs) with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and RSS follows live memory.
Usage: python tools/bench_train.py [--size base] [--micro-batch 2] [--steps 2] [--out bench.json]
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

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "
POLICIES = {"none": ("none", 1), "full": ("full", 1), "every_2": ("every_k", 2)}
GIB = 2 ** 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base", help="model preset for parts 1 and 2")
    p.add_argument("--latent-size", type=int, default=16, help="latent grid side (16 = 256 px with KL-16)")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ModelConfig overrides for part 1, e.g. encoder_depth=2 (width stays the preset's)")
    p.add_argument("--zero-model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ModelConfig overrides for part 2, e.g. latent_size=2 buffer_size=1 (cheap steps, "
                        "same weight matrices)")
    p.add_argument("--micro-batch", type=int, default=2, help="images per step in part 1")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the part-1 process")
    p.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--compile", nargs="*", default=["off"], choices=["off", "on"],
                   help="part 1 without and/or with engine.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile on")
    p.add_argument("--ckpt-stage", type=int, default=0, help="ZeRO stage of part 1")
    p.add_argument("--zero-stages", nargs="*", type=int, default=[0, 1, 2, 3], help="part 2; none = skip")
    p.add_argument("--zero-dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--zero-micro-batch", type=int, default=1)
    p.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    p.add_argument("--out", default=None, help="also write all results as JSON here")
    p.add_argument("--worker", choices=["ckpt", "zero"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="none", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- process memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


# ----------------------------------------------------------------------------- workers

_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _model_config(args: argparse.Namespace, items: list[str]):
    """The bench model: `--size` and `--latent-size` plus KEY=VALUE items, read by the jobs' config loader
    (tb_core.config: unknown keys and wrong types are one-line errors)."""
    from tb_core.config import from_dict, parse_overrides
    from tb_model.config import ModelConfig, resolve

    data = {"size": args.size, "latent_size": args.latent_size, **parse_overrides(items)}
    return resolve(from_dict(ModelConfig, data, source="bench_train --model/--zero-model", prefix="model"))


def _engine(args: argparse.Namespace, stage: int, dtype: str, policy: str, micro_batch: int,
            model_items: list[str], compiled: bool = False):
    from tb_model.registry import create
    from tb_train.dist import init_distributed
    from tb_train.engine.compile import CompileConfig
    from tb_train.engine.engine import EngineConfig, build_engine
    from tb_train.engine.optim import OptimConfig

    model_cfg = _model_config(args, model_items)
    dist = init_distributed()
    policy_name, k = POLICIES[policy]
    cfg = EngineConfig(deepspeed=f"zero{stage}", precision=dtype, activation_checkpointing=policy_name,
                       checkpoint_k=k, compile=CompileConfig(enabled=compiled, backend=args.compile_backend))
    rss_before_model = rss_bytes()
    engine = build_engine(lambda: create(model_cfg), cfg, OptimConfig(), micro_batch, dist)
    return dist, engine, rss_before_model


def _batch(engine, micro_batch: int, step: int, micro_id: int):
    import torch
    from tb_train.engine.engine import MicroInput
    from tb_train.engine.rng import MODEL_STREAM, NOISE_STREAM, derive_seed

    cfg = engine.module.config
    g = torch.Generator().manual_seed(derive_seed(0, step, micro_id, NOISE_STREAM))
    latents = torch.randn(micro_batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (micro_batch,), generator=g)
    return MicroInput(latents, labels, derive_seed(0, step, micro_id, MODEL_STREAM))


# aten ops whose time is GEMM work: the model's matmuls and, with attention dropout on (training), the
# attention's two batched matmuls (SDPA's math path); inductor leaves them to the BLAS library too
# (extern kernels). Everything else is what compiling can fuse or remove.
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def _gemm_share(engine, mb) -> float:
    """One step under torch.profiler: the fraction of its wall time spent in GEMMs (self CPU time of
    those ops on the stepping thread; intra-op threads work inside them)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step([mb], lr=1e-4)
    wall_us = (time.perf_counter() - t0) * 1e6
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return sum(self_us.get(k, 0.0) for k in GEMM_OPS) / wall_us


def _warm_up(engine, b: int, compiled: bool) -> tuple[int, float]:
    """Steps until one compiles nothing (uncompiled: one step, for the optimizer state and gradients);
    returns (warm-up steps, seconds spent compiling)."""
    from tb_train.engine.compile import compile_clock

    clock = compile_clock()
    for step in range(8):
        graphs = clock.graphs
        engine.step([_batch(engine, b, -1 - step, 0)], lr=1e-4)
        _progress(f"warm-up step {step + 1} done ({clock.graphs - graphs} compilations)")
        if not compiled or (step and clock.graphs == graphs):
            return step + 1, clock.seconds
    raise RuntimeError(f"still compiling after 8 warm-up steps ({clock.graphs} compilations)")


def ckpt_worker(args: argparse.Namespace) -> dict:
    """Part 1, one process: step time, MFU against this process's GEMM peak, activation memory."""
    import torch
    from tb_train.dist import shutdown
    from tb_train.engine.compile import compile_clock
    from tb_train.train.logger import measure_peak_flops

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gemm = measure_peak_flops(dtype, device="cpu")
    _progress(f"GEMM {gemm / 1e9:.0f} GFLOP/s")
    dist, engine, _ = _engine(args, args.ckpt_stage, args.dtype, args.policy, args.micro_batch, args.model,
                              args.compiled)
    _progress("engine built")
    b = args.micro_batch
    warm_steps, compile_s = _warm_up(engine, b, args.compiled)
    compiled_before = compile_clock().graphs
    times, step_peaks = [], []
    for s in range(1, args.steps + 1):
        mb = _batch(engine, b, s, 0)
        before = rss_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        engine.step([mb], lr=1e-4)
        times.append(time.perf_counter() - t0)
        step_peaks.append(peak_rss_bytes() - before)
        _progress(f"step {s}: {times[-1]:.2f} s")
    timed_compilations = compile_clock().graphs - compiled_before
    gemm_share = _gemm_share(engine, _batch(engine, b, args.steps + 1, 0))
    mb = _batch(engine, b, args.steps + 2, 0)
    torch.manual_seed(mb.seed)
    engine.ds.train()
    before = rss_bytes()
    out = engine.ds(mb.latents.to(dtype), mb.labels)
    activations = rss_bytes() - before
    del out
    step_time = sum(times) / len(times)
    flops = engine.module.flops_per_sample() * b / step_time
    shutdown()
    return {"dtype": args.dtype, "policy": args.policy, "compiled": args.compiled, "micro_batch": b,
            "step_time_s": step_time, "warm_up_steps": warm_steps, "compile_s": compile_s,
            "timed_compilations": timed_compilations, "gemm_share": gemm_share,
            "model_flops": flops, "gemm_flops": gemm, "mfu_vs_gemm": flops / gemm,
            "activation_bytes": activations, "step_peak_bytes": max(step_peaks),
            "process_peak_bytes": _status_kib("VmPeak") * 1024}


def _storage_key(t) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


# Where DeepSpeed's optimizer wrappers keep the fp32 master weights of this rank (BF16_Optimizer, ZeRO 1/2,
# ZeRO 3); the innermost torch optimizer holds them in param_groups only while it steps.
MASTER_ATTRS = ("fp32_groups_flat_partition", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _optimizer_chain(opt) -> list:
    """The DeepSpeed wrapper(s) down to the torch optimizer, outermost first."""
    import torch

    chain = [opt]
    while not isinstance(chain[-1], torch.optim.Optimizer) and hasattr(chain[-1], "optimizer"):
        chain.append(chain[-1].optimizer)
    return chain


def _tensors_in(value, depth: int = 2):
    """Tensors directly in `value` or nested in lists/tuples/dicts up to `depth` levels."""
    import torch

    if torch.is_tensor(value):
        yield value
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth - 1)
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)


def zero_worker(args: argparse.Namespace) -> dict:
    """Part 2, one rank of two: bytes of parameters / optimizer copies / optimizer state / EMA held here."""
    import torch
    from tb_train.dist import shutdown

    torch.set_num_threads(1)
    dist, engine, rss_before_model = _engine(args, args.stage, args.dtype, "none", args.zero_micro_batch,
                                             args.zero_model)
    engine.step([_batch(engine, args.zero_micro_batch, 0, dist.rank)], lr=1e-4)
    counted: set[tuple[int, int]] = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if t.numel() and key not in counted:
                counted.add(key)
                total += key[1]
        return total

    params = add(getattr(p, "ds_tensor", p.data) for p in engine.module.parameters())
    chain = _optimizer_chain(engine.ds.optimizer)
    wrappers, opt = chain[:-1], chain[-1]
    masters = add(t for w in wrappers for a in MASTER_ATTRS for t in _tensors_in(getattr(w, a, None)))
    masters += add(p for g in opt.param_groups for p in g["params"])
    state = add(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    ema = add(s.ema for s in engine.ema.slots if s.ema is not None)
    buffers = add(t for w in wrappers for v in vars(w).values() for t in _tensors_in(v))
    result = {"stage": args.stage, "dtype": args.dtype, "rank": dist.rank, "param_bytes": params,
              "master_bytes": masters, "optim_state_bytes": state, "ema_bytes": ema, "other_optimizer_bytes": buffers,
              "rss_growth_bytes": rss_bytes() - rss_before_model,
              "num_params": sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel())
                                for p in engine.module.parameters())}
    shutdown()
    return result


# ----------------------------------------------------------------------------- driver

def _launch(worker_args: list[str], envs: list[dict], timeout: int) -> list[dict]:
    """Start one process per env (the ranks of one configuration); collect each one's result line."""
    procs, logs = [], []
    for extra in envs:
        env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)
        log = tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen([sys.executable, __file__, *worker_args], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
        logs.append(log)
    deadline = time.monotonic() + timeout
    results = []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
        log.seek(0)
        out = log.read()
        log.close()
        lines = [line[len(MARK):] for line in out.splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(out.splitlines()[-25:])
            raise RuntimeError(f"bench worker {' '.join(worker_args)} failed or exceeded {timeout} s "
                               f"(exit {proc.returncode}):\n{tail}")
        results.append(json.loads(lines[-1]))
    return results


def _common_args(args: argparse.Namespace) -> list[str]:
    return ["--size", args.size, "--latent-size", str(args.latent_size), "--micro-batch", str(args.micro_batch),
            "--steps", str(args.steps), "--threads", str(args.threads), "--ckpt-stage", str(args.ckpt_stage),
            "--zero-micro-batch", str(args.zero_micro_batch), "--compile-backend", args.compile_backend,
            "--model", *args.model,
            "--zero-model", *args.zero_model]


def run_ckpt(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype in args.dtypes:
        for policy in args.policies:
            for compiled in args.compile:
                worker = ["--worker", "ckpt", "--dtype", dtype, "--policy", policy, *_common_args(args),
                          *(["--compiled"] if compiled == "on" else [])]
                env = {"OMP_NUM_THREADS": str(args.threads)}
                (row,) = _launch(worker, [env], args.timeout)
                rows.append(row)
                print(f"  ckpt {dtype} {policy} compile {compiled}: {row['step_time_s']:.2f} s/step",
                      file=sys.stderr, flush=True)
    return rows


def run_zero(args: argparse.Namespace) -> list[dict]:
    rows = []
    for stage in args.zero_stages:
        from tb_train.dist import free_port  # the driver itself stays free of torch until here
        port = str(free_port())
        envs = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"} for r in range(2)]
        worker = ["--worker", "zero", "--stage", str(stage), "--dtype", args.zero_dtype, *_common_args(args)]
        rows += _launch(worker, envs, args.timeout)
        print(f"  zero {stage} done", file=sys.stderr, flush=True)
    return rows


def compile_speedup(row: dict, rows: list[dict]) -> float | None:
    """Uncompiled / compiled step time of the same dtype and policy (None for an uncompiled row or
    when its uncompiled twin was not run)."""
    twin = [r for r in rows if (r["dtype"], r["policy"], r["compiled"]) == (row["dtype"], row["policy"], False)]
    return twin[0]["step_time_s"] / row["step_time_s"] if row["compiled"] and twin else None


def format_ckpt(rows: list[dict]) -> str:
    lines = ["| dtype | ckpt | compile | s/step | time × none | compiled speed-up | compile s | model GFLOP/s "
             "| GEMM GFLOP/s | MFU vs GEMM | GEMM share | bound 1/GEMM share "
             "| activations GiB | act × none | step peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["dtype"], r["compiled"]): r for r in rows if r["policy"] == "none"}
    for r in rows:
        ref = base.get((r["dtype"], r["compiled"]))
        t_ratio = f"{r['step_time_s'] / ref['step_time_s']:.2f}" if ref else "-"
        a_ratio = f"{r['activation_bytes'] / ref['activation_bytes']:.2f}" if ref else "-"
        speedup = compile_speedup(r, rows)
        speedup_text = f"{speedup:.2f}×" if speedup else "-"
        compile_text = f"{r['compile_s']:.0f} (+{r['timed_compilations']} timed)" if r["compiled"] else "-"
        lines.append(f"| {r['dtype']} | {r['policy']} | {'on' if r['compiled'] else 'off'} | {r['step_time_s']:.2f} "
                     f"| {t_ratio} | {speedup_text} | {compile_text} "
                     f"| {r['model_flops'] / 1e9:.1f} | {r['gemm_flops'] / 1e9:.1f} | {r['mfu_vs_gemm']:.1%} "
                     f"| {r['gemm_share']:.0%} | {1 / r['gemm_share']:.2f}× "
                     f"| {r['activation_bytes'] / GIB:.2f} | {a_ratio} | {r['step_peak_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def format_zero(rows: list[dict]) -> str:
    lines = ["| ZeRO | dtype | rank | params GiB | optimizer copies GiB | Adam state GiB | EMA GiB "
             "| params+optimizer GiB | × stage 0 | other optimizer buffers GiB | RSS growth GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    total = {(r["stage"], r["rank"]): r["param_bytes"] + r["master_bytes"] + r["optim_state_bytes"] for r in rows}
    for r in rows:
        t = total[(r["stage"], r["rank"])]
        ref = total.get((0, r["rank"]))
        ratio = f"{t / ref:.2f}" if ref else "-"
        lines.append(f"| {r['stage']} | {r['dtype']} | {r['rank']} | {r['param_bytes'] / GIB:.3f} "
                     f"| {r['master_bytes'] / GIB:.3f} | {r['optim_state_bytes'] / GIB:.3f} | {r['ema_bytes'] / GIB:.3f} "
                     f"| {t / GIB:.3f} | {ratio} | {r['other_optimizer_bytes'] / GIB:.3f} "
                     f"| {r['rss_growth_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    if args.worker:
        result = ckpt_worker(args) if args.worker == "ckpt" else zero_worker(args)
        print(MARK + json.dumps(result), flush=True)
        return 0
    _model_config(args, args.model)       # bad --model/--zero-model items fail here, before any worker starts
    _model_config(args, args.zero_model)
    t0 = time.time()
    ckpt = run_ckpt(args) if args.dtypes and args.policies else []
    zero = run_zero(args) if args.zero_stages else []
    load = os.getloadavg()
    if ckpt:
        print(f"\nActivation checkpointing, engine.compile and MFU ({args.size} {' '.join(args.model)}, "
              f"latent {args.latent_size}, micro-batch {args.micro_batch}, {args.threads} threads, "
              f"ZeRO {args.ckpt_stage}, compile backend {args.compile_backend}):\n" + format_ckpt(ckpt))
    if zero:
        n = zero[0]["num_params"]
        print(f"\nZeRO memory per rank at 2 ranks ({args.size} {' '.join(args.zero_model)}, {n / 1e6:.1f}M params, "
              f"{args.zero_dtype}):\n"
              + format_zero(zero))
    print(f"\nwall {time.time() - t0:.0f} s; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "ckpt": ckpt, "zero": zero}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from tb_train.cli import run_main

    args = parse_args(argv)
    return run_main("bench_train", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
