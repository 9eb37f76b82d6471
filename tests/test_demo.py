"""The README's main job, end to end, on a short budget: tb-demo as a subprocess, then a rerun resumes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tb_model.tokenbridge import TokenBridge


def run_demo(out: Path, *overrides: str) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "tb_train.demo", "--out", str(out), "metrics.log_every=1",
           "metrics.image_every=3", "samples.num_images=4", "samples.num_iter=2", *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, "run.max_steps=3")
    assert (out / "latents" / "manifest.json").is_file()
    model = TokenBridge.from_pretrained(out / "model.safetensors")
    assert (model.config.latent_channels, model.config.latent_size, model.config.num_classes) == (4, 8, 10)
    grid = Image.open(out / "samples.png")
    assert grid.size[0] > 8 * 32 and grid.size[1] > 10 * 32  # 8 samples x 10 classes of 32 px
    assert list((out / "run" / "samples").glob("*.png")), "training wrote no sample grid PNG"
    ea = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert len(ea.Scalars("loss")) == 3
    assert ea.Tags()["images"]

    log = run_demo(out, "run.max_steps=5")  # same command, longer budget: reuses shards, resumes at step 3
    assert "8 of 8 shards already done" in log
    ea = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4, 5]
