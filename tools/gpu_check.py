"""The numbers that decide how to train and sample on a GPU, from ONE command on a borrowed GPU.

    python tools/gpu_check.py --out gpu_check.md      # a GPU (one H200: L and H, est. 5-6 min; --budget-s caps it)
    python tools/gpu_check.py --tiny --out x.md       # CPU, tiny model, < 1 min (tests/test_gpu_check.py runs it)

Everything runs through the framework's own pieces: models from `tb_model.registry.create`, activation
checkpointing from `tb_train.engine.activation_ckpt`, MFU against `tb_train.train.logger.measure_peak_flops`
(the vendor's dense bf16 figure on an H100/H200, a measured GEMM elsewhere), sampling through the `Sampler`,
evaluation through the `InceptionExtractor`. In order:

1. Attention backend: the model's own attention modules (the MAR's, and the head's causal qk-normed
   one; forward and backward in training mode) run with SDPA restricted to FLASH, then to EFFICIENT; the
   first that runs is the one named. If neither runs, the script stops with exit status 1: the math
   fallback would make every number below a number about the fallback.
2. Host syncs: how often the host waits for the device during one `Sampler.latents` batch and one
   training forward + backward (mask count drawn beforehand, as a compiled step would). CUDA counts
   torch's sync-debug warnings; a CPU counts the ops that would sync on a GPU (scalar reads, nonzero,
   boolean-mask indexing). 0 is the goal (tests/test_compile.py holds it on CPU).
3. Training step sweep: size x micro-batch x activation checkpointing (none / full) x --train-compile
   (off / on: every block's forward compiled as `engine.compile` does, tb_train.engine.compile; the
   "first step s" column then includes tracing and code generation). A plain torch step,
   not the DeepSpeed engine (one GPU: ZeRO has nothing to shard, and the engine's start-up would eat the
   budget): fp32 weights, forward under bf16 autocast (the engine's `amp_bf16` scheme; the recipes'
   `bf16` keeps bf16 weights with fp32 masters), loss, backward, clip to 1.0, fused AdamW; no EMA. Every
   configuration sees the same mask draws (seeded per step). A CUDA out-of-memory error is reported as
   OOM and the larger micro-batches of that setting are not tried. MFU = flops_per_sample x img/s /
   peak, recomputation not counted (as the training logger does). Peak GiB: the CUDA allocator's peak of
   that configuration; on a CPU the process's peak RSS so far.
4. Sampling img/s: `Sampler.latents` (model only, no VAE decode) with precision "auto" (bf16 on CUDA),
   without and with `sampling.compile`; "first batch" is a 2-image batch of the same settings run before
   the timed one: warm-up, and for compile the tracing and code generation.
5. Inception img/s: `InceptionExtractor` on random-weight files (`write_random_weights`), uint8 256 px,
   and whether TF32 is still on after it (it forces full fp32 inside and restores the caller's setting).

--budget-s is a soft cap: training configurations are skipped (reported as such) once the sweep has used
its share, so that sampling and Inception still run; a compile cannot be interrupted. The report is
rewritten to --out after every section, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tb_core.measure import machine_info, markdown_table, synchronize  # noqa: E402
from tb_model.registry import create  # noqa: E402
from tb_model.tokenbridge import TokenBridge  # noqa: E402
from tb_train.engine.activation_ckpt import apply_activation_checkpointing  # noqa: E402
from tb_train.engine.compile import compile_block_forwards, compile_clock  # noqa: E402
from tb_train.eval.inception import InceptionExtractor, write_random_weights  # noqa: E402
from tb_train.sample.sampler import Sampler, SamplingConfig  # noqa: E402
from tb_train.train.logger import measure_peak_flops, peak_memory_bytes  # noqa: E402

GIB = 2 ** 30
TRAIN_HEADER = ("size", "micro-batch", "activation ckpt", "compile", "first step s", "s/step", "img/s", "MFU",
                "peak GiB")
SAMPLE_HEADER = ("size", "batch", "num_iter", "guidance", "precision", "compile", "first batch s", "img/s",
                 "latents = eager")
TRAIN_SHARE = 0.55  # of --budget-s for the training sweep; the rest is sampling (compile) and Inception


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--tiny", action="store_true",
                   help="CPU-sized run of every part (tiny model, small batches): the test's mode")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--sizes", default=None, help="training sizes (default L,H; --tiny: tiny)")
    p.add_argument("--latent-size", type=int, default=None,
                   help="latent grid side of every model (default the presets' 16 = 256 px; --tiny: 8)")
    p.add_argument("--batches", default=None, help="micro-batches (default 16,32,64,128; --tiny: 2,4,8)")
    p.add_argument("--ckpt", default="none,full", help="activation checkpointing policies")
    p.add_argument("--train-compile", default="off", help="off, on or off,on: the training step also with every "
                   "block's forward compiled as engine.compile does (its first step includes the compile)")
    p.add_argument("--train-compile-backend", default=None,
                   help="torch.compile backend of --train-compile (default inductor; --tiny: aot_eager)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per config (default 2; --tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5; --tiny: 2)")
    p.add_argument("--sample-size", default=None, help="sampling model size (default L; --tiny: tiny)")
    p.add_argument("--sample-batch", type=int, default=None, help="default 256; --tiny: 4")
    p.add_argument("--num-iter", type=int, default=None, help="default 64; --tiny: 4")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--no-compile", action="store_true", help="skip the sampling.compile row")
    p.add_argument("--inception-batch", type=int, default=None, help="default 200; --tiny: 2")
    p.add_argument("--budget-s", type=float, default=None, help="soft time cap (default 330; --tiny: 50)")
    p.add_argument("--fake-oom-above", type=int, default=None, metavar="N",
                   help="raise CUDA's out-of-memory error in every training step with micro-batch > N "
                        "(checks that OOM is reported, not fatal)")
    args = p.parse_args(argv)
    if bad := [c for c in args.train_compile.split(",") if c not in ("off", "on")]:
        p.error(f"--train-compile {args.train_compile}: {bad[0]!r} is not off or on")
    big = dict(sizes="L,H", batches="16,32,64,128", warmup=2, steps=5, sample_size="L", sample_batch=256,
               num_iter=64, inception_batch=200, budget_s=330.0, train_compile_backend="inductor")
    tiny = dict(sizes="tiny", latent_size=8, batches="2,4,8", warmup=1, steps=2, sample_size="tiny",
                sample_batch=4, num_iter=4, inception_batch=2, budget_s=50.0, train_compile_backend="aot_eager")
    for key, value in (tiny if args.tiny else big).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


# -- small helpers --------------------------------------------------------------------------------------
class Deadline:
    """Seconds left of the budget, from when the script started."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def autocast(device: torch.device, precision: str) -> ContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return peak_memory_bytes() / GIB


