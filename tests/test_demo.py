"""The README's main job, end to end on the smoke budget: tb-demo as a subprocess, its report, then a rerun resumes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tb_model.vae import VAEConfig, load_vae
from tb_train.demo.data import demo_vae_path
from tb_train.demo.job import train_args, train_subprocess
from tb_train.sample.job import load_model


def losses(run_dir: Path) -> list[tuple[int, float]]:
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in ea.Scalars("loss")]


def run_demo(out: Path, *args: str) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "tb_train.demo", "--out", str(out), "--smoke", "metrics.log_every=1", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_smoke_demo_report_then_rerun_resumes(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, "run.max_steps=3")
    model, _ = load_model(out / "model.safetensors")
    assert (model.config.latent_channels, model.config.latent_size, model.config.num_classes) == (4, 8, 10)
    grid = Image.open(out / "samples.png")
    assert grid.size[0] > 8 * 32 and grid.size[1] > 10 * 32  # 8 samples x 10 classes of 32 px
    for png in ("samples.png", "curves.png", "quantization.png"):
        assert Image.open(out / png).size[0] > 100, png
    report = (out / "report.md").read_text()
    for needed in ("![samples](samples.png)", "![curves](curves.png)", "![quantization](quantization.png)",
                   "not ImageNet", "| test |", "Time per stage", "Machine"):
        assert needed in report, needed

    m = json.loads((out / "metrics.json").read_text())
    assert m["classifier_accuracy"]["heldout"] >= 0.95 and m["classifier_accuracy"]["test"] >= 0.95
    for split in ("test", "heldout"):
        for who in ("model", "step0"):
            s = m[who][split]
            assert 0.0 <= s["class_consistency"] <= 1.0 and s["n"] == 100
            assert math.isfinite(s["digit_fid"]) and s["digit_fid"] >= 0
        # the floor (real train vs real split) is far below anything a 3-step model draws
        assert 0 <= m["floor_fid"][split] < m["step0"][split]["digit_fid"] / 5
    assert all(math.isfinite(v) and v >= 0 for v in m["times"].values())

    log = run_demo(out, "run.max_steps=5")  # same command, longer budget: reuses shards, resumes at step 3
    assert "5 of 5 shards already done" in log
    assert "resumed from" in log
    ea = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in ea.Scalars("eval/fid")] == [3]  # evaluation during training, saved across the resume


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_two_ranks_trains_what_one_process_trains(tmp_path, monkeypatch):
    """`--ranks 2` = the same global batch of 64 as 2 micro-batches of 32 on 2 ZeRO-2 ranks: per-step losses
    equal those of ONE process running the same 2 micro-batches by accumulation (the same seeds per
    micro-batch) up to float summation order."""
    out = tmp_path / "demo"
    run_demo(out, "--ranks", "2", "run.max_steps=4")
    state = json.loads((out / "run" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["world"] == 2 and state["zero_stage"] == 2
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    train_subprocess(train_args(out, ["run.max_steps=4", "metrics.log_every=1", "metrics.image_every=0",
                                     "data.micro_batch=32", "engine.grad_accum=2"],
                                run_dir=tmp_path / "one", periodic_eval=False))
    two, one = losses(out / "run"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3, 4]
    assert all(abs(a - b) <= 1e-5 * abs(b) for (_, a), (_, b) in zip(two, one)), (two, one)


@pytest.mark.slow
def test_sixteen_channel_chain_with_rows_b_c(tmp_path):
    """`--latent-channels 16` runs precompute -> train -> sample -> eval -> report on demo_vae16 with 16-channel
    tokens and a 16-step AR head; `--ablation-rows b c` trains only the default, parallel and frequency arms, and
    the report measures the channel dependency (token MI and the AR-over-parallel CE gain per channel)."""
    out = tmp_path / "demo16"
    run_demo(out, "run.max_steps=2", "--latent-channels", "16", "--ablations", "--ablation-rows", "b", "c",
             "--ablation-seeds", "0")
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["vae"]["latent_channels"] == 16
    assert manifest["vae"]["identity"] == load_vae(VAEConfig(path=str(demo_vae_path(16)))).identity  # demo_vae16
    model, _ = load_model(out / "model.safetensors")
    assert (model.config.latent_channels, model.config.channel_order) == (16, "identity")
    assert type(model.head).__name__ == "ARHead" and model.head.steps == 16  # one step per channel
    ea = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert sorted(t for t in ea.Tags()["scalars"] if t.startswith("ce/")) == [f"ce/ch{i:02d}" for i in range(16)]

    gen = json.loads((out / "ablations.json").read_text())["generative"]
    assert [r["runs"][0].split("/")[-2] for r in gen] == ["default_seed0", "parallel_seed0", "frequency_seed0"]
    stats = json.loads((out / "latents" / "stats.json").read_text())
    assert gen[2]["name"] == "frequency channel order [" + ",".join(map(str, stats["channel_order"])) + "]"
    parallel, _ = load_model(out / "ablations" / "parallel_seed0" / "model.safetensors")
    assert type(parallel.head).__name__ == "ParallelHead" and parallel.config.latent_channels == 16
    dep = json.loads((out / "metrics.json").read_text())["channel_dependency"]
    tokens = dep["tokens"]["identity order"]
    assert tokens["channels"] == 16 and tokens["tokens"] == 1205 * 64 and len(tokens["entropy"]) == 16
    assert 0 < tokens["shuffled_mi"] < tokens["mean_pair_mi"]       # the demo VAE's channels are not independent
    assert len(dep["ce_gain"]["per_channel"]) == 16 and len(dep["ce_gain"]["ar"][0]) == 16
    report = (out / "report.md").read_text()
    assert "## How dependent the channels are" in report and "16 latent channels" in report
    assert "(a)" not in report.split("## Ablations: what reproduces")[1]   # rows a, d, e were not run
