"""Initial weights: every parameter drawn by the rule of the authors' released constructor.

Released code read (LTH14/mar models/mar.py @231d76f; yuqingwang1029/TokenBridge models/tokenbridge.py
@713592c, same rules @d9ca34b):
  - `initialize_weights`: normal_(std=.02) for class_emb, fake_latent, mask_token, the encoder/decoder
    position embeddings and the output one (MAR: diffusion_pos_embed_learned; TokenBridge:
    output_pos_embed), and in TokenBridge also channel_embed and timesteps_embeddings; then
    `self.apply(self._init_weights)`; then constant_(0) on adaLN_modulation[-1] weight and bias of every
    channel block and of channel_final.
  - `_init_weights`: nn.Linear -> xavier_uniform_ weight, bias 0; nn.LayerNorm -> weight 1, bias 0
    (when affine). No nn.Embedding branch: the head's token_embeddings keep PyTorch's default N(0, 1).
    (The file also defines a module-level `init_weights` with trunc_normal(0.02) for Linear/Embedding;
    nothing calls it.)

RULES maps each parameter name (regex, full match) to exactly one rule; a parameter matched by no rule or
by two fails the test, so a new tensor must come with a stated rule.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from tb_model.registry import create

XAVIER = "xavier"  # std sqrt(2 / (fan_in + fan_out)), bound sqrt(6 / (fan_in + fan_out)), from the shape

LIN = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # the Linear layers of a transformer block
MAR_BLK = r"mar\.(encoder|decoder)_blocks\.\d+"
HEAD_BLK = r"head\.blocks\.\d+"

# (parameter-name pattern, rule, expected mean, expected std; XAVIER: from the shape; None: exact value)
RULES: list[tuple[str, str, float, float | str | None]] = [
    # ---- MAR (released MAR.initialize_weights / TokenBridge.initialize_weights) -------------------
    (r"mar\.class_emb\.weight", "normal", 0.0, 0.02),             # normal_(class_emb.weight, std=.02)
    (r"mar\.fake_latent", "normal", 0.0, 0.02),                   # normal_(fake_latent, std=.02)
    (r"mar\.mask_token", "normal", 0.0, 0.02),                    # normal_(mask_token, std=.02)
    (r"mar\.(encoder|decoder)_pos_embed_learned", "normal", 0.0, 0.02),  # normal_(..., std=.02)
    (r"mar\.output_pos_embed", "normal", 0.0, 0.02),              # output_pos_embed / MAR's diffusion_pos_embed_learned
    (r"mar\.(z_proj|decoder_embed)\.weight", "xavier_uniform", 0.0, XAVIER),  # _init_weights: Linear
    (r"mar\.(z_proj|decoder_embed)\.bias", "zeros", 0.0, None),               # _init_weights: bias 0
    (rf"{MAR_BLK}\.{LIN}\.weight", "xavier_uniform", 0.0, XAVIER),            # timm Block Linears, qkv whole
    (rf"{MAR_BLK}\.{LIN}\.bias", "zeros", 0.0, None),                         # (qkv_bias=True)
    (rf"({MAR_BLK}\.norm[12]|mar\.(z_proj_ln|encoder_norm|decoder_norm))\.weight", "ones", 1.0, None),
    (rf"({MAR_BLK}\.norm[12]|mar\.(z_proj_ln|encoder_norm|decoder_norm))\.bias", "zeros", 0.0, None),
    # ---- AR head (released channel-AR part of TokenBridge; its names in brackets) -------------------
    (r"head\.token_embed\.\d+\.weight", "normal", 0.0, 1.0),      # [token_embeddings] never re-initialised:
                                                                  # PyTorch's nn.Embedding default N(0, 1)
    (r"head\.pos_embed", "normal", 0.0, 0.02),                    # [channel_embed] normal_(std=.02)
    (r"head\.step_embed", "normal", 0.0, 0.02),                   # [timesteps_embeddings] normal_(std=.02)
    (r"head\.(cond_proj|classifiers\.\d+)\.weight", "xavier_uniform", 0.0, XAVIER),  # [condition_proj, channel_heads]
    (r"head\.(cond_proj|classifiers\.\d+)\.bias", "zeros", 0.0, None),
    (rf"{HEAD_BLK}\.{LIN}\.weight", "xavier_uniform", 0.0, XAVIER),           # [CausalBlock] Linears
    (rf"{HEAD_BLK}\.{LIN}\.bias", "zeros", 0.0, None),
    (rf"({HEAD_BLK}\.(norm[12]|attn\.q_norm|attn\.k_norm)|head\.norm)\.weight", "ones", 1.0, None),  # LN, qk-norm,
    (rf"({HEAD_BLK}\.(norm[12]|attn\.q_norm|attn\.k_norm)|head\.norm)\.bias", "zeros", 0.0, None),   # [channel_norm]
    (rf"({HEAD_BLK}|head\.final)\.adaLN_modulation\.1\.(weight|bias)", "zeros", 0.0, None),  # constant_(.., 0)
    # head.final.norm_final is an affine-free LayerNorm (as [channel_final.norm_final]): no parameters.
]

STD_TOL = {1.0: 0.05, 0.02: 0.10, XAVIER: 0.10}  # relative tolerance of the measured std
STATS_MIN_NUMEL = 1024  # smaller tensors: exact/bound checks only (their std is checked in the wide model)


def _rule_of(name: str) -> tuple[str, str, float, float | str | None]:
    hits = [r for r in RULES if re.fullmatch(r[0], name)]
    assert len(hits) == 1, f"{name}: matched by {len(hits)} rules {[h[0] for h in hits]} (need exactly one)"
    return hits[0]


def _check(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """-> (failures, names whose statistics were skipped as too small)."""
    failures, skipped = [], []
    for name, p in model.named_parameters():
        _, rule, mean, std = _rule_of(name)
        w = p.detach().double()
        if not bool(torch.isfinite(w).all()):
            failures.append(f"{name}: not finite")
            continue
        if rule == "zeros" or rule == "ones":
            if not bool((w == mean).all()):
                failures.append(f"{name}: not all {mean}")
            continue
        if rule == "xavier_uniform":
            fan_out, fan_in = w.shape  # nn.Linear weight [out, in]
            std = math.sqrt(2.0 / (fan_in + fan_out))
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            if float(w.abs().max()) > bound * (1 + 1e-6):
                failures.append(f"{name}: |w| max {float(w.abs().max()):.4g} > xavier bound {bound:.4g}")
            tol = STD_TOL[XAVIER]
        else:
            tol = STD_TOL[std]
        n = w.numel()
        if n < STATS_MIN_NUMEL:
            skipped.append(name)
            continue
        m, s = float(w.mean()), float(w.std())
        if abs(s / std - 1) > tol:
            failures.append(f"{name}: std {s:.4g}, rule {rule} wants {std:.4g} within {tol:.0%}")
        if abs(m - mean) > 5 * std / math.sqrt(n):
            failures.append(f"{name}: mean {m:.3g}, rule {rule} wants {mean} (5 sigma {5 * std / math.sqrt(n):.2g})")
    return failures, skipped


def test_rules_cover_every_parameter_once() -> None:
    """Every parameter of every head variant has exactly one rule, and every rule is used."""
    used: set[str] = set()
    for kw in ({}, {"head_type": "parallel"}, {"channel_group": 2}):
        torch.manual_seed(0)
        for name, _ in create("tiny", **kw).named_parameters():
            used.add(_rule_of(name)[0])
    assert used == {r[0] for r in RULES}, f"rules matching nothing: {sorted({r[0] for r in RULES} - used)}"


@pytest.mark.parametrize("kw", [{}, {"head_type": "parallel"}, {"channel_group": 2}],
                         ids=["ar", "parallel", "group2"])
def test_tiny_model_follows_the_released_init(kw) -> None:
    torch.manual_seed(0)
    failures, _ = _check(create("tiny", **kw))
    assert not failures, "\n".join(failures)


def test_wide_model_statistics() -> None:
    """Width 1024 (the released L/H head width): every random tensor is big enough for its std check."""
    torch.manual_seed(1)
    model = create("tiny", width=1024, num_heads=8, encoder_depth=1, decoder_depth=1,
                   head_width=1024, head_depth=1, head_num_heads=8)
    failures, skipped = _check(model)
    assert not failures, "\n".join(failures)
    assert not skipped, f"too small for statistics: {skipped}"
    tok = torch.cat([e.weight.detach().flatten() for e in model.head.token_embed])
    assert abs(float(tok.std()) - 1.0) < 0.01  # N(0, 1), not the N(0, 0.02) of the other embeddings


def test_init_weights_rewrites_every_parameter() -> None:
    """`init_weights` (the to_empty() path) draws every parameter by the same rules."""
    torch.manual_seed(0)
    model = create("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    failures, _ = _check(model)
    assert not failures, "\n".join(failures)