def build(size: str, args: argparse.Namespace) -> TokenBridge:
    """The model of `size` built directly on the device (its init runs there: seconds for H on a GPU)."""
    overrides = {} if args.latent_size is None else {"latent_size": args.latent_size}
    with torch.device(args.device):
        return create(size, **overrides)


# -- 1. attention backend -------------------------------------------------------------------------------
def attention_backend(model: TokenBridge, device: torch.device, precision: str, training: bool) -> str:
    """The SDPA backend the model's attention runs with in training (dropout, backward) or sampling:
    'flash' or 'efficient' (see module doc, part 1). On a CPU, where the fused kernels have no dropout,
    the math fallback is reported as such instead of stopping the run."""
    cfg = model.config
    cases = [(model.mar.encoder_blocks[0].attn, torch.randn(2, cfg.buffer_size + model.seq_len, cfg.width), False),
             (model.head.blocks[0].attn, torch.randn(8, model.head.steps, cfg.head_width), True)]
    failures = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]), autocast(device, precision), torch.set_grad_enabled(training):
                for attn, x, causal in cases:
                    attn.train(training)
                    out = attn(x.to(device).requires_grad_(training), causal)
                    if training:
                        out.float().sum().backward()
            return name
        except RuntimeError as e:
            failures.append(f"{name}: {str(e).splitlines()[0][:160]}")
        finally:
            model.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return "math (CPU)"
    raise SystemExit(f"gpu_check: neither FLASH nor EFFICIENT attention runs the model's attention "
                     f"({'training' if training else 'sampling'}) here; every number would be the math "
                     f"fallback's. " + " | ".join(failures))


