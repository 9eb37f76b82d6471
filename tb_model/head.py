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

`sample_step` is one step of the cached loop, fused (docs/sampling.md, "The fused head step"): the
modulation of every block and the final layer for every step comes from ONE GEMM per `sample` call
(the adaLN Linears stacked, `SamplingWeights`), LayerNorm + modulate and x + gate * branch are one
addcmul each, QKV is one GEMM whose keys and values go into the preallocated cache row in place, the
new query attends over the whole cache with an additive causal row, and on a CPU in float32 the GEMMs
run on oneDNN-packed weights (GELU fused into fc1); at one or two rows the whole loop over steps is
one call of tb_model.rowkernels instead (`step_kernel` chooses). Every shape is the same at every step and `pos`
only slices, so torch.compile (`TokenBridge.generation_fns`) traces it once for all steps and batch
sizes; the loop over steps stays in Python, which keeps compiling fast (a compiled loop unrolls
steps x blocks into one graph: 105 s of tracing at L's head shape on the 2-core CPU, against 32 s for
the step function). The training forward (teacher forcing) and the prefix loop do not use it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rowkernels
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

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [N, T, dim], c [N, T, dim] the per-step conditions (training and the prefix-recompute loop;
        cached sampling runs `ARHead.sample_step`, which fuses the same arithmetic)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), self.causal)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalModulation(nn.Module):
    """Affine-free LayerNorm followed by an adaLN scale/shift (the authors' `FinalLayer`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
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


# The product kernels of the fused step (`step_kernel` picks one per `sample` call):
#   linear        F.linear on the parameters (GPU, bf16/float64, a compiled step: autocast and tracing see it)
#   onednn        oneDNN on weights packed once in its default layout (CPU float32, 3+ rows)
#   onednn_rows1  oneDNN on weights packed for one row (CPU float32, 1 row, no tb_model.rowkernels here)
#   rows          tb_model.rowkernels: the whole loop one C call on the parameters (CPU float32, 1-2 rows:
#                 reads each weight once at ~the machine's read rate, no torch ops between the products)
KERNELS = ("linear", "onednn", "onednn_rows1", "rows")


class BlockWeights(NamedTuple):
    """One block's tensors for the fused step: (weight, bias) pairs; Linear weights packed or plain."""

    norm1: tuple[Tensor, Tensor]
    qkv: tuple[Tensor, Tensor]
    q_norm: tuple[Tensor, Tensor]
    k_norm: tuple[Tensor, Tensor]
    proj: tuple[Tensor, Tensor]
    norm2: tuple[Tensor, Tensor]
    fc1: tuple[Tensor, Tensor]
    fc2: tuple[Tensor, Tensor]


class SamplingWeights(NamedTuple):
    """The AR head's weights in the layout of the fused sampling step: a derived, sampling-only view
    (parameters, their names and shapes stay as they are; `ARHead.sampling_weights` rebuilds it when
    they change).

    mod stacks the adaLN Linear of every block and then the final one's ([(6 depth + 2) w, w]), so the
    modulation of every block at every step is ONE GEMM per `sample` call. classifiers: every step's
    classifier stacked ([S, classes, w], [S, classes]), indexed by the step inside the step function.
    kernel (one of KERNELS): how the trunk's products run. oneDNN-packed weights are packed once, so a
    GEMM of a few rows skips the weight repacking that MKL's sgemm does at every call (measured at L's
    shapes, 2 threads: 64 rows 1.6x, 1 row 2.8x faster). The modulation GEMM (S x N rows) runs on the
    default oneDNN packing whenever the trunk's kernel is not `linear`. rows: the blocks prepared for
    tb_model.rowkernels (kernel `rows` only, else None).
    """

    mod: tuple[Tensor, Tensor]
    blocks: tuple[BlockWeights, ...]
    norm: tuple[Tensor, Tensor]
    classifiers: tuple[Tensor, Tensor]
    heads: int
    kernel: str
    rows: rowkernels.HeadLoop | None = None


class SamplingState(NamedTuple):
    """Buffers of one cached `sample` call, allocated before the first step.

    mods [S, N, (6 depth + 2) w]: every step's modulation, scales stored as 1 + scale; caches
    [depth, 2, N, heads, S, head_dim]: keys (after the k-norm) and values, zero where not yet written;
    mask [S, 1, S]: additive causal rows (row s: 0 up to s, -inf after).
    """

    mods: Tensor
    caches: Tensor
    mask: Tensor


