"""`tb-demo`: the whole pipeline on the embedded digits, on CPU, in a few minutes.

    tb-demo [--out runs/demo] [train.overrides ...]

It runs the real jobs one after the other — exactly what a user would type — so the demo exercises
the same code as a cluster run: `tb-precompute` (digits → demo VAE moments, 4×8×8), `tb-train` (tiny
model, DeepSpeed, one CPU process), `tb-export` (EMA weights → one safetensors file), then draws a
class-conditional sample grid with the exported model and the demo VAE. Every step is resumable:
rerunning the same command skips finished shards, resumes training from `latest` and re-exports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from tb_model.vae import VAEConfig, load_vae
from tb_train import export, precompute, train
from tb_train.demo_data import DEMO_VAE

REPO = Path(__file__).resolve().parents[1]
PRECOMPUTE_CONFIG = REPO / "configs" / "jobs" / "precompute_demo.yaml"
TRAIN_CONFIG = REPO / "configs" / "jobs" / "demo.yaml"


@torch.no_grad()
def sample_grid(model_file: Path, out_png: Path, per_class: int = 8, num_iter: int = 16, cfg: float = 3.0,
                temperature: float = 0.7, seed: int = 0) -> Path:
    """One row per class: exported model → latents → demo VAE decode → PNG."""
    model = export.load_exported(model_file)
    classes = model.config.num_classes
    labels = torch.arange(classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    latents = model.generate(labels, num_iter=num_iter, cfg=cfg, temperature=temperature, generator=gen)
    images = load_vae(VAEConfig(path=str(DEMO_VAE))).decode(latents)
    save_image((images.clamp(-1, 1) + 1) / 2, out_png, nrow=per_class)
    return out_png


def _step(name: str, status: int) -> None:
    if status != 0:
        print(f"tb-demo: {name} failed with status {status}", file=sys.stderr)
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tb-demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for images, latents, run, model, samples")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the training job, e.g. run.max_steps=50")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    for cfg in (PRECOMPUTE_CONFIG, TRAIN_CONFIG):
        if not cfg.is_file():
            print(f"tb-demo: error: {cfg} not found (run from a source checkout: pip install -e .)", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    print("tb-demo [1/4] precompute the embedded digits", flush=True)
    _step("tb-precompute", precompute.main(["--config", str(PRECOMPUTE_CONFIG), f"input=demo:{out / 'images'}",
                                            f"output={out / 'latents'}", f"vae.path={DEMO_VAE}"]))
    print("tb-demo [2/4] train the tiny model", flush=True)
    _step("tb-train", train.main(["--config", str(TRAIN_CONFIG), f"data.path={out / 'latents'}",
                                  f"run.dir={out / 'run'}", f"samples.vae.path={DEMO_VAE}", *args.overrides]))
    print("tb-demo [3/4] export the EMA weights", flush=True)
    model_file = out / "model.safetensors"
    _step("tb-export", export.main([str(out / "run"), "--out", str(model_file)]))
    print("tb-demo [4/4] sample a class-conditional grid", flush=True)
    png = sample_grid(model_file, out / "samples.png")
    print(f"tb-demo: done in {time.perf_counter() - t0:.0f} s: model {model_file}, samples {png}, "
          f"curves: tensorboard --logdir {out / 'run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