# -- 2. host syncs ----------------------------------------------------------------------------------------
class _HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU (scalar reads, nonzero, boolean-mask indexing):
    the CPU stand-in for CUDA's sync-debug mode."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default}
    INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self.READS or (func.overloadpacket in self.INDEXING and any(
                isinstance(t, Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1]))):
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], object], device: torch.device) -> int:
    """How many times `fn` makes the host wait for the device."""
    if device.type != "cuda":
        with _HostReads() as mode:
            fn()
        return mode.count
    synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def count_syncs(model: TokenBridge, device: torch.device, precision: str, num_iter: int) -> dict[str, int]:
    """Host syncs of one sampling batch (after a warm-up batch) and one training forward + backward."""
    sampler = Sampler(model.eval(), None, SamplingConfig(num_iter=num_iter, guidance=3.0, batch_size=2), device)
    sampler.latents([0, 1], [0, 1], seed=0)  # warm-up: per-device index tables, allocator
    out = {"sampling batch": host_syncs(lambda: sampler.latents([2, 3], [2, 3], seed=0), device)}
    model.train()
    cfg = model.config
    latents = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    labels = torch.tensor([0, 1], device=device)
    count = model.mar.sample_mask_count()

    def step() -> None:
        with autocast(device, precision):
            loss = model(latents, labels, num_masked=count)["loss"]
        loss.backward()

    step()  # warm-up: the quantizer's and the channel order's tables reach the device once
    out["training forward + backward"] = host_syncs(step, device)
    model.zero_grad(set_to_none=True)
    return out


# -- 3. training step sweep -------------------------------------------------------------------------------
@dataclass
class TrainRow:
    size: str
    batch: int
    ckpt: str
    compile: str = "off"                  # off, or the backend of engine.compile's per-block compile
    status: str = ""                      # "" = measured, else OOM / skipped
    first: float = 0.0                    # the first warm-up step (with compile: tracing + code generation)
    compiles: str = ""                    # with compile: "N in warm-up, M timed" torch compilations
    seconds: float = 0.0
    img_s: float = 0.0
    mfu: float = 0.0
    peak: float = 0.0

    def cells(self) -> tuple:
        comp = f"{self.compile} ({self.compiles})" if self.compiles else self.compile
        if self.status:
            return (self.size, self.batch, self.ckpt, comp, "-", self.status, "-", "-", "-")
        return (self.size, self.batch, self.ckpt, comp, f"{self.first:.1f}", f"{self.seconds:.3f}",
                f"{self.img_s:.1f}", f"{100 * self.mfu:.1f}%", f"{self.peak:.1f}")


def train_sweep(args: argparse.Namespace, precision: str, peak_flops: float, deadline: Deadline,
                reserve_s: float, emit: Callable[[], None], rows: list[TrainRow]) -> None:
    """Part 3 (module doc): one model per (size, ckpt, compile), every micro-batch on it, rows appended as
    measured."""
    device = args.device
    settings = [(size, ckpt, comp) for size in args.sizes.split(",") for ckpt in args.ckpt.split(",")
                for comp in args.train_compile.split(",")]
    for size, ckpt, comp in settings:
        backend = args.train_compile_backend if comp == "on" else "off"
        oom_at: int | None = None
        model = opt = None
        for batch in map(int, args.batches.split(",")):
            row = TrainRow(size, batch, ckpt, backend)
            rows.append(row)
            if oom_at is not None:
                row.status = f"OOM (at {oom_at})"
            elif deadline.left() < reserve_s:
                row.status = "skipped (time budget)"
            else:
                if model is None:
                    model = build(size, args).train()
                    apply_activation_checkpointing(model, ckpt)
                    if comp == "on":
                        compile_block_forwards(model, backend)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02,
                                            fused=device.type == "cuda")
                measure_train(model, opt, row, args, precision, peak_flops)
                if row.status.startswith("OOM"):
                    oom_at = batch
                    opt.zero_grad(set_to_none=True)
                free_memory(device)
            print(f"gpu_check: train {size} batch {batch} ckpt {ckpt} compile {backend}: {row.status or 'measured'}",
                  file=sys.stderr, flush=True)
            emit()
        del model, opt
        free_memory(device)


