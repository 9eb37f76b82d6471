"""Evaluation during training: the `eval` section of a tb-train job logs eval/fid at the expected steps,
survives a resume (no step evaluated twice), and the hook alone is deterministic and checkpointable."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tb_model.vae import VAEConfig, load_vae
from tb_train.demo.digits import load_digit_extractor
from tb_train.dist import DistInfo
from tb_train.train.periodic_eval import EvalConfig, PeriodicEval
from tb_train.eval.adm import adm_inception_score
from tb_train.eval.metrics import feature_stats, frechet_distance
from tb_train.sample.sampler import Sampler, SamplingConfig, to_uint8

from fixtures.engine import run_job, write_latent_folder, LATENT_C, LATENT_HW, NUM_CLASSES

JOB = """\
data: {{path: {data}, micro_batch: 4, num_workers: 0}}
model: {{size: tiny, latent_size: {hw}, latent_channels: {c}, num_classes: {classes}}}
optim: {{lr: 1.0e-3, warmup_epochs: 0, epochs: 4}}
engine: {{deepspeed: zero2, precision: fp32}}
checkpoint: {{every_steps: 2, keep_last: 2}}
metrics: {{log_every: 1, image_every: 0}}
samples: {{vae: {{path: {vae}}}}}
eval:
  every_steps: 2
  num_samples: 6
  splits: 2
  extractor: digits
  reference: {reference}
  sampling: {{num_iter: 2, guidance: 2.0, batch_size: 3}}
run: {{dir: {run}}}
"""


def reference_images(path: Path, n: int = 8, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return path


def eval_scalars(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("eval/fid")}


@pytest.mark.slow
def test_tb_train_eval_section_logs_fid_at_its_steps_and_resumes(deepspeed_warm, tiny_vae_dir, tmp_path) -> None:
    data = write_latent_folder(tmp_path / "data", num_samples=32, per_shard=16)
    job = tmp_path / "job.yaml"
    run = tmp_path / "run"
    job.write_text(JOB.format(data=data, hw=LATENT_HW, c=LATENT_C, classes=NUM_CLASSES, vae=tiny_vae_dir,
                              reference=reference_images(tmp_path / "ref.npz"), run=run))
    argv = ["-m", "tb_train.train", "--config", str(job)]
    first = run_job([*argv, "run.max_steps=4"], 1, tmp_path / "log1", timeout=400)
    log1 = first.log_text(tail=100_000)
    assert log1.count("eval at step") == 2, log1
    fid = eval_scalars(run)
    assert sorted(fid) == [2, 4] and all(v > 0 for v in fid.values())
    second = run_job([*argv, "run.max_steps=6"], 1, tmp_path / "log2", timeout=400)
    log2 = second.log_text(tail=100_000)
    assert "resumed from" in log2 and log2.count("eval at step") == 1 and "eval at step 6" in log2, log2
    fid2 = eval_scalars(run)
    assert sorted(fid2) == [2, 4, 6] and fid2[2] == fid[2] and fid2[4] == fid[4]
    assert list((tmp_path).glob("ref.npz.tbeval-*.npz"))  # reference statistics cached once


class FakeTrainer:
    """What the hook protocol promises: step, dist, ema_model(), metrics.writer."""

    def __init__(self, model, writer) -> None:
        self.step, self.model = 0, model
        self.dist = DistInfo(0, 1, 0, 1, "gloo", torch.device("cpu"))
        self.metrics = SimpleNamespace(writer=writer)
        self.ema_calls = 0

    def ema_model(self):
        self.ema_calls += 1
        return self.model


def test_hook_is_deterministic_and_skips_evaluated_steps_after_load(tiny_vae_dir, tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from tb_model.registry import create

    torch.manual_seed(0)
    model = create("tiny", latent_size=4, latent_channels=4, num_classes=10).eval()
    cfg = EvalConfig(every_steps=2, num_samples=6, splits=2, extractor="digits",
                     reference=str(reference_images(tmp_path / "ref.npz")),
                     sampling=SamplingConfig(num_iter=2, guidance=2.0, batch_size=4))
    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    trainer = FakeTrainer(model, writer)
    hook = PeriodicEval(cfg, VAEConfig(path=str(tiny_vae_dir)))
    for step in range(1, 5):
        trainer.step = step
        hook.on_step_end(trainer, None)
    writer.close()
    assert sorted(hook.history) == [2, 4] and trainer.ema_calls == 2
    assert hook.history[2]["fid"] == hook.history[4]["fid"] > 0  # same weights, same seeds: same samples
    assert 0 < hook.history[2]["time_share"] <= 1 and hook.history[2]["is"] >= 1
    assert sorted(eval_scalars(tmp_path / "run")) == [2, 4]
    # class-consistency: the digit classifier's argmax on the same 6 samples vs the asked class i % 10
    sampler = Sampler(model, load_vae(VAEConfig(path=str(tiny_vae_dir))), cfg.sampling)
    images = to_uint8(sampler.images([i % 10 for i in range(6)], range(6), cfg.seed)).permute(0, 3, 1, 2)
    extractor = load_digit_extractor()
    feats = extractor(images)
    right = (feats["logits"].argmax(1) == torch.arange(6) % 10).float().mean()
    assert hook.history[2]["class_consistency"] == pytest.approx(float(right), abs=1e-6)
    # FID and IS equal the metric functions on the same 6 samples and the reference's 8 images
    ref_feats = extractor(torch.from_numpy(np.load(tmp_path / "ref.npz")["arr_0"]).permute(0, 3, 1, 2))
    fid = frechet_distance(*feature_stats(feats["pool"]), *feature_stats(ref_feats["pool"]))
    assert hook.history[2]["fid"] == pytest.approx(fid, rel=1e-5)
    assert hook.history[2]["is"] == pytest.approx(adm_inception_score(feats["logits"])[0], rel=1e-6)

    resumed = PeriodicEval(cfg, VAEConfig(path=str(tiny_vae_dir)))
    resumed.load_state_dict(hook.state_dict())
    trainer.step = 4
    resumed.on_step_end(trainer, None)
    assert trainer.ema_calls == 2 and resumed.history == hook.history


def test_eval_config_checks(tmp_path) -> None:
    from tb_core.errors import ConfigError
    from tb_train.train.periodic_eval import check_eval_config

    check_eval_config(EvalConfig(), "job.yaml", None)  # off: nothing required
    with pytest.raises(ConfigError, match="eval.reference is required"):
        check_eval_config(EvalConfig(every_steps=5), "job.yaml", None)
    ref = reference_images(tmp_path / "r.npz")
    with pytest.raises(ConfigError, match="eval.extractor_weights"):
        check_eval_config(EvalConfig(every_steps=5, reference=str(ref)), "job.yaml", None)
    with pytest.raises(ConfigError, match="needs a decoder"):
        check_eval_config(EvalConfig(every_steps=5, reference=str(ref), extractor="digits"), "job.yaml", None)
    with pytest.raises(ValueError, match="num_samples"):
        EvalConfig(every_steps=5, num_samples=4)
