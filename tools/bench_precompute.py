"""Throughput of the whole precompute job vs the bare VAE encoder, on the same images in the same run.

    python tools/bench_precompute.py [--vae demo|kl16|PATH] [--images 512] [--source-size 48]
        [--resolution 32] [--batch 64] [--workers 1 2] [--device auto]

Images are synthetic photo-like JPEGs of `--source-size` (short side; the long side 1.25x) written to a
temporary ImageFolder tree, so the job pays real decode + ADM crop. "bare encoder" encodes the same images
already decoded and cropped in memory (uint8), image and flip in one call, exactly as the job does
(`_encode_batch`); "job" is `tb_train.data.precompute.run` end to end into a fresh folder (listing, VAE load,
decoding in DataLoader workers, shard writing, manifest). Both count input images per second.
`--vae kl16` uses a random-init KL-16 (the paper's architecture; speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tb_model.vae import VAEConfig, kl16_config, load_vae
from tb_core.config import load_config
from tb_train.demo.data import DEMO_VAE
from tb_train.data.images import ImageDataset, list_images
from tb_train.data.precompute import PrecomputeConfig, _encode_batch, _resolve_device, run


def _write_images(root: Path, n: int, short: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    h, w = short, int(short * 1.25)
    yy, xx = np.mgrid[0:h, 0:w] / w
    for i in range(n):
        folder = root / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def _vae_path(spec: str, tmp: Path) -> str:
    if spec == "demo":
        return str(DEMO_VAE)
    if spec == "kl16":
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(**kl16_config()).save_pretrained(tmp / "kl16", safe_serialization=True)
        return str(tmp / "kl16")
    return spec


def bare_encoder(cfg: PrecomputeConfig, images_u8: torch.Tensor) -> float:
    """Input images/s of the encoder alone over pre-decoded uint8 [N, 3, R, R] images (one warm-up batch)."""
    device = _resolve_device(cfg.device, 0)
    autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    channels_last = cfg.channels_last and device.type == "cuda"
    vae = load_vae(cfg.vae, device=device)
    if channels_last:
        vae.model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        images_u8 = images_u8.pin_memory()
    batches = images_u8.split(cfg.batch_size)
    _encode_batch(vae, batches[0], device, autocast, channels_last).cpu()
    start = time.perf_counter()
    for b in batches:
        _encode_batch(vae, b, device, autocast, channels_last).cpu()
    return len(images_u8) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", default="demo", help="demo, kl16 (random init) or a VAE path")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--source-size", type=int, default=48)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        _write_images(tmp / "images", args.images, args.source_size)
        vae = _vae_path(args.vae, tmp)

        def config(workers: int, out: str) -> PrecomputeConfig:
            return load_config(PrecomputeConfig, None, [
                f"input={tmp / 'images'}", f"output={out}", f"vae.path={vae}", f"resolution={args.resolution}",
                f"batch_size={args.batch}", "samples_per_shard=1000", f"num_workers={workers}",
                f"device={args.device}", f"dtype={args.dtype}", "progress=false"])

        cfg = config(0, str(tmp / "unused"))
        ds = ImageDataset(list_images(cfg.input), cfg.resolution)
        decoded = torch.stack([ds[i][1] for i in range(len(ds))])
        bare = bare_encoder(cfg, decoded)
        print(f"device {_resolve_device(args.device, 0)}, threads {torch.get_num_threads()}, {args.images} images "
              f"{int(args.source_size * 1.25)}x{args.source_size} jpg -> {args.resolution}px, batch {args.batch}, "
              f"VAE {args.vae}")
        print(f"bare encoder (image + flip per call): {bare:9.1f} img/s")
        for w in args.workers:
            summary = run(config(w, str(tmp / f"out_w{w}")))
            job, loop = summary["images_per_s"], summary["loop_images_per_s"]
            print(f"{w} DataLoader worker(s): whole job {job:9.1f} img/s = {100 * job / bare:5.1f}% of the bare "
                  f"encoder; its decode-encode-write loop {loop:9.1f} img/s = {100 * loop / bare:5.1f}%")


if __name__ == "__main__":
    main()