def measure_train(model: TokenBridge, opt: torch.optim.Optimizer, row: TrainRow, args: argparse.Namespace,
                  precision: str, peak_flops: float) -> None:
    """Warm-up + timed steps of one configuration into `row`; CUDA out-of-memory -> row.status OOM."""
    device, cfg = args.device, model.config
    latents = torch.randn(row.batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (row.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> None:
        if args.fake_oom_above is not None and row.batch > args.fake_oom_above:
            raise torch.OutOfMemoryError(f"fake OOM: micro-batch {row.batch} > --fake-oom-above "
                                         f"{args.fake_oom_above}")
        torch.manual_seed(1000 + i)  # the same mask draws in every configuration
        with autocast(device, precision):
            loss = model(latents, labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    clock = compile_clock()
    graphs = clock.graphs
    try:
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(i)
            if i == 0:
                synchronize(device)
                row.first = time.perf_counter() - t0
        synchronize(device)
        warm_graphs = clock.graphs
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup + i)
        synchronize(device)
    except torch.OutOfMemoryError:
        row.status = "OOM"
        return
    except Exception as e:  # noqa: BLE001 - a failed compile is a finding to report, not a reason to lose the rest
        if row.compile == "off":
            raise
        lines = [ln for ln in str(e).splitlines() if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln
                 and not ln.startswith("For even more")]  # torch's advice lines say nothing about the cause
        row.status = f"failed: {type(e).__name__}: {lines[-1].strip() if lines else ''}"[:160].replace("|", "/")
        return
    if row.compile != "off":
        row.compiles = f"{warm_graphs - graphs} compiles in warm-up, {clock.graphs - warm_graphs} timed"
    row.seconds = (time.perf_counter() - t0) / args.steps
    row.img_s = row.batch / row.seconds
    row.mfu = model.flops_per_sample() * row.img_s / peak_flops
    row.peak = peak_gib(device)


# -- 4. sampling -------------------------------------------------------------------------------------------
def measure_sampling(model: TokenBridge, args: argparse.Namespace, compiled: bool,
                     eager: Tensor | None) -> tuple[tuple, Tensor]:
    """One SAMPLE_HEADER row and the timed batch's latents: a 2-image batch of the same settings (warm-up,
    and for compile the tracing and code generation), then one timed batch of --sample-batch images.
    eager: the uncompiled run's latents of the same batch, to count the tokens compiling changed."""
    device = args.device
    settings = SamplingConfig(num_iter=args.num_iter, guidance=args.guidance, batch_size=args.sample_batch,
                              compile=compiled)
    # On a CPU inductor's C++ code generation takes minutes even for the tiny model; the eager backend
    # still traces the same graphs (dynamo's part, where a host sync would break them).
    backend = {"backend": "eager"} if compiled and device.type != "cuda" else None
    sampler = Sampler(model.eval(), None, settings, device, compile_kwargs=backend)
    labels = [i % model.config.num_classes for i in range(args.sample_batch)]
    t0 = time.perf_counter()
    sampler.latents(labels[:2], [0, 1], seed=0)
    synchronize(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents = sampler.latents(labels, range(args.sample_batch), seed=1)
    synchronize(device)
    rate = args.sample_batch / (time.perf_counter() - t0)
    how = ("inductor" if device.type == "cuda" else "dynamo, eager backend") if compiled else "off"
    same = "-" if eager is None else f"{100 * float((latents == eager).float().mean()):.2f}%"
    row = (args.sample_size, args.sample_batch, args.num_iter, args.guidance, sampler.precision, how,
           f"{first:.1f}", f"{rate:.2f}", same)
    return row, latents


def sampling_status(args: argparse.Namespace, status: str) -> tuple:
    """A SAMPLE_HEADER row for the compiled run that has no numbers: `status` in the compile column."""
    return (args.sample_size, args.sample_batch, args.num_iter, args.guidance, "-", status, "-", "-", "-")


# -- 5. Inception ------------------------------------------------------------------------------------------
def measure_inception(args: argparse.Namespace) -> dict[str, str]:
    """Inception img/s; without torch-fidelity (the network's layout comes from it) a row that says so:
    on the first H200 run it was missing there, and the crash lost the sampling section after it."""
    device, batch = args.device, args.inception_batch
    if importlib.util.find_spec("torch_fidelity") is None:
        print("gpu_check: Inception skipped: torch-fidelity not installed; the other parts run", file=sys.stderr)
        return {"batch": str(batch), "img/s": "skipped: torch-fidelity not installed", "TF32 after it": "-"}
    with tempfile.TemporaryDirectory() as tmp:
        extractor = InceptionExtractor(write_random_weights(Path(tmp) / "inception.pth"), device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    extractor(images[:2])  # warm-up
    synchronize(device)
    reps = 5 if device.type == "cuda" else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        extractor(images)
    synchronize(device)
    rate = reps * batch / (time.perf_counter() - t0)
    return {"batch": str(batch), "img/s": f"{rate:.1f}",
            "TF32 after it": "on" if torch.backends.cuda.matmul.allow_tf32 else "off"}


# -- the report --------------------------------------------------------------------------------------------
@dataclass
class Report:
    facts: dict[str, str] = field(default_factory=dict)
    train: list[TrainRow] = field(default_factory=list)
    sampling: list[tuple] = field(default_factory=list)
    inception: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        parts = ["# GPU check (tools/gpu_check.py)", "",
                 markdown_table(("fact", "value"), list(self.facts.items())), "",
                 "## Training step (plain torch: fp32 weights, bf16 autocast on CUDA, fused AdamW, clip 1.0)", "",
                 markdown_table(TRAIN_HEADER, [r.cells() for r in self.train])]
        if self.sampling:
            parts += ["", "## Sampling (Sampler.latents, model only, per-sample generators)", "",
                      markdown_table(SAMPLE_HEADER, self.sampling)]
        if self.inception:
            parts += ["", "## Inception (InceptionExtractor, random weights, uint8 256 px)", "",
                      markdown_table(tuple(self.inception), [tuple(self.inception.values())])]
        return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    start = time.perf_counter()
    device = args.device
    precision = Sampler.resolve_precision("auto", device)
    if device.type == "cuda":  # as tb_train.dist.init_distributed does for every training job on GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = Report()

    def emit() -> None:
        if args.out:
            Path(args.out).write_text(report.markdown())

    report.facts.update(machine_info())
    peak_flops = measure_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    report.facts.update({"device": str(device), "compute precision": precision,
                         "peak FLOP/s for MFU": f"{peak_flops:.3g}",
                         "TF32 (matmul / cuDNN)": f"{torch.backends.cuda.matmul.allow_tf32} / "
                                                  f"{torch.backends.cudnn.allow_tf32}"})
    model = build(args.sample_size, args)
    with warnings.catch_warnings():  # torch warns at every refused kernel; the result says it all
        warnings.simplefilter("ignore", UserWarning)
        for mode in ("training", "sampling"):
            report.facts[f"attention backend, {mode}"] = attention_backend(model, device, precision, mode == "training")
    syncs = count_syncs(model, device, precision, num_iter=4)
    report.facts.update({f"host syncs, {k}": str(v) for k, v in syncs.items()})
    emit()
    del model  # not resident during the sweep: its peak memory is the configuration's own
    free_memory(device)

    train_sweep(args, precision, peak_flops, deadline, (1 - TRAIN_SHARE) * args.budget_s, emit, report.train)
    report.inception = measure_inception(args)
    emit()
    model = build(args.sample_size, args)
    row, eager = measure_sampling(model, args, compiled=False, eager=None)
    report.sampling.append(row)
    emit()
    if args.no_compile or deadline.left() <= 0:
        report.sampling.append(sampling_status(args, "skipped (--no-compile)" if args.no_compile
                                               else "skipped (time budget)"))
    else:
        try:
            report.sampling.append(measure_sampling(model, args, compiled=True, eager=eager)[0])
        except Exception as e:  # noqa: BLE001 - a failed compile is a finding to report, not a reason to lose the rest
            first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200].replace("|", "/")
            report.sampling.append(sampling_status(args, f"failed: {first}"))
    report.facts["run time s"] = f"{time.perf_counter() - start:.0f}"
    emit()
    print(report.markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
