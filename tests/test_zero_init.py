"""Model construction under ZeRO-3: no rank holds a whole copy, and the initial weights do not depend on
the ZeRO stage or the world size.

`build_engine` builds the model inside `deepspeed.zero.Init` at stage 3 (each submodule partitioned as soon
as it exists; the init rules gather one module at a time, `tb_model.partitioned`) and plainly at stages
0-2. One job per world size (1 and 2 ranks) builds the tiny model at stages 0 and 3 in fp32 and bf16 and
reports a sha256 of every parameter's full fp32 master; asserted: all equal, and equal to a plain build
(fp32) or to its bf16 rounding (bf16, see `build_engine`); at stage 3 the constructor already returns
partitioned parameters, each rank holding half of the elements at world 2.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from fixtures.engine import run_worker, tiny_model

STAGES, PRECISIONS = [0, 3], ["fp32", "bf16"]


@pytest.fixture(scope="module")
def builds(deepspeed_warm, tmp_path_factory) -> dict[int, dict]:
    d = tmp_path_factory.mktemp("zero_init")
    args = dict(stages=STAGES, precisions=PRECISIONS, seed=3)
    return {world: run_worker("initial_weights", args, world, d / f"w{world}") for world in (1, 2)}


def _plain_digests(precision: str) -> dict[str, str]:
    model = tiny_model(3)
    out = {}
    for n, p in model.named_parameters():
        t = p.detach().to(torch.bfloat16).float() if precision == "bf16" else p.detach()
        out[n] = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_initial_weights_equal_for_every_stage_and_world(builds, precision):
    expected = _plain_digests(precision)
    assert len(expected) > 100
    for world, runs in builds.items():
        for stage in STAGES:
            got = runs[f"{stage}/{precision}"]["sha"]
            differing = sorted(n for n in expected if got.get(n) != expected[n])
            assert set(got) == set(expected) and not differing, (world, stage, differing[:5])


def test_zero3_constructor_returns_partitioned_model(builds):
    total = sum(p.numel() for p in tiny_model(3).parameters())
    for world, runs in builds.items():
        for precision in PRECISIONS:
            plain, zero3 = runs[f"0/{precision}"], runs[f"3/{precision}"]
            assert plain["partitioned"] is False and plain["local"] == [total] * world
            assert zero3["partitioned"] is True
            # each rank's partition: ceil(numel / world) elements per parameter, so at most total/world + #params
            assert all(total / world <= n <= total / world + 200 for n in zero3["local"]), (world, zero3["local"])
