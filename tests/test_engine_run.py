"""The training job end to end: run-folder artifacts, bad input (one line, exit 2, nothing written),
non-finite steps. Every test here starts rank processes or uses the 2-rank reference run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fixtures.engine import TrainSetup
from tb_train.engine.checkpoint import read_latest
from tb_train.engine.ema import consolidate
from tb_train.train.job import EXIT_BAD_INPUT, EXIT_NONFINITE, main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_run_folder_has_config_tensorboard_and_sample_grid(train_setup):
    ref = train_setup.reference
    config = yaml.safe_load((ref / "config.yaml").read_text())
    assert config["model"]["width"] == 64 and config["engine"]["deepspeed"] == "zero3"   # resolved preset
    acc = EventAccumulator(str(ref / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss", "lr", "grad_norm", "ce/ch00", "perf/samples_per_s", "perf/mfu", "mem/peak_gib",
                "perf/data_wait_frac", "nonfinite_steps"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 11))
    by_epoch = EventAccumulator(str(ref / "tensorboard" / "by_epoch1000x"), size_guidance={"scalars": 0})
    by_epoch.Reload()
    assert [e.step for e in by_epoch.Scalars("by_epoch1000x/loss")] == list(range(100, 1001, 100))  # 1 epoch
    assert [e.step for e in acc.Images("samples/ema")] == [5, 10]
    assert sorted(p.name for p in (ref / "samples").glob("*.png")) == ["step_0000005.png", "step_0000010.png"]


def test_ema_model_is_the_checkpointed_ema_on_every_rank(train_setup):
    """trainer.ema_model() (collective) gives both ranks the same eval-mode model whose parameters are the
    EMA saved in the step-10 checkpoint (ZeRO-3 pieces of both ranks, consolidated offline)."""
    rows = [json.loads(Path(f"{train_setup.record('reference')}.ema{r}").read_text()) for r in range(2)]
    assert all(r["step"] == 10 and r["training"] is False and r["device"] == "cpu" for r in rows)
    ckpt = train_setup.reference / "checkpoints" / "step_00000010"
    ema = consolidate(torch.load(f, weights_only=False)["ema"] for f in sorted(ckpt.glob("train_state_rank*.pt")))
    expected = sum(float(t.double().sum()) for t in ema.values())
    assert rows[0]["sum"] == rows[1]["sum"] == pytest.approx(expected, rel=1e-12, abs=0)


def test_unknown_config_key_fails_before_start(train_setup, capsys):
    assert main(train_setup.argv("bad_key", "engine.zero_stage=3")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'engine.zero_stage'" in err
    assert not (train_setup.root / "bad_key").exists()


def test_bad_deepspeed_override_fails_before_any_file_is_written(train_setup):
    setup = train_setup
    job = setup.start("bad_ds", 1, "engine.ds_overrides.zero_optimization.stage=7")
    assert job.wait(300) == [EXIT_BAD_INPUT], job.log_text()
    errors = [line for line in job.logs[0].read_text().splitlines() if line.startswith("tb-train: error:")]
    assert len(errors) == 1 and "DeepSpeedZeroConfig.stage = 7" in errors[0], job.log_text()
    assert "Traceback" not in job.logs[0].read_text()
    assert not (setup.root / "bad_ds").exists()


def test_truncated_shard_without_verify_is_one_line(train_setup):
    """data.verify=false: the damage is found when a DataLoader worker reads the shard, mid-run; the
    job still ends with one line naming the shard and status 2."""
    setup = train_setup
    data = setup.root / "data_truncated"
    shutil.copytree(setup.data, data)
    shard = data / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    job = setup.start("truncated", 1, f"data.path={data}", "data.verify=false", "data.num_workers=1",
                      "engine.grad_accum=2")
    assert job.wait(300) == [EXIT_BAD_INPUT], job.log_text()
    log = job.logs[0].read_text()
    errors = [line for line in log.splitlines() if line.startswith("tb-train: error:")]
    assert len(errors) == 1 and "shard-000002.tar" in errors[0], job.log_text()
    assert "Traceback" not in log


@pytest.mark.parametrize("case", ["missing_folder", "bad_sha"])
def test_bad_data_fails_before_any_step(train_setup, case):
    setup = train_setup
    data = setup.root / f"data_{case}"
    if case == "bad_sha":
        shutil.copytree(setup.data, data)
        shard = data / "shard-000002.tar"
        raw = bytearray(shard.read_bytes())
        raw[2000] ^= 0xFF
        shard.write_bytes(bytes(raw))
    job = setup.start(case, 1, f"data.path={data}")
    assert job.wait(300) == [EXIT_BAD_INPUT], job.log_text()
    errors = [line for line in job.logs[0].read_text().splitlines() if line.startswith("tb-train: error:")]
    expected = "latent shard folder not found" if case == "missing_folder" else "shard-000002.tar: sha256 mismatch"
    assert len(errors) == 1 and expected in errors[0], job.log_text()
    assert setup.steps(case) == {} and not (setup.root / case / "checkpoints").exists()


def test_nonfinite_steps_skipped_then_run_stops(train_setup):
    """NaN in one rank's batch at step 3: the update is skipped on both ranks (fp32 master unchanged) and
    training continues; NaN at steps 5 and 6 with patience 1: the run stops with status 3 and `latest`
    stays on the last checkpoint (step 4)."""
    setup = train_setup
    job = setup.start("nan", 2, "engine.nonfinite_patience=1", "checkpoint.every_steps=2",
                      nan={"2": 1, "4": 0, "5": 1})
    assert job.wait(300) == [EXIT_NONFINITE] * 2, job.log_text()
    for rank in (0, 1):
        steps = setup.steps("nan", rank)
        assert [s for s in steps if steps[s]["skipped"]] == [3, 5, 6]
        assert steps[3]["fp32_sum"] == steps[2]["fp32_sum"] != steps[4]["fp32_sum"]
        assert steps[6]["fp32_sum"] == steps[4]["fp32_sum"]
    log = job.logs[0].read_text()
    assert "2 non-finite steps in a row" in log and "last good checkpoint is step 4" in log
    assert read_latest(setup.root / "nan" / "checkpoints") == "step_00000004"


def test_data_model_mismatch_and_calibration_sample(train_setup):
    from tb_core.errors import ConfigError
    from tb_model.config import ModelConfig
    from tb_train.data.loader import DataConfig, LatentLoader
    from tb_train.train.job import calibration_latents, check_data_matches_model

    loader = LatentLoader(DataConfig(path=str(train_setup.data), num_workers=0), 0, 1, 1)
    check_data_matches_model(loader, ModelConfig(latent_size=4, latent_channels=4, num_classes=10), "job.yaml")
    with pytest.raises(ConfigError, match="holds 4x4x4 latents but the model expects model.latent_channels=16"):
        check_data_matches_model(loader, ModelConfig(latent_size=4, num_classes=10), "job.yaml")
    latents = calibration_latents(loader, max_samples=32)
    first = loader.shards.read(0)[0][0, :4].astype("float32")
    assert latents.shape == (32, 4, 4, 4)
    assert torch.allclose(latents[0], torch.from_numpy(first) * loader.scale)
