"""Analytic per-rank memory of a training run: what each ZeRO stage keeps on a rank, before anything runs.

Used by tools/bench_memory.py (analytic next to measured peak RSS per rank) and by docs/training.md's
"which stage for L and H" table. All figures are bytes on one rank (rank 0, the one that also keeps the
whole EMA at fp32 stage 0) for N trainable parameters, W ranks, weight bytes w (4 for fp32/amp_bf16, 2
for bf16):

| part | stage 0 | stage 1 | stage 2 | stage 3 |
|---|---|---|---|---|
| params (the module's weights) | wN | wN | wN | wN/W |
| fp32 masters (DeepSpeed's copy) | 4N/W if w=2, else 0 | 4N/W | 4N/W | 4N/W |
| grads | wN (+4N fp32 accumulation if w=2) | wN (+4N/W if w=2) | wN/W (+4N/W if w=2) | wN/W (+4N/W if w=2) |
| Adam m, v (fp32) | 8N/W if w=2, else 8N | 8N/W | 8N/W | 8N/W |
| EMA (fp32, `ShardedEMA`) | 4N/W if w=2, else 4N | 4N/W | 4N/W | 4N/W |

(DeepSpeed 0.19: bf16 at stage 0 runs its BF16_Optimizer, which shards masters and Adam state like stage 1
and accumulates gradients in a full fp32 buffer; fp32 weights at stage 0 run plain torch AdamW. The ZeRO
optimizers of stages 1-3 keep an fp32 copy of the rank's partition even when the weights are fp32, and, for
16-bit weights, an fp32 copy of the rank's gradient partition for the step.)

Transients on top: ZeRO's buffers (stage >= 2: the reduce bucket, `reduce_bucket_size` elements; stage 3:
also the prefetch bucket `stage3_prefetch_bucket_size` and the gathered weights, which DeepSpeed keeps up
to `stage3_max_live_parameters` elements — at least two blocks, at most the whole model: with DeepSpeed's
default 1e9 and a reuse distance as large, a recomputing backward can keep all of L gathered); activations of one micro-batch (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models": s·b·h·(34 + 5·a·s/h) bytes per layer for 16-bit
activations (precision bf16); doubled for fp32 and for amp_bf16, whose autocast keeps the residual
stream and the norms in fp32 (measured on an H200, docs/training.md); with full checkpointing each
block keeps only its input, s·b·h·act_bytes, plus one block's full set during its recompute); and the head's logits (fp32, kept with their softmax
for the backward). Sequence lengths are the largest a step can see: the encoder at the smallest mask
ratio (buffer + (1 - mask_ratio_min)·L tokens), the decoder at buffer + L, the head over every position
(mask ratio 1) with C / channel_group steps. The optimizer step's temporaries come after the backward has
freed those: ~3 fp32 copies of the largest tensor AdamW steps (the stage-3 sub-group, `sub_group_size`;
the rank's flat partition at stages 1-2; one weight at stage 0), so total = state + max(ZeRO buffers +
activations, optimizer step). Resident memory on a CPU rank matches this only with freed blocks
returned to the kernel (`engine.host_mmap_threshold_mb`, tb_core/hostmem.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tb_model.config import ModelConfig, resolve
from tb_model.registry import count_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank, by part (see the module docstring for each formula)."""
    params: float
    masters: float
    grads: float
    optimizer: float
    ema: float
    zero_buffers: float
    activations: float
    optimizer_step: float = 0.0

    @property
    def state(self) -> float:
        """What persists between steps: params + masters + grads + optimizer + EMA."""
        return self.params + self.masters + self.grads + self.optimizer + self.ema

    @property
    def total(self) -> float:
        """The peak: the state plus the largest of the transients that do not overlap in time (ZeRO buffers
        and activations live during forward/backward, the optimizer's temporaries during its step)."""
        return self.state + max(self.zero_buffers + self.activations, self.optimizer_step)

    def as_gib(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) / 2 ** 30 for f in dataclasses.fields(self)}
        return dict(out, state=self.state / 2 ** 30, total=self.total / 2 ** 30)


def _block_params(cfg: ModelConfig) -> int:
    """Parameters of the largest transformer block (MAR or head): 12 w^2 + adaLN's 6 w^2 in the head."""
    mar = 12 * cfg.width ** 2 + 13 * cfg.width
    head = 18 * cfg.head_width ** 2 + 19 * cfg.head_width
    return max(mar, head)


def _layer_activations(tokens: int, batch: int, width: int, heads: int, act_bytes: int, checkpointed: bool,
                       depth: int) -> tuple[float, float]:
    """(stored bytes of `depth` layers, one layer's full set) for sequences of `tokens`."""
    full = tokens * batch * width * (34 + 5 * heads * tokens / width) * act_bytes / 2
    stored = tokens * batch * width * act_bytes if checkpointed else full
    return depth * stored, full


