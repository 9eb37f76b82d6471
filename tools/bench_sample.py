"""Sampling and evaluation speed: images/s of the default generation path (batched CFG + KV-cached head)
vs the released loop (`official=True`: two MAR passes, head prefix recomputed) on the SAME images, and
Inception feature extraction images/s.

    OMP_NUM_THREADS=1 python tools/bench_sample.py --sizes tiny,base --batch 4 --num-iter 16 --threads 1
    python tools/bench_sample.py --sizes L,H --batch 256 --num-iter 64,256 --precision bf16 --device cuda

Models have random weights (speed does not depend on them), 16x16x16 latents, 1000 classes; the same
per-sample generators feed both paths, and the script reports whether their latents are identical.
Times are for the model only (latents); the VAE decode is timed separately when --vae is given.
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

from tb_core.measure import cpu_model  # noqa: E402
from tb_model.registry import create  # noqa: E402
from tb_train.sample.sampler import sample_seed  # noqa: E402


def time_generate(model, labels, num_iter: int, cfg: float, official: bool, precision: str, device) -> tuple[float, torch.Tensor]:
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(len(labels))]
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with ctx:
        out = model.generate(labels, num_iter=num_iter, cfg=cfg, temperature=1.0, generator=gens, official=official)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out.float()


def bench_sampling(args, device) -> list[str]:
    rows = []
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = create(size).to(device).eval()
        labels = torch.arange(args.batch, device=device) % model.config.num_classes
        for num_iter in [int(x) for x in args.num_iter.split(",")]:
            if args.warmup:
                time_generate(model, labels[:1], 2, args.cfg, False, args.precision, device)
            t_def, lat_def = time_generate(model, labels, num_iter, args.cfg, False, args.precision, device)
            line = (f"| {size} | {args.batch} | {num_iter} | {args.cfg} | {args.precision} | "
                    f"{args.batch / t_def:.3f} ({t_def:.1f} s) |")
            if args.official:
                t_off, lat_off = time_generate(model, labels, num_iter, args.cfg, True, args.precision, device)
                same = torch.equal(lat_def, lat_off)
                diff = (lat_def - lat_off).abs().max().item()
                line += (f" {args.batch / t_off:.3f} ({t_off:.1f} s) | {t_off / t_def:.2f} | "
                         f"{'yes' if same else f'no (max diff {diff:.2e})'} |")
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
    if device.type == "cuda":
        torch.cuda.synchronize()
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
    print("| size | batch | num_iter | cfg | precision | default img/s | official img/s | official/default | same latents |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    bench_sampling(args, device)
    if not args.skip_eval:
        bench_eval(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
