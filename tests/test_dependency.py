"""tb_train/demo/dependency.py: channel mutual information and the AR-over-parallel CE gain, on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from tb_model.quantizer import QuantizerConfig
from tb_train.demo import dependency as dep


def test_independent_channels_have_zero_mi_and_a_copy_has_its_entropy():
    n = 16 * 50
    a = torch.arange(n) % 4            # uniform over 4 values: H = 2 bits
    b = torch.arange(n) // 4 % 4       # every (a, b) pair equally often: exactly independent
    assert dep.entropy_bits(torch.bincount(a)) == pytest.approx(2.0, abs=1e-12)
    assert dep.mutual_information_bits(a, b, 4) == pytest.approx(0.0, abs=1e-12)
    assert dep.mutual_information_bits(a, a, 4) == pytest.approx(2.0, abs=1e-12)
    # a copy of a skewed channel: p = (1/2, 1/4, 1/4) -> H = 1.5 bits, and I(a; copy) = 1.5
    skew = torch.tensor([0, 0, 1, 2]).repeat(25)
    assert dep.mutual_information_bits(skew, skew.clone(), 3) == pytest.approx(1.5, abs=1e-12)
    # a many-to-one function keeps only its own entropy: I(a; a // 2) = H(a // 2) = 1 bit
    assert dep.mutual_information_bits(a, a // 2, 4) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="same length"):
        dep.mutual_information_bits(a, a[:-1], 4)


def test_channel_dependency_summary_by_hand():
    n = 16 * 200
    c0 = torch.arange(n) % 4                          # H = 2
    c2 = torch.arange(n) // 4 % 2                     # independent of c0, H = 1
    tokens = torch.stack([c0, c0.clone(), c2], dim=1)  # c1 copies c0
    d = dep.channel_dependency(tokens, levels=4)
    assert d.entropy == pytest.approx([2.0, 2.0, 1.0], abs=1e-12)
    # pairs (0,1) = 2, (0,2) = 0, (1,2) = 0
    assert d.mean_pair_mi == pytest.approx(2 / 3, abs=1e-12) and d.max_pair_mi == pytest.approx(2.0, abs=1e-12)
    # identity order: c1 learns 2 bits from c0, c2 learns nothing -> 2 of 5 bits
    assert d.earlier_bound == pytest.approx(2.0, abs=1e-12) and d.explained_share == pytest.approx(0.4, abs=1e-12)
    # order [0, 2, 1]: c2 after c0 (0 bits), c1 after c0 and c2 (2 bits) -> the same 2 bits;
    # order [2, 0, 1] too; but with the copy first the bound never counts the copy's bits twice
    assert dep.channel_dependency(tokens, 4, order=[2, 0, 1]).earlier_bound == pytest.approx(2.0, abs=1e-12)
    # permuting the copy's rows breaks the dependency: only the plug-in bias is left, far below 2 bits
    assert 0 <= d.shuffled_mi < 0.01
    with pytest.raises(ValueError, match="not a permutation"):
        dep.channel_dependency(tokens, 4, order=[0, 0, 1])


def test_latent_tokens_are_one_row_per_position_in_raster_order():
    latents = torch.empty(1, 2, 2, 2)
    latents[0, 0] = -4.0                                           # channel 0: bin 0 everywhere
    latents[0, 1] = torch.tensor([[-4.0, -1.0], [1.0, 4.0]])       # channel 1: bins 0, 1, 2, 3 in raster order
    tokens = dep.latent_tokens(latents, QuantizerConfig(levels=4, qmin=-5.0, qmax=5.0, scheme="uniform"))
    assert tokens.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]


def test_final_ce_and_ce_gain():
    scalars = {"loss": [(1, 9.0)],
               "ce/ch00": [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)],
               "ce/ch01": [(1, 6.0), (2, 6.0), (3, 5.0), (4, 4.0)]}
    assert dep.final_ce(scalars) == [2.0, 4.0]                  # last quarter of 4 points: the last one
    assert dep.final_ce(scalars, tail=0.5) == [2.5, 4.5]
    with pytest.raises(ValueError, match="no ce/chNN"):
        dep.final_ce({"loss": [(1, 1.0)]})
    # two seeds: parallel - AR per channel = (0, 0.5) and (0.2, 0.3) -> mean (0.1, 0.4), total 0.5
    g = dep.ce_gain(ar=[[1.0, 2.0], [1.0, 2.0]], parallel=[[1.0, 2.5], [1.2, 2.3]])
    assert g["per_channel"] == pytest.approx([0.1, 0.4]) and g["total"] == pytest.approx(0.5)
    assert g["per_seed_total"] == pytest.approx([0.5, 0.5])
    assert g["relative"] == pytest.approx(0.5 / 3.5)
    with pytest.raises(ValueError, match="same number"):
        dep.ce_gain(ar=[[1.0]], parallel=[[1.0], [2.0]])


def test_dependency_table_formats_each_summary():
    tokens = torch.stack([torch.arange(64) % 4, torch.arange(64) % 4], dim=1)
    header, body = dep.dependency_table([("copy", dep.channel_dependency(tokens, 4))])
    assert len(header) == len(body[0]) == 9
    assert body[0][:3] == ["copy", "2", "64"] and body[0][-1] == "50.0%" and math.isclose(float(body[0][4]), 2.0)
