"""The GPU path: the defaults that pick the fast path on a GPU (sampling precision "auto", TF32 for training
on NCCL ranks) and tools/gpu_check.py, run here at --tiny on the CPU so that it cannot rot before someone
runs it on a borrowed GPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from tb_model.registry import create
from tb_train import dist
from tb_train.sample.sampler import Sampler, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def test_sampling_precision_auto_is_bf16_on_cuda_and_fp32_elsewhere() -> None:
    model = create("tiny", latent_size=4, latent_channels=4, num_classes=10).eval()
    assert SamplingConfig().precision == "auto"
    assert Sampler(model, None, SamplingConfig(), "cuda").precision == "bf16"
    assert Sampler(model, None, SamplingConfig(), torch.device("cuda", 1)).precision == "bf16"
    assert Sampler(model, None, SamplingConfig(), "cpu").precision == "fp32"
    assert Sampler(model, None, SamplingConfig(precision="fp32"), "cuda").precision == "fp32"
    assert Sampler(model, None, SamplingConfig(precision="bf16"), "cpu").precision == "bf16"
    seen: set[torch.dtype] = set()  # "auto" on a CPU really runs fp32
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    Sampler(model, None, SamplingConfig(num_iter=2, guidance=2.0)).latents([1, 2], [0, 1], seed=0)
    for h in hooks:
        h.remove()
    assert seen == {torch.float32}


@pytest.mark.parametrize("cuda", [True, False])
def test_init_distributed_turns_tf32_on_for_nccl_ranks_only(cuda: bool, monkeypatch) -> None:
    """A GPU rank (nccl) gets TF32 for fp32 matmuls and convolutions; a CPU rank (gloo) leaves them alone.
    CUDA and DeepSpeed are stood in for: only the switch is under test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setattr(os, "environ", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    backends: list[str] = []
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(
        init_distributed=lambda dist_backend, **kw: backends.append(dist_backend)))
    try:
        info = dist.init_distributed()
        assert backends == [info.backend] == ["nccl" if cuda else "gloo"]
        assert torch.backends.cuda.matmul.allow_tf32 is cuda and torch.backends.cudnn.allow_tf32 is cuda
    finally:  # process-wide flags (not monkeypatch-able: the cuBLAS module has no such attribute to save)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the markdown table under `heading` in the report."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_gpu_check_tiny_runs_every_part_and_reports_oom(tmp_path) -> None:
    """The whole tool at --tiny on CPU: a training row per (micro-batch, checkpointing) with numbers, an
    injected out-of-memory error reported as OOM (and the larger batch not tried), no host syncs, the
    attention backend, sampling with and without compile (same latents), Inception."""
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--fake-oom-above", "2", "--train-compile", "off,on"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert proc.stdout == text
    facts = dict(row[:2] for row in _table(text, "# GPU check"))
    assert facts["host syncs, sampling batch"] == "0" and facts["host syncs, training forward + backward"] == "0"
    assert facts["attention backend, sampling"] in ("flash", "efficient")
    assert facts["compute precision"] == "fp32" and facts["device"] == "cpu"

    train = _table(text, "## Training step")
    assert [(*r[:3], r[3].split(" (")[0]) for r in train] == [
        ("tiny", b, c, k) for c in ("none", "full") for k in ("off", "aot_eager") for b in ("2", "4", "8")]
    for row in train[3::6]:  # the measured compiled rows count torch's compilations
        assert re.fullmatch(r"aot_eager \(([1-9]\d*) compiles in warm-up, (\d+) timed\)", row[3]), row[3]
    for size, batch, ckpt, comp, first, seconds, img_s, mfu, peak in train:
        if batch == "2":
            assert float(seconds) > 0 and float(peak) > 0 and 0 < float(mfu.rstrip("%")) < 100
            assert float(img_s) == pytest.approx(2 / float(seconds), rel=0.01, abs=0.05)  # printed to 0.1
            assert float(first) > 0
        else:
            assert (first, seconds, img_s, mfu, peak) == ("-", "OOM" if batch == "4" else "OOM (at 4)", "-", "-", "-")
    # the compiled rows traced the blocks: their first step (tracing) is slower than the eager one's
    assert all(float(c[4]) > float(e[4]) for e, c in zip(train[0::6], train[3::6]))

    sampling = _table(text, "## Sampling")
    assert [r[5] for r in sampling] == ["off", "dynamo, eager backend"]
    assert all(float(r[7]) > 0 and r[4] == "fp32" for r in sampling)
    assert sampling[1][8] == "100.00%"  # the eager backend runs the same kernels: identical latents

    (inception,) = _table(text, "## Inception")
    assert inception[0] == "2" and float(inception[1]) > 0


def test_inception_without_torch_fidelity_is_a_row_not_a_crash(monkeypatch) -> None:
    """torch-fidelity missing (as on the first H200 the tool ran on): the Inception part says so in its
    row and the run goes on (the crash had lost the sampling section); the tiny run above measures it."""
    import argparse
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check

    args = argparse.Namespace(device=torch.device("cpu"), inception_batch=2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real(name, *a))
    assert gpu_check.measure_inception(args) == {"batch": "2", "img/s": "skipped: torch-fidelity not installed",
                                                 "TF32 after it": "-"}
