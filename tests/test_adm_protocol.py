"""ADM evaluator protocol (tb_train/eval/adm.py) against an independent numpy transcription of ADM's
arithmetic: float32 softmax and 5,000-row chunks for IS, float16 squared-distance blocks with a float32
fallback for precision/recall. The cases are chosen so that plausible wrong versions fail: equal splits
instead of chunks, a dropped or merged last chunk, float32 distances, `<` instead of `<=`, another
neighbour index, one fallback decision for all blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_core.errors import InputError
from tb_train.eval.adm import adm_inception_score, adm_precision_recall
from tb_train.eval.metrics import inception_score


# -- numpy references ----------------------------------------------------------------------------------
def adm_is_reference(logits: np.ndarray, split_size: int = 5000) -> list[float]:
    """ADM's per-chunk scores: float32 softmax, then its KL formula on consecutive chunks."""
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(float(np.exp(np.mean(np.sum(kl, axis=1)))))
    return scores


def is_float64_reference(logits: np.ndarray, bounds: list[int]) -> list[float]:
    """The same KL in float64 with 0 log 0 = 0, on the chunks [bounds[i], bounds[i + 1])."""
    x = logits.astype(np.float64)
    logp = x - x.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = logp[a:b]
        p = np.exp(part)
        top = part.max(axis=0)
        log_marginal = top + np.log(np.exp(part - top).mean(axis=0))
        kl = np.where(p > 0, p * (part - log_marginal), 0.0)
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return scores


def sq_distance_block(u: np.ndarray, v: np.ndarray, dtype: type, acc64: bool) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) with numpy in `dtype`. acc64=False: numpy's own reductions and
    matmul (float16 ones accumulate in float32 and round once); acc64=True: accumulated in float64, the
    correctly rounded value (numpy's float16 matmul is also too slow for wide features)."""
    a, b = u.astype(np.float32).astype(dtype), v.astype(np.float32).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is expected: the caller falls back
        if acc64:
            na = np.square(a).astype(np.float64).sum(axis=1).astype(dtype)
            nb = np.square(b).astype(np.float64).sum(axis=1).astype(dtype)
            dot = (a.astype(np.float64) @ b.astype(np.float64).T).astype(dtype)
        else:
            na, nb, dot = np.square(a).sum(axis=1), np.square(b).sum(axis=1), a @ b.T
        d = np.maximum(na[:, None] - 2 * dot + nb[None, :], 0)
    assert d.dtype == dtype
    return d


def sq_distances(u: np.ndarray, v: np.ndarray, batch: int, acc64: bool, float16: bool = True) -> np.ndarray:
    """All squared distances, block by block; a float16 block with a non-finite entry is redone in float32."""
    rows = []
    for i in range(0, len(u), batch):
        row = []
        for j in range(0, len(v), batch):
            d = sq_distance_block(u[i:i + batch], v[j:j + batch], np.float16, acc64) if float16 else None
            if d is None or not np.isfinite(d).all():
                d = sq_distance_block(u[i:i + batch], v[j:j + batch], np.float32, acc64)
            row.append(d.astype(np.float32))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows)


def pr_reference(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 10_000, acc64: bool = False,
                 float16: bool = True) -> tuple[float, float]:
    """ADM's ManifoldEstimator: radii = entry k of each sorted row (self included), covered if <= radius."""
    real_radii = np.partition(sq_distances(real, real, batch, acc64, float16), k, axis=1)[:, k]
    fake_radii = np.partition(sq_distances(fake, fake, batch, acc64, float16), k, axis=1)[:, k]
    d = sq_distances(real, fake, batch, acc64, float16)
    return float((d <= real_radii[:, None]).any(axis=0).mean()), float((d <= fake_radii[None, :]).any(axis=1).mean())


def ours(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 10_000) -> tuple[float, float]:
    return adm_precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k, batch)


