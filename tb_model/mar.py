"""MAR: the spatial masked-autoregressive encoder-decoder that turns a partly known latent grid into
one conditioning vector z per position.

Layout and behaviour follow the authors' MAR/TokenBridge code: 64 (configurable) buffer
tokens that all hold the class embedding, learned position embeddings for encoder and decoder plus
one added to the decoder output, bidirectional pre-norm ViT blocks (LayerNorm eps 1e-6, qkv bias,
MLP ratio 4, projection and attention dropout), an encoder that sees only the known positions and a
decoder that fills the unknown ones with a learned mask token. Label dropout replaces the class
embedding by a learned "fake" class, which is also the unconditional branch of classifier-free
guidance.

Blocks are kept in `nn.ModuleList`s and called as `blk(x)` so that a training engine can swap in
activation-checkpointing wrappers from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .partitioned import full_tensors

LN_EPS = 1e-6


def init_layers(module: nn.Module) -> None:
    """The authors' `_init_weights` (MAR and TokenBridge `models/*.py`), applied to every submodule:
    Linear weight xavier-uniform, Linear bias 0; LayerNorm weight 1, bias 0 (where affine).

    Like the released rule it leaves every other module alone, nn.Embedding included: each owner
    initialises its own tables (`MAR.init_weights`: class_emb N(0, 0.02); the head: its token tables
    N(0, 1), PyTorch's default that the release keeps).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with full_tensors(m.parameters(recurse=False)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            with full_tensors(m.parameters(recurse=False)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's Mlp layout)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention via F.scaled_dot_product_attention, optional qk-norm.

    The AR head's cached sampling does not come through here: `ARHead.sample_step` runs the same
    arithmetic fused, with its own KV cache.
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, proj_dropout: float,
                 qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        q, k, v = rearrange(self.qkv(x), "b t (qkv h d) -> qkv b h t d", qkv=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        return self.proj_drop(self.proj(rearrange(out, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Bidirectional pre-norm ViT block (timm `Block` layout: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def truncnorm_mask_ratio(u: Tensor, ratio_min: float, scale: float = 0.25) -> Tensor:
    """Inverse-CDF draw of MAR's mask ratio ~ truncnorm on [ratio_min, 1], loc 1, scale 0.25.

    u: uniforms in [0, 1) (any shape) -> ratios of the same shape, float64. Drawn with torch (not
    scipy's global numpy RNG, as the authors do) so that `torch.manual_seed` fixes it.
    """
    a = torch.tensor((ratio_min - 1.0) / scale, dtype=torch.float64)
    lo, hi = torch.special.ndtr(a), torch.tensor(0.5, dtype=torch.float64)
    p = lo + u.to(torch.float64).cpu() * (hi - lo)
    return (1.0 + scale * torch.special.ndtri(p)).clamp(ratio_min, 1.0)


def truncnorm_mean_ratio(ratio_min: float, scale: float = 0.25) -> float:
    """Expected mask ratio E[r] of the truncated normal above (used for FLOP counts)."""
    a = (ratio_min - 1.0) / scale
    pdf = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    return 1.0 + scale * (pdf(a) - pdf(0.0)) / (cdf(0.0) - cdf(a))


def masked_count(mask: Tensor) -> int:
    """Masked positions per row of a bool mask [B, L] (True = masked), read on the host.

    One device sync: only for callers that hold a mask but not its count (tests, a mask given to
    `TokenBridge.forward`). Every row must hold the same count (MAR draws one ratio per batch).
    """
    count = int(mask[0].sum())
    if not bool((mask.sum(1) == count).all()):
        raise ValueError("every row of the mask must hold the same number of masked positions")
    return count


def mask_positions(mask: Tensor, count: int, masked: bool = True) -> Tensor:
    """The `count` masked (or, masked=False, known) positions of every row, in increasing order:
    bool [B, L] -> long [B, count].

    The count comes from the caller's host-side bookkeeping, so the result has a shape known without
    looking at the device (boolean indexing `x[mask]` would have to read it back: a host sync, and a
    graph break under torch.compile). A stable sort keeps the positions in order, so a gather with
    them picks the same rows in the same order as `x[mask]` did.
    """
    key = mask if masked else ~mask
    return key.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :count]


class MAR(nn.Module):
    """Masked encoder-decoder over a grid of `seq_len` latent tokens of `token_dim` values each.

    forward(values [B, L, C], mask bool [B, L] (True = unknown), labels long [B], num_masked) -> z [B, L, width].
    Every row of `mask` must hold the same number of unknown positions (MAR draws one mask ratio per
    batch; generation masks whole batches alike), `num_masked`, given by the caller so that the pass
    never waits for the device. Label `num_classes` means the fake class.
    """

    def __init__(self, seq_len: int, token_dim: int, width: int, encoder_depth: int, decoder_depth: int,
                 num_heads: int, num_classes: int, buffer_size: int = 64, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, attn_dropout: float = 0.1, label_drop: float = 0.1,
                 mask_ratio_min: float = 0.7) -> None:
        super().__init__()
        self.seq_len, self.buffer_size, self.num_classes = seq_len, buffer_size, num_classes
        self.label_drop, self.mask_ratio_min = label_drop, mask_ratio_min
        self.class_emb = nn.Embedding(num_classes, width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.encoder_blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout, attn_dropout) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.decoder_blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout, attn_dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.output_pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.init_weights()

    def init_weights(self) -> None:
        """The authors' `initialize_weights`: class_emb, fake_latent, mask_token and the three learned
        position embeddings (output_pos_embed = MAR's diffusion_pos_embed_learned) N(0, 0.02); every
        Linear and LayerNorm by `init_layers`. Writes every parameter (also after `to_empty()`)."""
        with full_tensors([self.class_emb.weight]):
            nn.init.normal_(self.class_emb.weight, std=0.02)
        init_layers(self)
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.output_pos_embed):
            with full_tensors([p]):
                nn.init.normal_(p, std=0.02)

    # -- randomness of training (torch RNG, so the engine's manual_seed fixes it) -------------------
    def sample_orders(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """One random permutation of the positions per sample: [B, L] long."""
        return torch.rand(batch, self.seq_len, device=device, generator=generator).argsort(dim=1)

    def sample_mask_count(self, generator: torch.Generator | None = None) -> int:
        """Number of masked positions for a training batch: ceil(L * r), r ~ truncnorm in [min, 1]."""
        u = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu")
        ratio = float(truncnorm_mask_ratio(u, self.mask_ratio_min)[0])
        return min(self.seq_len, math.ceil(self.seq_len * ratio))

    @staticmethod
    def mask_from_orders(orders: Tensor, count: int) -> Tensor:
        """Mask the first `count` positions of each order: orders [B, L] -> bool [B, L]."""
        mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
        return mask.scatter(1, orders[:, :count], True)

    def class_embedding(self, labels: Tensor) -> Tensor:
        """labels [B] in 0..num_classes (num_classes = fake class) -> [B, width]; drops labels in training."""
        fake = labels >= self.num_classes
        if self.training and self.label_drop > 0:
            fake = fake | (torch.rand(labels.shape, device=labels.device) < self.label_drop)
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(fake[:, None], self.fake_latent.to(emb.dtype), emb)

    # -- network ---------------------------------------------------------------------------------
    def forward(self, values: Tensor, mask: Tensor, labels: Tensor, num_masked: int | None = None) -> Tensor:
        """num_masked: the number of True per row of `mask`, when the caller knows it on the host (the
        training mask count, the generation schedule). The encoder's sequence length depends on it, so
        reading it from the mask would stop the host until the device catches up (and break a
        torch.compile graph); None reads it from the mask (`masked_count`, for callers holding only a mask).
        """
        B, L, _ = values.shape
        if num_masked is None:
            num_masked = masked_count(mask)
        buf = self.buffer_size
        # Indices of the buffer plus the known positions, in increasing position order.
        keep = torch.cat([
            torch.arange(buf, device=values.device).expand(B, buf),
            mask_positions(mask, L - num_masked, masked=False) + buf,
        ], dim=1)

        x = self.z_proj(values)
        cls = self.class_embedding(labels).to(x.dtype)
        x = torch.cat([cls[:, None].expand(B, buf, x.shape[-1]), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.encoder_blocks:
            x = blk(x)
        x = self.decoder_embed(self.encoder_norm(x))

        full = self.mask_token.to(x.dtype).expand(B, buf + L, x.shape[-1])
        x = full.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, buf:] + self.output_pos_embed
