"""Sampling and evaluation speed: images/s of the default generation path (batched CFG + KV-cached head)
vs the released loop (`official=True`: two MAR passes, head prefix recomputed) on the SAME images, the
share of each call spent in the MAR passes and in the head, and Inception feature extraction images/s.

    OMP_NUM_THREADS=1 python tools/bench_sample.py --sizes tiny,base --batch 4 --num-iter 16 --threads 1
    python tools/bench_sample.py --sizes L,H --batch 256 --num-iter 64,256 --precision bf16 --device cuda

Models have random weights (speed does not depend on them), 16x16x16 latents, 1000 classes; the same
per-sample generators feed both paths, and the script reports whether their latents are identical.
Times are for the model only (latents). The last column divides the official time by the default
path's MAR time alone: the speed-up the default path would have with a head that took no time, so a
target above it cannot be reached by the head; --compile-mar shows what torch.compile does to the MAR
passes (the compile time printed apart).
Evaluation: the Inception network of tb-eval (random weights in torch-fidelity's layout) on 256x256
uint8 images. Results print as one table; put measured figures in docs/sampling.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tb_core.measure import cpu_model, synchronize  # noqa: E402
from tb_model.registry import create  # noqa: E402
from tb_model.tokenbridge import GenerationFns  # noqa: E402
from tb_train.sample.sampler import sample_seed  # noqa: E402


class PartTimer:
    """Seconds spent in the MAR passes and in the head's `sample` calls during `generate`: a forward
    pre/post hook pair on the MAR module (or the compiled MAR pass it is given), a wrapper on the
    head's `sample`. On a GPU each part is synchronised, so its time is its own."""

    def __init__(self, model, device) -> None:
        self.device, self.mar, self.head, self._t0 = device, 0.0, 0.0, 0.0
        model.mar.register_forward_pre_hook(lambda *_: self._start())
        model.mar.register_forward_hook(lambda *_: self._stop("mar"))
        inner = model.head.sample

        def timed_sample(*args, **kwargs):
            self._start()
            result = inner(*args, **kwargs)
            self._stop("head")
            return result

        model.head.sample = timed_sample

    def _start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, part: str) -> None:
        synchronize(self.device)
        setattr(self, part, getattr(self, part) + time.perf_counter() - self._t0)

    def reset(self) -> None:
        self.mar = self.head = 0.0


def time_generate(model, labels, num_iter: int, cfg: float, official: bool, precision: str, device,
                  timer: PartTimer, fns=None) -> tuple[float, torch.Tensor]:
    """Seconds of one `generate` call (the same per-sample generators every time) and its latents;
    timer holds the MAR and head seconds of the call afterwards."""
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(len(labels))]
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    synchronize(device)
    timer.reset()
    t = time.perf_counter()
    with ctx:
        out = model.generate(labels, num_iter=num_iter, cfg=cfg, temperature=1.0, generator=gens, official=official,
                             fns=fns)
    synchronize(device)
    return time.perf_counter() - t, out.float()


def split(t: float, timer: PartTimer) -> str:
    """'MAR a% / head b%' of a generate call of t seconds."""
    return f"MAR {100 * timer.mar / t:.0f}% / head {100 * timer.head / t:.0f}%"


def bench_sampling(args, device) -> list[str]:
    """One row per (size, num_iter): default vs official img/s on the same images, the MAR / head split of
    each, and the speed-up the default path would have if its head took no time at all (its MAR passes
    alone: the bound the head's speed cannot move). --compile-mar adds a row with the MAR pass compiled."""
    rows = []
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = create(size).to(device).eval()
        timer = PartTimer(model, device)
        labels = torch.arange(args.batch, device=device) % model.config.num_classes
        compiled = None
        if args.compile_mar:
            compiled = GenerationFns(torch.compile(model.mar, dynamic=True), model.head.sample_step)
        for num_iter in [int(x) for x in args.num_iter.split(",")]:
            if args.warmup:
                time_generate(model, labels[:1], 2, args.cfg, False, args.precision, device, timer)
            t_def, lat_def = time_generate(model, labels, num_iter, args.cfg, False, args.precision, device, timer)
            mar_def, split_def = timer.mar, split(t_def, timer)
            line = (f"| {size} | {args.batch} | {num_iter} | {args.cfg} | {args.precision} | "
                    f"{args.batch / t_def:.3f} ({t_def:.1f} s) |")
            if args.official:
                t_off, lat_off = time_generate(model, labels, num_iter, args.cfg, True, args.precision, device, timer)
                same = torch.equal(lat_def, lat_off)
                diff = (lat_def - lat_off).abs().max().item()
                line += (f" {args.batch / t_off:.3f} ({t_off:.1f} s) | {t_off / t_def:.2f} | "
                         f"{'yes' if same else f'no (max diff {diff:.2e})'} | {split_def} | {split(t_off, timer)} | "
                         f"{t_off / mar_def:.2f} |")
            rows.append(line)
            print(line, flush=True)
            if compiled is not None:
                t0 = time.perf_counter()
                time_generate(model, labels, 2, args.cfg, False, args.precision, device, timer, compiled)
                first = time.perf_counter() - t0
                t_c, lat_c = time_generate(model, labels, num_iter, args.cfg, False, args.precision, device, timer,
                                           compiled)
                line = (f"compiled MAR pass (inductor), {size}, num_iter {num_iter}: {t_c:.1f} s "
                        f"({split(t_c, timer)}), MAR {timer.mar:.1f} s vs {mar_def:.1f} s uncompiled "
                        f"({mar_def / timer.mar:.2f}x), whole {t_def / t_c:.2f}x"
                        f"{f', official / compiled {t_off / t_c:.2f}x' if args.official else ''}; "
                        f"compile + 2-step warm-up {first:.0f} s; "
                        f"same latents: {'yes' if torch.equal(lat_c, lat_def) else 'no'}")
                rows.append(line)
                print(line, flush=True)
        del model
    return rows


def bench_eval(args, device) -> str:
    from tb_train.eval.inception import InceptionExtractor, write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_weights(Path(tmp) / "inception.pth")
        net = InceptionExtractor(path, device)
    images = torch.randint(0, 256, (args.eval_batch, 3, 256, 256), dtype=torch.uint8)
    net(images[:1])
    t = time.perf_counter()
    for _ in range(args.eval_repeats):
        net(images)
    synchronize(device)
    dt = time.perf_counter() - t
    n = args.eval_batch * args.eval_repeats
    line = f"Inception features (pool3 + logits + spatial), 256x256, batch {args.eval_batch}: {n / dt:.2f} img/s ({dt:.1f} s for {n})"
    print(line, flush=True)
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-iter", default="16", help="comma list, e.g. 64,256")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-official", dest="official", action="store_false", help="skip the released loop")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--compile-mar", action="store_true",
                   help="also time the default path with the MAR pass torch.compiled (inductor; minutes on a CPU)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    print("| size | batch | num_iter | cfg | precision | default img/s | official img/s | official/default "
          "| same latents | default split | official split | official / default's MAR time (bound) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    bench_sampling(args, device)
    if not args.skip_eval:
        bench_eval(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