def integer_features(n: int, spread: int, seed: int, offset: int = 8, dim: int = 64) -> np.ndarray:
    """offset + integers in [-spread, spread]: exact in float32 and float16 and every dot product exact
    in a float32 accumulation, so numpy's float16 arithmetic is fully determined (no summation-order
    ambiguity); |x|^2 ~ 4,000 puts float16's ulp at 4-8 on squared distances of ~250."""
    rng = np.random.default_rng(seed)
    return (offset + rng.integers(-spread, spread + 1, (n, dim))).astype(np.float32)


# -- Inception Score -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, chunks", [(2_000, 1), (10_000, 2), (12_000, 3), (50_000, 10)])
def test_inception_score_equals_adm_chunking(n: int, chunks: int) -> None:
    g = torch.Generator().manual_seed(n)
    # the logit scale drifts along the rows, so every chunk boundary changes the per-chunk scores
    logits = torch.randn(n, 1000, generator=g) * torch.linspace(1.0, 4.0, n)[:, None]
    ref = adm_is_reference(logits.numpy())
    assert len(ref) == chunks
    mean, std = adm_inception_score(logits)
    assert mean == pytest.approx(np.mean(ref), rel=1e-5)
    assert std == pytest.approx(np.std(ref), rel=1e-4, abs=1e-6)
    ten = np.mean(is_float64_reference(logits.numpy(), [n * i // 10 for i in range(11)]))  # our old IS
    if n == 50_000:
        assert mean == pytest.approx(ten, rel=1e-9)
    else:
        assert abs(ten / mean - 1) > 1e-3
    if n == 12_000:  # equal thirds, the last chunk merged into the second, or dropped
        for bounds in ([0, 4000, 8000, 12_000], [0, 5000, 12_000], [0, 5000, 10_000]):
            assert abs(np.mean(is_float64_reference(logits.numpy(), bounds)) / mean - 1) > 1e-3


def test_adm_chunks_and_ten_equal_splits_differ_at_2000_samples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2000, 1000) * 3
    adm, adm_std = adm_inception_score(logits)
    ten = is_float64_reference(logits.numpy(), [2000 * i // 10 for i in range(11)])  # our old `inception_score`
    print(f"N=2000 randn*3: ADM IS {adm:.4f} (one chunk), 10 equal splits {np.mean(ten):.4f} ± {np.std(ten):.4f}")
    assert adm_std == 0.0
    assert adm == pytest.approx(adm_is_reference(logits.numpy())[0], rel=1e-5)
    assert abs(np.mean(ten) / adm - 1) > 0.05  # 200-row splits underestimate the marginal's entropy
    assert adm_inception_score(logits, split_size=200)[0] == pytest.approx(np.mean(ten), rel=1e-9)
    # protocol equal_splits keeps the 10-split number; protocol adm prints ADM's
    assert inception_score(logits, splits=10)[0] == pytest.approx(np.mean(ten), rel=1e-9)


@pytest.mark.parametrize("scale", [50.0, 1e4])
def test_inception_score_of_peaked_logits_is_finite(scale: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2000, 1000) * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(adm_is_reference(logits.numpy())[0])  # ADM's float32 softmax underflows: NaN
    mean, std = adm_inception_score(logits)
    print(f"N=2000 randn*{scale:g}: ADM-protocol IS {mean:.4f}")
    assert np.isfinite(mean) and std == 0.0
    assert mean == pytest.approx(is_float64_reference(logits.numpy(), [0, 2000])[0], rel=1e-9)
    if scale == 1e4:  # nearly one-hot even in float64: IS -> exp(entropy of the argmax histogram)
        counts = np.bincount(logits.argmax(dim=1).numpy(), minlength=1000)
        freq = counts[counts > 0] / 2000
        assert mean == pytest.approx(np.exp(-(freq * np.log(freq)).sum()), rel=1e-3)


def test_inception_score_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="adm_inception_score needs logits"):
        adm_inception_score(torch.randn(1000))
    with pytest.raises(InputError, match="adm_inception_score needs logits"):
        adm_inception_score(torch.randn(0, 10))
    with pytest.raises(ValueError, match="split_size"):
        adm_inception_score(torch.randn(10, 10), split_size=0)


# -- precision / recall --------------------------------------------------------------------------------
def test_pr_counts_equal_float16_reference_where_float32_differs() -> None:
    real, fake = integer_features(600, 2, seed=1), integer_features(500, 2, seed=2)
    small = sq_distance_block(real[:300], fake[:300], np.float16, acc64=False)
    assert np.array_equal(small, sq_distance_block(real[:300], fake[:300], np.float16, acc64=True))
    ref16 = pr_reference(real, fake)
    ref32 = pr_reference(real, fake, float16=False)  # exact here: integers below 2^24 throughout
    print(f"integer features: float16 (ADM) P/R {ref16}, float32 P/R {ref32}")
    assert ref16 != ref32  # float16 rounding changes the counts, so a float32 version fails below
    assert ours(real, fake) == ref16
    assert ours(real, fake, batch=128) == ref16  # no overflow: blocking changes nothing


@pytest.mark.parametrize("n, dim", [(3000, 64), (800, 2048)])
def test_pr_random_features_equal_reference(n: int, dim: int) -> None:
    rng = np.random.default_rng(dim)
    real = np.abs(rng.standard_normal((n, dim), dtype=np.float32))  # nonnegative like pool3 features
    fake = np.abs(rng.standard_normal((n - 100, dim), dtype=np.float32))
    ref = pr_reference(real, fake, acc64=True)
    assert ours(real, fake) == ref
    assert ours(real, fake, batch=700) == ref
    assert 0 < ref[0] < 1 and 0 < ref[1] < 1


@pytest.mark.parametrize("copies", [3, 4])
def test_pr_duplicate_rows(copies: int) -> None:
    rng = np.random.default_rng(copies)
    base = (rng.integers(-8, 9, (100, 64)) / 4).astype(np.float32)  # dyadic: copies are exactly 0 apart
    real = np.repeat(base, copies, axis=0)
    shifted = base[50:].copy()
    shifted[:, 0] += 1.0
    fake = np.concatenate([base[:50], shifted])
    ref = pr_reference(real, fake, acc64=False)
    assert ours(real, fake) == ref == pr_reference(real, fake, acc64=True)
    if copies == 4:  # radius 0 (entry 3 of [0, 0, 0, 0, ...]): only exact copies are inside, with <=
        assert ref[0] == 0.5
    else:  # entry 3 is the nearest distinct point: radius > 0, the shifted copies can be inside
        assert ref[0] > 0.5


def test_pr_float32_fallback_is_decided_per_block() -> None:
    real, fake = integer_features(500, 2, seed=3), integer_features(400, 2, seed=4)
    real[450:] += 32.0  # |x|^2 ~ 100,000: these rows overflow float16
    per_block = pr_reference(real, fake, batch=200)  # only blocks with rows 400-499 of real in float32
    whole = pr_reference(real, fake, batch=10_000)  # real-real and real-fake in float32, fake-fake float16
    print(f"float16 overflow: P/R per 200-row block {per_block}, 10,000-row blocks {whole}")
    assert per_block != whole
    assert whole != pr_reference(real, fake, float16=False)
    assert ours(real, fake, batch=200) == per_block
    assert ours(real, fake) == whole


def test_pr_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="adm_precision_recall with k=3"):
        adm_precision_recall(torch.randn(10, 8), torch.randn(10, 9))
    with pytest.raises(InputError, match="adm_precision_recall with k=3"):
        adm_precision_recall(torch.randn(3, 8), torch.randn(10, 8))
    with pytest.raises(InputError, match="adm_precision_recall with k=3"):
        adm_precision_recall(torch.randn(10), torch.randn(10, 8))
    with pytest.raises(ValueError, match="batch"):
        adm_precision_recall(torch.randn(10, 8), torch.randn(10, 8), batch=0)