# The fused step's weights per head, outside the module so that state_dict, deepcopy and pickling never
# see them (packed oneDNN tensors cannot be copied); freed with the head.
_SAMPLING_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onednn_packable(t: Tensor) -> bool:
    """Whether the fused step can run on oneDNN-packed weights for activations like t (CPU float32)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def step_kernel(cond: Tensor) -> str:
    """The trunk's product kernel for a cached `sample` call on cond [N, w] (see KERNELS).

    Measured at L's head shapes, 2 threads, the 16 trunk products of a step against the time to read
    their weights once: 1 row rowkernels' product 1.22x, oneDNN M=1 packing 1.32x, default packing
    1.66x; 2 rows 1.29x against default packing 1.68x; 4 rows 1.62x against 1.41x (so rowkernels keeps
    to MAX_ROWS rows)."""
    if not onednn_packable(cond):
        return "linear"
    if rowkernels.usable(cond):
        return "rows"
    return "onednn_rows1" if cond.shape[0] == 1 else "onednn"


def fused_linear(x: Tensor, weight_bias: tuple[Tensor, Tensor], kernel: str, gelu: bool = False) -> Tensor:
    """x [M, in] @ weight.T + bias (then exact-erf GELU if gelu) with `kernel` (one of KERNELS): oneDNN
    with the GELU as a post-op on packed weights, else F.linear (which autocast sees); the `rows` kernel
    runs the whole loop (`rowkernels.HeadLoop`), not single products."""
    weight, bias = weight_bias
    if kernel in ("onednn", "onednn_rows1"):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def _unwrap(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """The `cls` module inside `module`, through an activation-checkpointing wrapper if present."""
    for m in module.modules():
        if isinstance(m, cls):
            return m
    raise RuntimeError(f"no {cls.__name__} inside {type(module).__name__}")


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

    def _apply(self, fn: Callable, recurse: bool = True) -> "ARHead":
        """Drops the fused step's weights first: after .to()/.cuda()/.half() they would keep a copy of
        the parameters on the old device or dtype alive until the next sample."""
        _SAMPLING_WEIGHTS.pop(self, None)
        return super()._apply(fn, recurse)

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

        use_cache=False recomputes the whole prefix at every step (the released code's loop, kept as
        the reference). uniforms [N, steps] (optional) replaces the draw from `generator` (per-sample
        random streams). step: the cached loop's per-token function, `sample_step` (default) or a
        compiled version of it; a compiled one gets the plain (unpacked) weights, which it can trace
        (kernel `linear`); `sample_step` itself gets `step_kernel(cond)`'s.
        The cached step computes as in eval mode (no dropout), as `TokenBridge.generate` runs it.
        """
        N = z.shape[0]
        if uniforms is None:
            uniforms = torch.rand(N, self.steps, device=z.device, generator=generator)
        cond = self.cond_proj(z)
        logp = torch.zeros(N, device=z.device, dtype=torch.promote_types(cond.dtype, torch.float32))
        if not use_cache:
            return self._sample_prefix(cond, uniforms, temperature, logp)
        plain = step is None or step == self.sample_step
        weights = self.sampling_weights(step_kernel(cond) if plain else "linear")
        state = self._sampling_state(cond, weights)
        step = self.sample_step if step is None else step
        pos_embed = self.pos_embed[0].to(cond.dtype)
        picked = torch.empty(N, self.steps, dtype=torch.long, device=z.device)
        x = cond + pos_embed[0]
        if weights.rows is not None:  # every step in one C call (built only for `sample_step` itself)
            weights.rows(x, 0, self.steps, state.mods, state.caches, uniforms.to(cond.dtype).contiguous(), temperature,
                         picked, logp, LN_EPS)
            return self.ungroup_tokens(picked), logp
        for s in range(self.steps):
            if s:
                x = self.token_embed[s - 1](picked[:, s - 1]) + pos_embed[s]
            picked[:, s], lp = step(x, s, weights, state, uniforms[:, s].contiguous(), temperature)
            logp += lp
        return self.ungroup_tokens(picked), logp

    def _sample_prefix(self, cond: Tensor, uniforms: Tensor, temperature: float,
                       logp: Tensor) -> tuple[Tensor, Tensor]:
        """The released loop: at step s the whole prefix [cond, E_0(t_0), ..., E_{s-1}(t_{s-1})] runs
        through the trunk again (with dropout if the head is in training mode); logp [N] accumulates."""
        c_all = cond[:, None] + self.step_embed.to(cond.dtype)
        picked = torch.zeros(cond.shape[0], 0, dtype=torch.long, device=cond.device)
        for s in range(self.steps):
            h = self._trunk(self._inputs(cond, picked), c_all[:, :s + 1])[:, s:s + 1]
            tok, lp = pick_tokens(self._classify(h, s)[:, 0], uniforms[:, s], temperature)
            picked = torch.cat([picked, tok[:, None]], dim=1)
            logp += lp
        return self.ungroup_tokens(picked), logp

    def sampling_weights(self, kernel: str) -> SamplingWeights:
        """The weights of the fused step (`SamplingWeights`) for `kernel` (one of KERNELS), built once
        per kernel and reused until a parameter changes (training steps, EMA swaps, loads and moves bump
        a tensor's version or its address; `_apply` drops them at once, so a moved model holds no copy
        on its old device). `linear` and `rows` use the parameters themselves for the trunk."""
        if kernel not in KERNELS:
            raise ValueError(f"sampling kernel {kernel!r}: want one of {KERNELS}")
        if torch.compiler.is_compiling():  # traced into a graph: built there (a graph cannot compare pointers)
            return self._build_sampling_weights(kernel)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        held = _SAMPLING_WEIGHTS.get(self)
        if held is None or held[0] != key:
            _SAMPLING_WEIGHTS.pop(self, None)  # free the old copies before building new ones
            held = (key, {})
            _SAMPLING_WEIGHTS[self] = held
        if kernel not in held[1]:
            held[1][kernel] = self._build_sampling_weights(kernel)
        return held[1][kernel]

    def _build_sampling_weights(self, kernel: str) -> SamplingWeights:
        blocks = [_unwrap(blk, AdaLNBlock) for blk in self.blocks]
        reorder = torch.ops.mkldnn._reorder_linear_weight

        def trunk(w: Tensor) -> Tensor:
            if kernel in ("linear", "rows"):
                return w
            return reorder(w, 1) if kernel == "onednn_rows1" else reorder(w)

        def pack(w: Tensor) -> Tensor:  # the modulation GEMM has S x N rows: default layout
            return w if kernel == "linear" else reorder(w)

        def linear(m: nn.Linear) -> tuple[Tensor, Tensor]:
            return trunk(m.weight.detach()), m.bias.detach()

        def norm(m: nn.LayerNorm) -> tuple[Tensor, Tensor]:
            return m.weight.detach(), m.bias.detach()

        mods = [blk.adaLN_modulation[-1] for blk in blocks] + [self.final.adaLN_modulation[-1]]
        trunk_weights = tuple(BlockWeights(norm(b.norm1), linear(b.attn.qkv), norm(b.attn.q_norm), norm(b.attn.k_norm),
                                           linear(b.attn.proj), norm(b.norm2), linear(b.mlp.fc1), linear(b.mlp.fc2))
                              for b in blocks)
        heads, final_norm = blocks[0].attn.num_heads, norm(self.norm)
        classifiers = (torch.stack([c.weight.detach() for c in self.classifiers]),
                       torch.stack([c.bias.detach() for c in self.classifiers]))
        return SamplingWeights(
            mod=(pack(torch.cat([m.weight.detach() for m in mods])), torch.cat([m.bias.detach() for m in mods])),
            blocks=trunk_weights, norm=final_norm, classifiers=classifiers, heads=heads, kernel=kernel,
            rows=rowkernels.HeadLoop([[t for pair in b for t in pair] for b in trunk_weights], final_norm, classifiers,
                                     torch.stack([e.weight.detach() for e in self.token_embed]) if self.steps > 1
                                     else torch.zeros(0, self.classes, self.pos_embed.shape[-1]),
                                     self.pos_embed[0].detach(), heads) if kernel == "rows" else None)

    def _sampling_state(self, cond: Tensor, weights: SamplingWeights) -> SamplingState:
        """The loop's buffers for cond [N, w]: every modulation of every step in ONE GEMM, the scales
        turned into 1 + scale in place (what `modulate` multiplies by, rounded the same), a zeroed KV
        cache and the additive causal mask rows."""
        S, (N, w), depth = self.steps, cond.shape, len(weights.blocks)
        c = F.silu(cond[None] + self.step_embed[0, :, None].to(cond.dtype))  # [S, N, w], step-major
        mod_kernel = "linear" if weights.kernel == "linear" else "onednn"
        mods = fused_linear(c.view(S * N, w), weights.mod, mod_kernel).view(S, N, 6 * depth + 2, w)
        per_block = mods[:, :, :6 * depth].view(S, N, depth, 6, w)
        per_block[:, :, :, 1].add_(1)  # scale1
        per_block[:, :, :, 4].add_(1)  # scale2
        mods[:, :, 6 * depth].add_(1)  # the final modulation is (scale, shift)
        heads = weights.heads
        caches = torch.zeros(depth, 2, N, heads, S, w // heads, device=cond.device, dtype=mods.dtype)
        causal = torch.ones(S, S, dtype=torch.bool, device=cond.device).triu(1)
        mask = torch.zeros(S, 1, S, device=cond.device, dtype=mods.dtype).masked_fill_(causal[:, None], -math.inf)
        return SamplingState(mods.view(S, N, -1), caches, mask)

    def sample_step(self, x: Tensor, pos: int, weights: SamplingWeights, state: SamplingState, uniforms: Tensor,
                    temperature: float) -> tuple[Tensor, Tensor]:
        """One step of the cached loop, fused: the input token x [N, w] at step `pos` through every block
        and the final modulation, step `pos`'s classifier and the pick with its uniforms [N]
        -> (classes [N], log p [N]).

        The same arithmetic as the blocks' forward in eval mode, in fewer ops: modulation read from
        `state.mods` (one GEMM for all blocks and steps, made by `sample`), LayerNorm + modulate as one
        layer_norm and one addcmul, x + gate * branch as one addcmul, QKV one GEMM whose keys (after
        the k-norm) and values go straight into row `pos` of the preallocated cache, attention of the
        new query over the whole cache with the causal mask row `pos` added (rows after pos are zero
        and masked: exact zeros in the softmax), GELU fused into fc1 on oneDNN; with the `rows` kernel
        the step is one C call (`rowkernels.HeadLoop`) doing the same. Every shape is
        the same at every step; `pos` only indexes, so one compiled graph serves all steps.
        """
        if weights.rows is not None:  # the step in one C call (as `sample` runs the whole loop)
            picked = torch.zeros(x.shape[0], self.steps, dtype=torch.long)
            logp = torch.zeros(x.shape[0])
            u = torch.zeros(x.shape[0], self.steps)
            u[:, pos] = uniforms
            weights.rows(x, pos, pos + 1, state.mods, state.caches, u, temperature, picked, logp, LN_EPS)
            return picked[:, pos], logp
        w = x.shape[1]
        mods = state.mods[pos:pos + 1][0]  # slices, not integer indices: a compiled step keeps pos symbolic
        for i, (blk, cache) in enumerate(zip(weights.blocks, state.caches)):
            x = self._block_step(x, pos, blk, cache, mods[:, 6 * i * w:6 * (i + 1) * w], weights, state)
        scale, shift = mods[:, 6 * len(weights.blocks) * w:].split(w, dim=-1)
        h = torch.addcmul(shift, F.layer_norm(F.layer_norm(x, (w,), *weights.norm, LN_EPS), (w,), eps=LN_EPS), scale)
        cls_weight, cls_bias = weights.classifiers
        return pick_tokens(F.linear(h, cls_weight[pos:pos + 1][0], cls_bias[pos:pos + 1][0]), uniforms, temperature)

    @staticmethod
    def _block_step(x: Tensor, pos: int, blk: BlockWeights, cache: Tensor, mods: Tensor, weights: SamplingWeights,
                    state: SamplingState) -> Tensor:
        """One block of `sample_step` in torch ops: x [N, w] -> x; keys and values into row pos of cache."""
        N, w = x.shape
        S = cache.shape[-2]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.split(w, dim=-1)
        h = torch.addcmul(shift1, F.layer_norm(x, (w,), *blk.norm1, LN_EPS), scale1)
        qkv = fused_linear(h, blk.qkv, weights.kernel).view(N, 3, weights.heads, -1)
        D = qkv.shape[-1]
        cache[0, :, :, pos:pos + 1] = F.layer_norm(qkv[:, 1], (D,), *blk.k_norm, LN_EPS)[:, :, None]
        cache[1, :, :, pos:pos + 1] = qkv[:, 2, :, None]
        keys, values = cache.flatten(1, 2).unbind(0)  # [N heads, S, D] each
        q = F.layer_norm(qkv[:, 0], (D,), *blk.q_norm, LN_EPS).view(N * weights.heads, 1, D)
        scores = torch.baddbmm(state.mask[pos:pos + 1][0].expand(N * weights.heads, 1, S), q, keys.transpose(1, 2),
                               alpha=D ** -0.5)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        attn = torch.bmm(probs.to(values.dtype), values)
        x = torch.addcmul(x, gate1, fused_linear(attn.view(N, w), blk.proj, weights.kernel))
        h = torch.addcmul(shift2, F.layer_norm(x, (w,), *blk.norm2, LN_EPS), scale2)
        return torch.addcmul(x, gate2, fused_linear(fused_linear(h, blk.fc1, weights.kernel, gelu=True),
                                                    blk.fc2, weights.kernel))


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