def activation_bytes(cfg: ModelConfig, micro_batch: int, act_bytes: int, checkpointing: str) -> float:
    """Activations kept for one micro-batch's backward (module docstring), checkpointing 'none' or 'full'
    ('every_k' is counted as 'none': an upper bound)."""
    cfg = resolve(cfg)
    ckpt = checkpointing == "full"
    seq = cfg.latent_size ** 2
    enc_tokens = cfg.buffer_size + round((1 - cfg.mask_ratio_min) * seq)
    steps = cfg.latent_channels // cfg.channel_group
    parts = [
        _layer_activations(enc_tokens, micro_batch, cfg.width, cfg.num_heads, act_bytes, ckpt, cfg.encoder_depth),
        _layer_activations(cfg.buffer_size + seq, micro_batch, cfg.width, cfg.num_heads, act_bytes, ckpt,
                           cfg.decoder_depth),
        _layer_activations(steps, micro_batch * seq, cfg.head_width, cfg.head_num_heads, act_bytes, ckpt,
                           cfg.head_depth),
    ]
    stored = sum(p[0] for p in parts)
    recompute = max(p[1] for p in parts) if ckpt else 0.0
    logits = 3 * 4 * micro_batch * seq * steps * cfg.quantizer.levels ** cfg.channel_group
    return stored + recompute + logits


def estimate(cfg: ModelConfig, stage: int, world: int, precision: str, micro_batch: int,
             checkpointing: str = "none", zero: dict | None = None) -> MemoryEstimate:
    """Per-rank bytes of training `cfg` at ZeRO `stage` on `world` ranks (module docstring).

    precision: fp32 | bf16 | amp_bf16; zero: the run's `zero_optimization` dict (bucket sizes), else the
    packaged configs/deepspeed/zero<stage>.json's."""
    from tb_train.engine.engine import weight_dtype  # engine imports DeepSpeed lazily; this keeps it light

    if zero is None:
        from tb_train.engine.engine import EngineConfig, deepspeed_config
        from tb_train.engine.optim import OptimConfig
        zero = deepspeed_config(EngineConfig(deepspeed=f"zero{stage}", precision=precision), OptimConfig(),
                                micro_batch, world)["zero_optimization"]
    n = count_params(cfg)["total"]
    w = torch.finfo(weight_dtype(precision)).bits // 8
    half = w == 2
    shard = n / world
    params = w * n if stage < 3 else w * shard
    masters = 4 * shard if (stage > 0 or half) else 0.0
    if stage == 0:
        grads = w * n + (4 * n if half else 0)
    else:
        grads = (w * n if stage == 1 else w * shard) + (4 * shard if half else 0)
    optimizer = 8 * shard if (stage > 0 or half) else 8 * n
    ema = 4 * shard if (stage > 0 or half) else 4 * n
    buffers = 0.0
    if stage >= 2:
        buffers += w * float(zero.get("reduce_bucket_size", 5e8))
    if stage == 3:
        live = max(float(zero.get("stage3_max_live_parameters", 1e9)), 2 * _block_params(resolve(cfg)))
        buffers += w * float(zero.get("stage3_prefetch_bucket_size", 5e7)) + w * min(n, live)
    # the optimizer step's temporaries: torch AdamW (foreach off on CPU; the ZeRO optimizers step one flat
    # fp32 tensor per group / stage-3 sub-group) allocates ~3 fp32 copies of the largest tensor it steps
    # (measured at L, ZeRO-3, world 2: +2.7 GiB over a 0.9 GiB partition, +1.1 GiB with 1e8 sub-groups)
    if stage == 3:
        chunk = min(shard, float(zero.get("sub_group_size", 1e9)))
    elif stage > 0 or half:
        chunk = shard
    else:
        chunk = _block_params(resolve(cfg)) / 3  # plain per-parameter AdamW: one fc1/adaLN weight
    step = 3 * 4 * chunk
    # 16-bit activations only where the weights are 16-bit: under amp_bf16's autocast the residual
    # stream, the norms and the tensors they save stay fp32 (measured on one H200, L and H, micro-batch
    # 16-128, amp_bf16, world 1: peak / this model 0.92-1.26 with 4 bytes, 1.12-2.20 with 2)
    act_bytes = 2 if precision == "bf16" else 4
    acts = activation_bytes(cfg, micro_batch, act_bytes, checkpointing)
    return MemoryEstimate(params, masters, grads, optimizer, ema, buffers, acts, step)


__all__ = ["MemoryEstimate", "estimate", "activation_bytes"]
