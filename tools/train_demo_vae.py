"""Train the small continuous KL-VAE of the demo on the embedded digits (CPU, a few minutes).

    python tools/train_demo_vae.py [--latent-channels 4] [--out DIR] [--steps 500] [--grid /tmp/recon.png]

Architecture: diffusers AutoencoderKL, block_out_channels (32, 32, 64), one ResNet block per level, no
attention, C latent channels (`--latent-channels`, default 4: the shipped `demo_vae`; 16: `demo_vae16`,
the 16-channel miniature of KL-16); 32×32 images → 8×8×C latents (downsample 4), ~0.7M parameters
(2.8 MB in fp32). `--out` defaults to the channel count's asset folder (`tb_train.demo.data.demo_vae_path`). Loss: per-image summed L1 reconstruction + KL_WEIGHT × summed KL to N(0, I), Adam, random
h-flips. After training the script sets `scaling_factor` = 1 / std of the posterior means over the
whole set (no mean shift, as KL-16's 0.2325), then writes the folder with `save_pretrained`.
Deterministic for a given seed and thread count (CPU kernels may sum in a thread-dependent order).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from tb_train.demo.data import DEMO_SIZE, demo_digits, demo_vae_path

KL_WEIGHT = 1e-4


def build_demo_vae(latent_channels: int = 4) -> AutoencoderKL:
    """The demo VAE architecture; only the latent width changes with `latent_channels` (the encoder's
    last conv and the quant convs), so 4 channels builds — and seeds — exactly the shipped asset."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, act_fn="silu", sample_size=DEMO_SIZE, mid_block_add_attention=False,
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _grid(rows: list[torch.Tensor]) -> Image.Image:
    """rows of [n, 3, H, W] in [-1, 1] -> one uint8 image, one row per tensor."""
    t = torch.stack(rows)  # [R, n, 3, H, W]
    r, n, _, h, w = t.shape
    t = t.clamp(-1, 1).add(1).mul(127.5).round().byte()
    return Image.fromarray(t.permute(0, 3, 1, 4, 2).reshape(r * h, n * w, 3).numpy())


def train(steps: int, batch: int, lr: float, seed: int, latent_channels: int = 4,
          ) -> tuple[AutoencoderKL, torch.Tensor]:
    """Fit the VAE on all 1,797 digits -> (the VAE in eval mode, the images [N, 3, H, W] in [-1, 1])."""
    torch.manual_seed(seed)
    images, _ = demo_digits()
    x_all = _to_tensor(images)
    vae = build_demo_vae(latent_channels)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=gen)
        x = x_all[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        l1 = (rec - x).abs().flatten(1).sum(1).mean()
        kl = post.kl().mean()
        loss = l1 + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            mae = l1.item() / x[0].numel()
            print(f"step {step:5d}  L1/pixel {mae:.4f}  KL {kl.item():.1f}  {time.time() - t0:.0f}s", flush=True)
    return vae.eval(), x_all


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels C (8x8xC latents)")
    p.add_argument("--out", type=Path, default=None, help="default: the asset folder for --latent-channels")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="PNG: originals (top) vs reconstructions")
    args = p.parse_args(argv)
    if args.latent_channels < 1:
        p.error(f"--latent-channels must be >= 1, got {args.latent_channels}")
    out = args.out if args.out is not None else demo_vae_path(args.latent_channels)
    torch.set_num_threads(args.threads)

    vae, x_all = train(args.steps, args.batch, args.lr, args.seed, args.latent_channels)
    with torch.no_grad():
        means = torch.cat([vae.encode(x).latent_dist.mean for x in x_all.split(256)])  # [N, C, 8, 8]
        std = means.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        recon = torch.cat([vae.decode(m).sample for m in means.split(256)])
    mae = (recon - x_all).abs().mean().item()
    print(f"posterior-mean latents: mean {means.mean().item():.3f} std {std:.3f} -> scaling_factor "
          f"{1.0 / std:.4f}; reconstruction L1/pixel {mae:.4f} (range [-1, 1])")
    vae.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}")
    if args.grid is not None:
        pick = torch.arange(0, len(x_all), len(x_all) // 16)[:16]
        _grid([x_all[pick], recon[pick]]).resize((16 * 64, 2 * 64), Image.NEAREST).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
