"""Per-rank memory: the analytic model's formulas (tb_train.engine.memory) on hand-computed cases, and the
/proc watcher (tb_core.measure.RankPeakMemory) on processes of known size."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tb_core.measure import RankPeakMemory
from tb_model.config import ModelConfig
from tb_model.registry import count_params
from tb_train.engine.memory import activation_bytes, estimate

CFG = ModelConfig(size="tiny", latent_size=8, latent_channels=4, num_classes=10)
N = count_params(CFG)["total"]


@pytest.mark.parametrize("precision, stage, world, bytes_per_param", [
    ("fp32", 0, 4, 4 + 4 + 8 + 4),            # whole weights, grads, Adam m+v, EMA on rank 0
    ("fp32", 1, 4, 4 + 4 + (4 + 8 + 4) / 4),  # + the ZeRO optimizer's fp32 copy; Adam, EMA sharded
    ("fp32", 2, 4, 4 + (4 + 4 + 8 + 4) / 4),  # grads sharded too
    ("fp32", 3, 4, (4 + 4 + 4 + 8 + 4) / 4),  # everything sharded
    ("bf16", 0, 4, 2 + 2 + 4 + (4 + 8 + 4) / 4),  # BF16_Optimizer: full bf16 grads + fp32 accumulation
    ("bf16", 3, 4, (2 + 4 + 2 + 4 + 8 + 4) / 4),  # + the fp32 copy of the gradient partition
    ("amp_bf16", 3, 2, (4 + 4 + 4 + 8 + 4) / 2),  # fp32 weights: the fp32 layout
])
def test_state_bytes_per_parameter(precision, stage, world, bytes_per_param):
    e = estimate(CFG, stage, world, precision, micro_batch=1)
    assert e.state == pytest.approx(bytes_per_param * N, rel=1e-12)


def test_buffers_and_activations():
    zero = {"reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 500, "stage3_max_live_parameters": 10}
    s2, s3 = (estimate(CFG, s, 2, "fp32", 1, zero=zero) for s in (2, 3))
    assert s2.zero_buffers == 4 * 1000
    block = 18 * 64 ** 2 + 19 * 64   # tiny: the head's block (adaLN) is the largest; at least two stay gathered
    assert s3.zero_buffers == 4 * 1000 + 4 * 500 + 2 * 4 * block
    # DeepSpeed's default max_live (1e9 elements) lets the whole model stay gathered
    whole = estimate(CFG, 3, 2, "fp32", 1, zero=dict(zero, stage3_max_live_parameters=1e9))
    assert whole.zero_buffers == 4 * 1000 + 4 * 500 + 4 * N
    none, full = (activation_bytes(CFG, 2, 4, c) for c in ("none", "full"))
    assert full < none
    # the stored part is linear in the micro-batch; the recomputed block too
    assert activation_bytes(CFG, 4, 4, "none") == pytest.approx(2 * none)
    assert activation_bytes(CFG, 2, 2, "none") < none


def test_rank_peak_memory_sees_each_rank_and_its_workers():
    """A rank (RANK in its environment) that touches 200 MiB, starts a multiprocessing (spawn) worker that
    touches 100 MiB, and runs a plain command that touches 300 MiB: the worker is counted for the rank, the
    command is not (tools start git and the like; before exec such a child shows the rank's own pages)."""
    worker = "b = bytearray(100 * 2**20); import time; time.sleep(1.0)"
    command = "b = bytearray(300 * 2**20); import time; time.sleep(1.0)"
    code = (f"import multiprocessing as mp, subprocess, sys, time\n"
            f"if __name__ == '__main__':\n"
            f"    b = bytearray(200 * 2**20)\n"
            f"    w = mp.get_context('spawn').Process(target=exec, args=({worker!r},)); w.start(); w.join()\n"
            f"    subprocess.run([sys.executable, '-c', {command!r}]); time.sleep(0.5)\n")
    env = dict(os.environ, RANK="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    with RankPeakMemory(proc.pid, interval=0.1) as mem:
        proc.wait()
    assert proc.returncode == 0
    assert set(mem.ranks) == {1}
    assert 200 * 2 ** 20 < mem.ranks[1] < 400 * 2 ** 20
    assert 100 * 2 ** 20 < mem.workers[1] < 290 * 2 ** 20


def test_optimizer_step_transient_and_peak():
    """The step's ~3 fp32 copies of one stage-3 sub-group (or the whole partition at stages 1-2) do not
    add to the forward/backward transients: the peak is the state plus the larger of the two."""
    zero = {"reduce_bucket_size": 10, "stage3_prefetch_bucket_size": 10, "stage3_max_live_parameters": 10,
            "sub_group_size": 1000}
    s3 = estimate(CFG, 3, 2, "fp32", 1, zero=zero)
    assert s3.optimizer_step == 3 * 4 * 1000
    whole = estimate(CFG, 3, 2, "fp32", 1, zero=dict(zero, sub_group_size=1e12))
    assert whole.optimizer_step == 3 * 4 * (N / 2)
    assert whole.total == whole.state + max(whole.zero_buffers + whole.activations, whole.optimizer_step)
    assert estimate(CFG, 2, 4, "fp32", 1).optimizer_step == 3 * 4 * (N / 4)
