"""Per-position token heads: turn one MAR output z into the C quantized channel indices of a token.

`ARHead` is TokenBridge's dimension-wise autoregressive head. For a position it runs a small causal
transformer over the sequence [cond, E_0(t_0), ..., E_{S-2}(t_{S-2})] (cond = Linear(z), one embedding
table per step, a learned step position embedding) whose blocks are adaLN-Zero modulated by
cond + a learned per-step embedding; step i's output goes through its own classifier to give the
logits of token t_i. Layout as in the authors' release (qk-norm LayerNorms, an extra LayerNorm
before the adaLN final modulation); sizes per size preset in tb_model.config. Initial weights follow
the release too (`_HeadBase.init_weights`; token tables N(0, 1), tests/test_init.py states every rule).

`ParallelHead` (the paper's ablation) predicts all steps at once from cond alone: the same trunk
without token embeddings, so the channels are conditionally independent given z.

Channel grouping (`group` = k): k consecutive channels (in generation order) form one step whose
class is the mixed-radix number t_0 * levels^(k-1) + ... + t_{k-1}, so S = C / k steps of levels^k
classes.

Sampling draws one uniform per (position, step) up front and inverts the softmax CDF, so the cached
loop (a preallocated KV cache, one new token per step) and the uncached prefix recomputation (the
released code's way) consume identical random numbers and pick identical tokens.

`sample_step` is the part of sampling that torch.compile fuses (`TokenBridge.generation_fns`): for the AR
head one token through the cached trunk, its classifier and the pick, with the step's classifier weights
passed in as tensors, so that one compiled function serves every step (the step index reaches it only
as the cache position); the loop over steps stays in Python, which keeps compiling fast: a compiled
loop unrolls steps x blocks into one graph (measured at L's head shape on the 2-core CPU: 105 s of
dynamo/AOT tracing for the loop, 32 s for the three traces of the step function).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mar import LN_EPS, Attention, Mlp, init_layers
from .partitioned import full_tensors


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from a per-step condition c [N, T, w]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_dropout, dropout, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, cache: Tensor | None = None, pos: int = 0,
                mod: Tensor | None = None) -> Tensor:
        """x [N, T, dim] at positions pos..pos+T-1, c [N, T, dim] their conditions.

        Cached sampling (one token per call): cache [2, N, heads, S, head_dim] (see Attention) and
        mod [N, S, 6 dim], a caller-owned modulation cache; c then holds the conditions of ALL S
        steps, whose modulation is computed in one matmul at pos 0 and read back later (at small
        batch the weight reads, not the FLOPs, bound the speed).
        """
        if mod is None:
            m = self.adaLN_modulation(c)
        else:
            if pos == 0:
                mod.copy_(self.adaLN_modulation(c))
            m = mod[:, pos:pos + x.shape[1]]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), self.causal, cache, pos)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalModulation(nn.Module):
    """Affine-free LayerNorm followed by an adaLN scale/shift (the authors' `FinalLayer`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.apply_modulation(x, self.adaLN_modulation(c))

    def apply_modulation(self, x: Tensor, mod: Tensor) -> Tensor:
        """x [N, T, dim], mod = adaLN_modulation(c) [N, T, 2 dim] -> [N, T, dim]."""
        scale, shift = mod.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


def pick_tokens(logits: Tensor, uniforms: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Sample from softmax(logits / T) by inverse CDF: logits [..., K], uniforms [...] -> (tokens, log p).

    log p is the untempered model log-probability of the picked token (the confidence score).
    temperature 0 picks the argmax.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1)
        tokens = (cdf < uniforms[..., None] * cdf[..., -1:]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, logp


class _HeadBase(nn.Module):
    """Shared trunk: cond projection, step embeddings, adaLN blocks, final modulation, classifiers."""

    causal: bool

    def __init__(self, cond_dim: int, width: int, depth: int, num_heads: int, channels: int, levels: int,
                 group: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.1, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if group < 1 or channels % group:
            raise ValueError(f"channel_group {group} must divide the {channels} latent channels")
        self.channels, self.levels, self.group = channels, levels, group
        self.steps, self.classes = channels // group, levels ** group
        self.cond_proj = nn.Linear(cond_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.steps, width))
        self.step_embed = nn.Parameter(torch.zeros(1, self.steps, width))
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, num_heads, mlp_ratio, dropout, attn_dropout, self.causal) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.final = FinalModulation(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, self.classes) for _ in range(self.steps))

    def init_weights(self) -> None:
        """The released `initialize_weights` for the channel-AR part (names there in brackets).

        Every Linear and LayerNorm by `init_layers`: xavier-uniform/0 (cond_proj [condition_proj],
        attention, MLP, classifiers [channel_heads]), 1/0 (block norms, qk-norms, norm [channel_norm]);
        token tables [token_embeddings] N(0, 1): the release never re-initialises them, so they keep
        PyTorch's nn.Embedding default, drawn here explicitly so that a re-init after `to_empty()`
        writes them too; pos_embed [channel_embed] and step_embed [timesteps_embeddings] N(0, 0.02);
        the last Linear of every adaLN modulation (blocks and final [channel_final]) zero, weight and
        bias, so every block starts as the identity (adaLN-Zero). With channel_group k > 1 the token
        tables have levels**k rows (the release has no grouping) and take the same N(0, 1).
        `ParallelHead` (no released counterpart) follows the same rules without token tables.
        """
        init_layers(self)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                with full_tensors([m.weight]):
                    nn.init.normal_(m.weight, mean=0.0, std=1.0)  # = nn.Embedding.reset_parameters (no padding_idx)
        for p in (self.pos_embed, self.step_embed):
            with full_tensors([p]):
                nn.init.normal_(p, std=0.02)
        for blk in [*self.blocks, self.final]:
            last = blk.adaLN_modulation[-1]
            with full_tensors(last.parameters()):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def group_tokens(self, tokens: Tensor) -> Tensor:
        """Channel tokens [N, C] (generation order) -> step classes [N, S]."""
        if self.group == 1:
            return tokens
        radix = self.levels ** torch.arange(self.group - 1, -1, -1, device=tokens.device)
        return (tokens.view(-1, self.steps, self.group) * radix).sum(-1)

    def ungroup_tokens(self, classes: Tensor) -> Tensor:
        """Step classes [N, S] -> channel tokens [N, C] (inverse of group_tokens)."""
        if self.group == 1:
            return classes
        radix = self.levels ** torch.arange(self.group - 1, -1, -1, device=classes.device)
        return (classes[..., None] // radix % self.levels).flatten(1)

    def marginal_logprobs(self, logits: Tensor) -> Tensor:
        """Per-channel marginal log-probs of grouped logits: [N, S, levels^k] -> [N, C, levels]."""
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.group == 1:
            return logp
        grid = logp.view(*logp.shape[:2], *([self.levels] * self.group))
        dims = range(2, 2 + self.group)
        per = [torch.logsumexp(grid, dim=[d for d in dims if d != j]) for j in dims]
        return torch.stack(per, dim=2).flatten(1, 2)

    def _trunk(self, x: Tensor, c: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x, c)
        return self.final(self.norm(x), c)

    def _logits(self, cond: Tensor, x: Tensor) -> Tensor:
        """Every step's logits [N, S, classes] of the trunk inputs x [N, S, width], conditioned per step on
        cond [N, width] + the step embedding (teacher-forced AR head, or the parallel head)."""
        return self._classify(self._trunk(x, cond[:, None] + self.step_embed.to(cond.dtype)))

    def _classify(self, h: Tensor, first: int = 0) -> Tensor:
        """h [N, T, w] for steps first..first+T-1 -> logits [N, T, classes]."""
        return torch.stack([self.classifiers[first + i](h[:, i]) for i in range(h.shape[1])], dim=1)


class ARHead(_HeadBase):
    """Dimension-wise autoregressive head; see the module docstring."""

    causal = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        width = self.pos_embed.shape[-1]
        self.token_embed = nn.ModuleList(nn.Embedding(self.classes, width) for _ in range(self.steps - 1))
        self.init_weights()

    def _inputs(self, cond: Tensor, classes: Tensor) -> Tensor:
        """Sequence [cond, E_0(t_0), ...] for the first 1 + classes.shape[1] steps, with step pos-emb."""
        parts = [cond[:, None]] + [self.token_embed[i](classes[:, i])[:, None] for i in range(classes.shape[1])]
        x = torch.cat(parts, dim=1)
        return x + self.pos_embed[:, :x.shape[1]].to(x.dtype)

    def forward(self, z: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits: z [N, cond_dim], tokens [N, C] long (generation order) -> [N, S, classes]."""
        cond = self.cond_proj(z)
        return self._logits(cond, self._inputs(cond, self.group_tokens(tokens)[:, :-1]))

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
               use_cache: bool = True, uniforms: Tensor | None = None,
               step: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """Sample tokens step by step: z [N, cond_dim] -> (tokens [N, C] long, summed log-prob [N]).

        use_cache=False recomputes the whole prefix at every step (the released code's loop).
        uniforms [N, steps] (optional) replaces the draw from `generator` (per-sample random streams).
        step: the cached loop's per-token function, `sample_step` (default) or a compiled version of it.
        """
        step = self.sample_step if step is None else step
        N = z.shape[0]
        if uniforms is None:
            uniforms = torch.rand(N, self.steps, device=z.device, generator=generator)
        cond = self.cond_proj(z)
        c_all = cond[:, None] + self.step_embed.to(cond.dtype)
        picked = torch.zeros(N, 0, dtype=torch.long, device=z.device)
        logp = torch.zeros(N, device=z.device, dtype=torch.promote_types(cond.dtype, torch.float32))
        if use_cache:
            heads, head_dim = self._attn_shape()
            depth, width = len(self.blocks), cond.shape[-1]
            caches = torch.empty(depth, 2, N, heads, self.steps, head_dim, device=z.device, dtype=cond.dtype)
            mods = torch.empty(depth, N, self.steps, 6 * width, device=z.device, dtype=cond.dtype)
            # A copy, not the Linear's output view: a compiled `step` guards on the sizes of an input
            # view's base, and chance equalities there (N S = 2 width) would trigger recompiles.
            final_mod = self.final.adaLN_modulation(c_all).clone()
        for s in range(self.steps):
            if use_cache:
                x = self._inputs(cond, picked) if s == 0 else (
                    self.token_embed[s - 1](picked[:, s - 1])[:, None] + self.pos_embed[:, s:s + 1].to(cond.dtype))
                classifier = self.classifiers[s]
                tok, lp = step(x, s, c_all, caches, mods, final_mod, classifier.weight, classifier.bias,
                               uniforms[:, s].contiguous(), temperature)
            else:
                x = self._inputs(cond, picked)
                h = self._trunk(x, c_all[:, :s + 1])[:, s:s + 1]
                tok, lp = pick_tokens(self._classify(h, s)[:, 0], uniforms[:, s], temperature)
            picked = torch.cat([picked, tok[:, None]], dim=1)
            logp += lp
        return self.ungroup_tokens(picked), logp

    def sample_step(self, x: Tensor, pos: int, c_all: Tensor, caches: Tensor, mods: Tensor, final_mod: Tensor,
                    weight: Tensor, bias: Tensor, uniforms: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """One step of the cached loop: the input token x [N, 1, w] at step `pos` through the trunk, then
        step `pos`'s classifier (weight, bias) and the pick with the step's uniforms [N] -> (classes [N],
        log p [N]).

        caches [depth, 2, N, heads, S, head_dim] and mods [depth, N, S, 6 w] are the loop's KV and
        modulation caches (written here: mods at pos 0, the KV rows at pos), final_mod [N, S, 2 w] the
        final modulation of every step. The caller passes whole tensors and fresh ones (no views of a
        larger tensor), so that a compiled version sees the same input layout at every step.
        """
        for i, blk in enumerate(self.blocks):
            x = blk(x, c_all, caches[i], pos, mods[i])
        h = self.final.apply_modulation(self.norm(x), final_mod[:, pos:pos + 1])
        return pick_tokens(F.linear(h[:, 0], weight, bias), uniforms, temperature)

    def _attn_shape(self) -> tuple[int, int]:
        """(heads, head_dim) read from the first block's attention, through a wrapper if present."""
        for m in self.blocks[0].modules():
            if isinstance(m, Attention):
                return m.num_heads, m.head_dim
        raise RuntimeError("no Attention module found in the head's first block")


class ParallelHead(_HeadBase):
    """All steps predicted independently from cond (the paper's parallel ablation)."""

    causal = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_weights()

    def forward(self, z: Tensor, tokens: Tensor | None = None) -> Tensor:
        """z [N, cond_dim] -> logits [N, S, classes] (tokens unused: no teacher forcing)."""
        cond = self.cond_proj(z)
        return self._logits(cond, cond[:, None] + self.pos_embed.to(cond.dtype))

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
               use_cache: bool = True, uniforms: Tensor | None = None,
               step: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """One pass for all steps: z [N, cond_dim] -> (tokens [N, C], summed log-prob [N]).

        use_cache is unused (nothing to cache); step: `sample_step` (default) or a compiled version of it.
        """
        if uniforms is None:
            uniforms = torch.rand(z.shape[0], self.steps, device=z.device, generator=generator)
        return (self.sample_step if step is None else step)(z, uniforms, temperature)

    def sample_step(self, z: Tensor, uniforms: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """The parallel head's only step: every step's tokens at once, z [N, cond_dim], uniforms [N, steps]
        -> (tokens [N, C], summed log-prob [N])."""
        tok, lp = pick_tokens(self.forward(z), uniforms, temperature)
        return self.ungroup_tokens(tok), lp.sum(dim=1)
