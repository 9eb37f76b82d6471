"""TokenBridge: quantize a continuous latent grid per dimension, model positions with MAR and the
channels of each position with the dimension-wise AR head.

Training (`forward`): latents -> tokens [B, L, C] -> quantizer indices (the CE targets, permuted into
the channel generation order) and dequantized values (the MAR input, original channel order) ->
random MAR mask -> z at every position -> teacher-forced head logits at the masked positions -> CE.

Generation (`generate`): MAR's cosine schedule over `num_iter` steps; at each step MAR runs on the
tokens known so far, CFG mixes the conditional and unconditional z (z_u + w (z_c - z_u)) and the
head samples the tokens of the positions chosen for this step. The default path batches both CFG
branches into one MAR pass and samples the head with a KV cache; `official=True` runs the released
code's loop (two MAR passes, head prefix recomputed at every channel) with the same random numbers,
for equivalence tests and speed comparisons.

Neither path makes the host wait for the device: every count that sets a shape (masked positions per
training batch, positions per generation step) is a Python int from the host's own bookkeeping, positions
are picked with sorts, `gather` and `scatter` instead of boolean indexing, and per-sample random numbers
reach the GPU through pinned memory. So the GPU never idles between steps, and the MAR pass and the
head's sampling step compile without graph breaks (`generation_fns(compiled=True)`; tests/test_compile.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tb_core.errors import InputError

from .config import ModelConfig, resolve
from .head import ARHead, ParallelHead
from .mar import MAR, mask_positions, masked_count, truncnorm_mean_ratio
from .ordering import resolve_order
from .pretrained import read_config, read_state_dict, save_weights, weights_path
from .quantizer import DimensionwiseQuantizer

ORDERS = ("random", "raster", "confidence")
CFG_SCHEDULES = ("linear", "constant")
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_uniform(shape: tuple[int, ...], batch: int, generator: Generators, device: torch.device) -> Tensor:
    """Uniforms [batch, *shape] on `device`: one draw from a generator, or one draw per sample from a
    list of `batch` generators (on their own devices), so that a sample's numbers do not depend on
    which other samples share its batch."""
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return to_device(torch.stack([torch.rand(shape, generator=g, device=g.device) for g in generator]), device)
    return torch.rand(batch, *shape, device=device, generator=generator)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`, without making the host wait: a copy from pageable host memory to a GPU returns
    only when the copy (and so every kernel queued before it) is done, one stall per generation step;
    from pinned memory the copy is queued on the stream like a kernel (the caching host allocator keeps
    the pinned block alive until the copy has run)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class GenerationFns:
    """What a generation step runs: the MAR pass and the head's per-step sampling function.

    `generate` takes them as an argument so that compiled versions belong to their caller (a Sampler
    compiles its pair once and reuses it for every batch) while the module itself stays plain for
    training, the EMA and export. Build them with `TokenBridge.generation_fns`.
    """

    mar: Callable[..., Tensor]                        # MAR.forward(values, mask, labels, num_masked)
    head_step: Callable[..., tuple[Tensor, Tensor]]   # the head's `sample_step` (see tb_model.head)


def mask_schedule(seq_len: int, num_iter: int) -> list[tuple[int, int]]:
    """MAR's cosine schedule as (positions predicted, mask_len after the step) per step.

    After step s, floor(L cos(pi/2 (s+1)/num_iter)) positions stay masked, clamped to [1, left - 1];
    the last step predicts all that remain. Steps predicting 0 positions occur when num_iter > L.
    """
    out, remaining = [], seq_len
    for step in range(num_iter):
        mask_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        n = remaining if step == num_iter - 1 else max(remaining - mask_len, 0)
        out.append((n, mask_len))
        remaining -= n
    return out


class TokenBridge(nn.Module):
    """The whole model; `config` is the resolved ModelConfig (no None fields)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = resolve(config)
        self.config = cfg
        self.seq_len = cfg.latent_size ** 2
        channels = cfg.latent_channels
        self.quantizer = DimensionwiseQuantizer.from_config(cfg.quantizer, channels=channels)
        with torch.device("cpu"):  # also when the model is being built under torch.device("meta")
            perm, inverse = resolve_order(cfg.channel_order, channels)
        # Plain tuples, not buffers: meta-device builds and to_empty() must not lose them.
        self.channel_perm: tuple[int, ...] = tuple(perm.tolist())
        self.channel_inverse: tuple[int, ...] = tuple(inverse.tolist())
        self._channel_index_cache: dict[tuple[bool, torch.device], Tensor] = {}
        self.mar = MAR(self.seq_len, channels, cfg.width, cfg.encoder_depth, cfg.decoder_depth, cfg.num_heads,
                       cfg.num_classes, cfg.buffer_size, cfg.mlp_ratio, cfg.dropout, cfg.attn_dropout,
                       cfg.label_drop, cfg.mask_ratio_min)
        head_cls = ARHead if cfg.head_type == "ar" else ParallelHead
        self.head = head_cls(cfg.width, cfg.head_width, cfg.head_depth, cfg.head_num_heads, channels,
                             cfg.quantizer.levels, cfg.channel_group, cfg.mlp_ratio, cfg.dropout, cfg.attn_dropout)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TokenBridge":
        """Load an exported model (`tb-export`): a `.safetensors` file, or a folder with `model.safetensors`.

        The architecture comes from the file (metadata, else the `<stem>.json` sidecar); every tensor
        must fit it exactly. Needs neither tb_train nor DeepSpeed. Returns the model in eval mode on
        `device`, float32. A wrong or damaged file is a one-line InputError naming it.
        """
        file = weights_path(path)
        cfg, _ = read_config(file)
        with torch.device("meta"):  # no init cost: every tensor comes from the file
            model = cls(cfg)
        state = read_state_dict(file, device=str(torch.device(device)))
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise InputError(f"{file}: weights do not fit its model config: {detail[:300]}") from None
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights and config in the format `from_pretrained` reads (see tb_model.pretrained)."""
        return save_weights(path, self.state_dict(), self.config, metadata)

    def init_weights(self) -> None:
        """Re-initialize everything (e.g. after `to_empty()` of a meta-built model), by the released
        constructor's rules: `MAR.init_weights`, the head's `init_weights`, the quantizer's table."""
        self.mar.init_weights()
        self.head.init_weights()
        self.quantizer.reset_parameters()

    def checkpoint_block_lists(self) -> list[nn.ModuleList]:
        """Every transformer block list; the engine may replace entries by checkpointing wrappers."""
        return [self.mar.encoder_blocks, self.mar.decoder_blocks, self.head.blocks]

    # -- helpers ---------------------------------------------------------------------------------
    def _to_tokens(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] -> contiguous [B, L, C], checking the shape against the config.

        Contiguous because the quantizer's table lookup keeps its index's memory layout, and a graph
        compiled by torch.compile assumes a contiguous lookup result (a channels-last one fails there).
        """
        c, s = self.config.latent_channels, self.config.latent_size
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (c, s, s):
            raise ValueError(f"latents must be [B, {c}, {s}, {s}] for this model config, got {tuple(latents.shape)}")
        return rearrange(latents, "b c h w -> b (h w) c").contiguous()

    def _from_tokens(self, tokens: Tensor) -> Tensor:
        """[B, L, C] -> [B, C, h, w] (positions in raster order)."""
        return rearrange(tokens, "b (h w) c -> b c h w", h=self.config.latent_size)

    @property
    def _dtype(self) -> torch.dtype:
        return self.mar.fake_latent.dtype

    def _channel_index(self, inverse: bool, device: torch.device) -> Tensor:
        """`channel_perm` (or `channel_inverse`) as a long tensor on `device`, made once per device:
        indexing with the Python tuple copies it to the device at every call, a host sync on a GPU."""
        key = (inverse, device)
        if key not in self._channel_index_cache:
            order = self.channel_inverse if inverse else self.channel_perm
            self._channel_index_cache[key] = torch.tensor(order, dtype=torch.long, device=device)
        return self._channel_index_cache[key]

    # -- training --------------------------------------------------------------------------------
    def forward(self, latents: Tensor, labels: Tensor, mask: Tensor | None = None,
                num_masked: int | None = None) -> dict[str, Tensor]:
        """latents: scaled continuous latents [B, C, h, w] (any float dtype); labels long [B].

        mask (optional, bool [B, L], True = predicted; equal count per row) replaces the random MAR
        mask. num_masked: the masked count per row. With a random mask it is drawn here when None
        (`MAR.sample_mask_count`, a CPU draw); a caller that compiles this forward draws it outside
        and passes it, since a draw read on the host cannot be part of a graph. With a given mask
        None reads it from the mask (one host sync). -> {"loss": scalar, "ce_per_channel": [C]
        (detached, in generation order)}.
        loss = sum of the CE of all head steps / C, averaged over masked positions (nats per channel).
        For channel_group > 1, ce_per_channel holds each channel's marginal CE.
        """
        x = self._to_tokens(latents)
        idx = self.quantizer.quantize(x, channel_dim=-1).long()
        values = self.quantizer.dequantize(idx, channel_dim=-1, dtype=self._dtype)
        targets = idx.index_select(-1, self._channel_index(False, x.device))
        if mask is None:
            orders = self.mar.sample_orders(x.shape[0], x.device)
            if num_masked is None:
                num_masked = self.mar.sample_mask_count()
            mask = MAR.mask_from_orders(orders, num_masked)
        elif num_masked is None:
            num_masked = masked_count(mask)
        z = self.mar(values, mask, labels, num_masked)
        pos = mask_positions(mask, num_masked)  # [B, n]: the rows of z[mask], in its order
        tgt = targets.gather(1, pos[..., None].expand(-1, -1, targets.shape[-1])).flatten(0, 1)
        logits = self.head(z.gather(1, pos[..., None].expand(-1, -1, z.shape[-1])).flatten(0, 1), tgt)
        steps = logits.shape[1]
        ce = F.cross_entropy(logits.float().flatten(0, 1), self.head.group_tokens(tgt).flatten(),
                             reduction="none").view(-1, steps).mean(0)
        if self.head.group == 1:
            per_channel = ce.detach()
        else:
            logp = self.head.marginal_logprobs(logits.detach())
            per_channel = -logp.gather(-1, tgt[..., None])[..., 0].mean(0)
        return {"loss": ce.sum() / self.config.latent_channels, "ce_per_channel": per_channel}

    def flops_per_sample(self) -> float:
        """Training FLOPs per image (forward + backward = 3x forward), matmuls and attention only.

        Uses the expected MAR mask ratio; the encoder sees buffer + known tokens, the decoder all
        buffer + L tokens, the head runs C/k steps at every masked position (causal attention
        counted as half a square).
        """
        cfg, L = self.config, self.seq_len
        w, hw, buf = cfg.width, cfg.head_width, cfg.buffer_size
        masked = L * truncnorm_mean_ratio(cfg.mask_ratio_min)
        enc, dec = buf + L - masked, buf + L
        block = (4 + 2 * cfg.mlp_ratio) * w * w  # multiply-adds per token per ViT block
        macs = L * cfg.latent_channels * w + enc * w * w  # z_proj, decoder_embed
        macs += cfg.encoder_depth * (enc * block + 2 * enc * enc * w)
        macs += cfg.decoder_depth * (dec * block + 2 * dec * dec * w)
        steps, classes = self.head.steps, self.head.classes
        head_block = (4 + 2 * cfg.mlp_ratio + 6) * hw * hw  # attention + MLP + adaLN modulation
        attn_pairs = steps * (steps + 1) / 2 if cfg.head_type == "ar" else steps * steps
        per_pos = w * hw + steps * (cfg.head_depth * head_block + 2 * hw * hw + hw * classes)
        per_pos += cfg.head_depth * 2 * attn_pairs * hw
        macs += masked * per_pos
        return 3 * 2 * macs

    # -- generation ------------------------------------------------------------------------------
    def guided_features(self, values: Tensor, mask: Tensor, labels: Tensor, weight: float | None,
                        two_pass: bool = False, num_masked: int | None = None,
                        mar: Callable[..., Tensor] | None = None) -> Tensor:
        """MAR output with CFG: values [B, L, C], mask bool [B, L] -> z [B, L, width].

        weight None: conditional branch only. Otherwise z_u + weight (z_c - z_u), with both branches
        in one batched MAR pass, or two passes (the released code) if two_pass. num_masked: see
        `MAR.forward`; mar: the MAR pass to run (a compiled one, `GenerationFns.mar`), default self.mar.
        """
        mar = self.mar if mar is None else mar
        if weight is None:
            return mar(values, mask, labels, num_masked)
        fake = torch.full_like(labels, self.config.num_classes)
        if two_pass:
            z_c, z_u = mar(values, mask, labels, num_masked), mar(values, mask, fake, num_masked)
        else:
            z_c, z_u = mar(torch.cat([values, values]), torch.cat([mask, mask]),
                           torch.cat([labels, fake]), num_masked).chunk(2)
        return z_u + weight * (z_c - z_u)

    def generation_fns(self, compiled: bool = False, **compile_kwargs) -> GenerationFns:
        """The MAR pass and the head's per-step sampling function for `generate`, plain or compiled with
        torch.compile (compile_kwargs go to it, e.g. backend).

        Compiled with dynamic=True by default: the encoder's length, the head's row count, the cache
        position and the batch change between steps and batches, and sizes that are symbolic from the
        first trace serve all of them. Special cases still get their own trace, all within the first
        batch (measured: the MAR pass twice, as its first pass has no known position; the head step once:
        its shapes are the same at every step and the step index only slices); later batches, also a
        smaller last one, reuse the graphs. The compiled head step runs on the plain weights (it cannot
        trace oneDNN-packed ones). Nothing in either function reads a device value on the host, so
        neither breaks into pieces.
        """
        if not compiled:
            return GenerationFns(self.mar, self.head.sample_step)
        compile_kwargs.setdefault("dynamic", True)
        return GenerationFns(torch.compile(self.mar, **compile_kwargs),
                             torch.compile(self.head.sample_step, **compile_kwargs))

    def _sample_at(self, z: Tensor, positions: Tensor, temperature: float, uniforms: Tensor, use_cache: bool,
                   head_step: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Head samples at positions [B, n] of z [B, L, w] with uniforms [B n, steps] -> (tokens [B, n, C],
        original channel order; log p [B, n])."""
        B, n = positions.shape
        zsel = z.gather(1, positions[..., None].expand(-1, -1, z.shape[-1])).flatten(0, 1)
        tok, logp = self.head.sample(zsel, temperature, None, use_cache, uniforms=uniforms, step=head_step)
        return tok.index_select(1, self._channel_index(True, z.device)).view(B, n, -1), logp.view(B, n)

    @torch.no_grad()
    def generate(self, labels: Tensor, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                 temperature: float = 1.0, order: str = "random", generator: Generators = None,
                 official: bool = False, fns: GenerationFns | None = None) -> Tensor:
        """Sample latents for class labels [B] (value num_classes = unconditional) -> scaled latents [B, C, h, w].

        Schedule: `mask_schedule` (MAR's cosine); a step with nothing to predict is skipped
        (num_iter > L), so every position is filled exactly once. Guidance weight:
        "linear" 1 + (cfg - 1)(L - mask_len)/L as MAR, or "constant" cfg; cfg == 1 runs no
        unconditional branch. order: "random" (a random permutation per sample), "raster", or
        "confidence" (the head samples every masked position; the ones whose tokens have the highest
        summed log-probability are kept). temperature 0 = argmax. Runs in eval mode.
        generator: one torch.Generator for the batch, or a list of B generators, one per sample: then
        sample i's order and tokens come from generator i alone (same result in any batch).
        fns: the MAR pass and the head's sampling step to run (`generation_fns`; compiled ones give the
        same tokens up to rounding), default the plain modules.
        """
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {num_iter}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            return self._generate(labels, num_iter, cfg, cfg_schedule, temperature, order, generator, official,
                                  self.generation_fns() if fns is None else fns)
        finally:
            self.train(was_training)

    def _generate(self, labels: Tensor, num_iter: int, cfg: float, cfg_schedule: str, temperature: float,
                  order: str, generator: Generators, official: bool, fns: GenerationFns) -> Tensor:
        B, L, C = labels.shape[0], self.seq_len, self.config.latent_channels
        device = labels.device
        if order == "random":
            score = draw_uniform((L,), B, generator, device)
        else:
            score = -torch.arange(L, device=device, dtype=torch.float32).expand(B, L)
        tokens = torch.zeros(B, L, C, dtype=torch.long, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        remaining = L
        for n, mask_len in mask_schedule(L, num_iter):
            if n == 0:
                continue
            weight = None
            if cfg != 1.0:
                weight = 1 + (cfg - 1) * (L - mask_len) / L if cfg_schedule == "linear" else cfg
            drawn = remaining if order == "confidence" else n  # positions the head samples at this step
            uniforms = draw_uniform((drawn, self.head.steps), B, generator, device).flatten(0, 1)
            self._generation_step(tokens, mask, score, labels, uniforms, n, remaining, weight, temperature,
                                  order, official, fns)
            remaining -= n
        return self._from_tokens(self.quantizer.dequantize(tokens, channel_dim=-1))

    def _generation_step(self, tokens: Tensor, mask: Tensor, score: Tensor, labels: Tensor, uniforms: Tensor,
                         n: int, remaining: int, weight: float | None, temperature: float, order: str,
                         official: bool, fns: GenerationFns) -> None:
        """One step of `generate`, in place: fill `n` of the `remaining` masked positions of tokens
        [B, L, C] (long) and clear them in mask [B, L]; score [B, L] ranks positions for the random and
        raster orders, uniforms [B drawn, steps] are the head's random numbers (drawn = remaining for
        the confidence order, else n).

        The random numbers come in as a tensor and every count is the schedule's, so the step reads
        nothing back from the device and compiles into one graph (tests/test_compile.py).
        """
        C = tokens.shape[-1]
        values = self.quantizer.dequantize(tokens, channel_dim=-1, dtype=self._dtype)
        z = self.guided_features(values, mask, labels, weight, official, remaining, fns.mar)
        if order == "confidence":
            cand = mask_positions(mask, remaining)
            tok, logp = self._sample_at(z, cand, temperature, uniforms, not official, fns.head_step)
            top = logp.topk(n, dim=1).indices
            positions = cand.gather(1, top)
            tok = tok.gather(1, top[..., None].expand(-1, -1, C))
        else:
            positions = score.masked_fill(~mask, -math.inf).topk(n, dim=1).indices
            tok, _ = self._sample_at(z, positions, temperature, uniforms, not official, fns.head_step)
        tokens.scatter_(1, positions[..., None].expand(-1, -1, C), tok)
        mask.scatter_(1, positions, False)
