"""MAR's diffusion head, for speed comparisons only (tools/bench_head.py): not used by TokenBridge.

MAR models each token's continuous value with a small MLP denoiser conditioned on z
(`SimpleMLPAdaLN`: input projection, timestep MLP + z projection summed into the condition, residual
blocks LayerNorm -> adaLN shift/scale -> Linear-SiLU-Linear -> gated residual, adaLN final layer,
output eps and a variance interpolation (learned sigma, 2 x token_dim)). Sampling runs DDPM ancestral
steps on a cosine schedule of 1000 steps respaced to `steps` (MAR: 100), with temperature scaling the
per-step noise and CFG done inside the head: both z branches go through the denoiser, the eps halves
are mixed. The sizes MAR uses: base 6 x 1024, L 8 x 1280, H 12 x 1536 (blocks x width).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..head import modulate
from ..mar import LN_EPS

MAR_DIFFUSION_SIZES = {"base": (6, 1024), "L": (8, 1280), "H": (12, 1536)}


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


def _cosine_respaced(steps: int, train_steps: int = 1000) -> tuple[Tensor, Tensor]:
    """(betas [steps], original timestep of each kept step [steps]) of the respaced cosine schedule."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / train_steps) / alpha_bar(i / train_steps), 0.999) for i in range(train_steps)]
    cum = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    stride = (train_steps - 1) / max(steps - 1, 1)
    kept = sorted({round(i * stride) for i in range(steps)})
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - float(cum[t]) / last)
        last = float(cum[t])
    return torch.tensor(new_betas, dtype=torch.float64), torch.tensor(kept)


class DiffusionHead(nn.Module):
    """MAR's per-token MLP denoiser and DDPM sampler: z [N, cond_dim] -> token values [N, token_dim]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.token_dim, self.freq_dim = token_dim, freq_dim
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.norm_final = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * token_dim)

    def _timestep_features(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """x [N, token_dim] noisy values, t [N] timesteps, z [N, cond_dim] -> [N, 2 token_dim] (eps, var)."""
        y = self.time_embed(self._timestep_features(t).to(x.dtype)) + self.cond_embed(z)
        h = self.input_proj(x)
        for blk in self.res_blocks:
            h = blk(h, y)
        scale, shift = self.final_modulation(y).chunk(2, dim=-1)
        return self.out(modulate(self.norm_final(h), shift, scale))

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0, steps: int = 100,
               generator: torch.Generator | None = None) -> Tensor:
        """DDPM ancestral sampling. With cfg != 1, z is [cond; uncond] (2N rows) and N samples return."""
        betas, timesteps = _cosine_respaced(steps)
        alphas_cum = torch.cumprod(1 - betas, 0)
        prev_cum = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cum[:-1]])
        post_var = betas * (1 - prev_cum) / (1 - alphas_cum)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        coef_x0 = betas * prev_cum.sqrt() / (1 - alphas_cum)
        coef_xt = (1 - prev_cum) * (1 - betas).sqrt() / (1 - alphas_cum)
        guided = cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        x = torch.randn(n, self.token_dim, device=z.device, generator=generator, dtype=z.dtype)
        for i in reversed(range(len(betas))):
            x_in = torch.cat([x, x]) if guided else x
            out = self.forward(x_in, timesteps[i].to(z.device).expand(x_in.shape[0]), z).float()
            eps, var = out[:, :self.token_dim], out[:, self.token_dim:]
            if guided:
                e_c, e_u = eps.chunk(2)
                eps, var = e_u + cfg * (e_c - e_u), var[:n]
            frac = (var + 1) / 2
            logvar = frac * math.log(float(betas[i])) + (1 - frac) * float(post_logvar[i])
            x0 = (x.float() - math.sqrt(1 - float(alphas_cum[i])) * eps) / math.sqrt(float(alphas_cum[i]))
            mean = float(coef_x0[i]) * x0 + float(coef_xt[i]) * x.float()
            if i > 0:
                noise = torch.randn(x.shape, device=z.device, generator=generator, dtype=torch.float32)
                mean = mean + torch.exp(0.5 * logvar) * noise * temperature
            x = mean.to(z.dtype)
        return x
