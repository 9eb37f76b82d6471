"""Sampling: per-sample randomness, tb-sample's world-size/batch-size/crash independence, its output files
(PNGs, samples.json, ADM npz, grid) and its refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tb_core.errors import ConfigError
from tb_model.vae import VAEConfig
from tb_train.sample import job as sample
from tb_train.sample.job import SampleJobConfig, run_sample
from tb_train.sample.sampler import Sampler, SamplingConfig

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def tiny_model(seed: int = 0):
    from tb_model.registry import create

    torch.manual_seed(seed)
    return create("tiny", latent_size=4, latent_channels=4, num_classes=NUM_CLASSES).eval()


def export_file(model, path: Path, step: int = 7) -> Path:
    """A model file as tb-export writes it (weights + config, step and weight kind in the metadata)."""
    return model.save_pretrained(path, metadata={"step": str(step), "weights": "ema"})


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return export_file(tiny_model(), tmp_path_factory.mktemp("sample_model") / "tiny.safetensors")


def job(model_file: Path, vae: Path, out: Path, batch: int, **kw) -> SampleJobConfig:
    settings = SamplingConfig(num_iter=4, guidance=2.0, temperature=1.0, batch_size=batch)
    return SampleJobConfig(model=str(model_file), out=str(out), vae=VAEConfig(path=str(vae)), num_samples=20,
                           seed=3, sampling=settings, grid_classes=3, grid_per_class=2, **kw)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: sample.read_png(f) for f in sorted(folder.glob("*_c*.png"))}


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_per_sample_generators_make_samples_independent_of_their_batch(order: str) -> None:
    model = tiny_model()
    labels = torch.arange(5) % NUM_CLASSES

    def gens(idx):
        return [torch.Generator().manual_seed(100 + i) for i in idx]

    kw = dict(num_iter=4, cfg=2.0, order=order)
    whole = model.generate(labels, generator=gens(range(5)), **kw)
    parts = torch.cat([model.generate(labels[:2], generator=gens(range(2)), **kw),
                       model.generate(labels[2:], generator=gens(range(2, 5)), **kw)])
    one = model.generate(labels[:1], generator=torch.Generator().manual_seed(100), **kw)
    official = model.generate(labels, generator=gens(range(5)), official=True, **kw)
    assert torch.equal(whole, parts) and torch.equal(whole[:1], one) and torch.equal(whole, official)
    other_seeds = model.generate(labels, generator=[torch.Generator().manual_seed(7 + i) for i in range(5)], **kw)
    assert not torch.equal(whole, other_seeds)
    with pytest.raises(ValueError, match="3 generators for a batch of 5"):
        model.generate(labels, generator=gens(range(3)), **kw)


def _two_rank_sample(cfg: SampleJobConfig, log: Path) -> str:
    from tb_train.dist import free_port

    port = free_port()
    argv = [sys.executable, "-m", "tb_train.sample", f"model={cfg.model}", f"out={cfg.out}", f"vae.path={cfg.vae.path}",
            f"num_samples={cfg.num_samples}", f"seed={cfg.seed}", f"sampling.num_iter={cfg.sampling.num_iter}",
            f"sampling.guidance={cfg.sampling.guidance}", f"sampling.batch_size={cfg.sampling.batch_size}",
            f"grid_classes={cfg.grid_classes}", f"grid_per_class={cfg.grid_per_class}"]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return outs[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_tb_sample_same_images_for_any_world_batch_and_after_a_crash(model_file, tiny_vae_dir, tmp_path,
                                                                      monkeypatch) -> None:
    # A: one process, batch 3, uninterrupted.
    a = run_sample(job(model_file, tiny_vae_dir, tmp_path / "a", batch=3), 0, 1, torch.device("cpu"))
    assert a["complete"] and a["generated_this_run"] == 20
    # B: batch 5, "killed" after 7 images were written ...
    real_save, written = sample.save_png, []

    def crash_after_7(image, path):
        if len(written) == 7:
            raise KeyboardInterrupt("simulated kill")
        written.append(path)
        real_save(image, path)

    monkeypatch.setattr(sample, "save_png", crash_after_7)
    b_cfg = job(model_file, tiny_vae_dir, tmp_path / "b", batch=5)
    with pytest.raises(KeyboardInterrupt):
        run_sample(b_cfg, 0, 1, torch.device("cpu"))
    monkeypatch.setattr(sample, "save_png", real_save)
    assert len(pngs(tmp_path / "b")) == 7 and not (tmp_path / "b" / "samples.npz").exists()
    # ... then rerun on 2 ranks: only the 13 missing indices are generated.
    out = _two_rank_sample(b_cfg, tmp_path / "log")
    assert "(13 generated now" in out, out

    imgs_a, imgs_b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert list(imgs_a) == list(imgs_b) and len(imgs_a) == 20
    assert list(imgs_a)[:3] == ["000000_c0000.png", "000001_c0000.png", "000002_c0001.png"]
    for name in imgs_a:
        assert np.array_equal(imgs_a[name], imgs_b[name]), name
    assert len({v.tobytes() for v in imgs_a.values()}) == 20  # distinct samples, not one image repeated

    za, zb = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert sorted(za.files) == ["arr_0", "arr_1"]
    assert za["arr_0"].dtype == np.uint8 and za["arr_0"].shape == (20, 8, 8, 3)
    assert za["arr_1"].tolist() == [i // 2 for i in range(20)]
    assert np.array_equal(za["arr_0"], zb["arr_0"]) and np.array_equal(za["arr_1"], zb["arr_1"])
    assert np.array_equal(za["arr_0"][5], imgs_a["000005_c0002.png"])

    meta = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2 and meta["model_step"] == 7
    assert "round_half_even" in meta["uint8_rule"] and meta["labels_rule"].startswith("balanced")
    for key in ("num_iter", "guidance", "guidance_schedule", "temperature", "order", "precision", "seed", "vae"):
        assert key in meta
    from PIL import Image
    with Image.open(tmp_path / "a" / "grid.png") as grid:  # 3 classes x 2 samples of 8x8, padding 2
        assert grid.size == (2 + 2 * 10, 2 + 3 * 10)


def test_tb_sample_refuses_a_folder_made_with_other_settings(model_file, tiny_vae_dir, tmp_path) -> None:
    cfg = job(model_file, tiny_vae_dir, tmp_path / "s", batch=10)
    cfg.num_samples = 10
    run_sample(cfg, 0, 1, torch.device("cpu"))
    cfg.sampling.batch_size = 4  # batch size does not change images: accepted, nothing to do
    assert run_sample(cfg, 0, 1, torch.device("cpu"))["generated_this_run"] == 0
    cfg.sampling.temperature = 0.5
    with pytest.raises(ConfigError, match="temperature=1.0.*now temperature=0.5"):
        run_sample(cfg, 0, 1, torch.device("cpu"))


def test_tb_sample_bad_options_are_one_line(model_file, tiny_vae_dir, tmp_path, capsys) -> None:
    cfg = job(model_file, tiny_vae_dir, tmp_path / "x", batch=4)
    cfg.num_samples = 15
    with pytest.raises(ConfigError, match="not a positive multiple of the model's 10 classes"):
        run_sample(cfg, 0, 1, torch.device("cpu"))
    cfg.num_samples, cfg.labels = 3, [1, 2, 11]
    with pytest.raises(ConfigError, match="labels: 11 is outside"):
        run_sample(cfg, 0, 1, torch.device("cpu"))
    code = sample.main([f"model={tmp_path / 'missing.safetensors'}", f"out={tmp_path / 'y'}",
                        f"vae.path={tiny_vae_dir}", "sampling.order=spiral"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tb-sample: error: ") and "sampling.order" in err[0]


def test_given_labels_and_bf16_settings(model_file, tiny_vae_dir, tmp_path) -> None:
    cfg = job(model_file, tiny_vae_dir, tmp_path / "l", batch=4, labels=[3, 3, 10, 0])
    cfg.num_samples = 4
    cfg.sampling.precision = "bf16"
    rec = run_sample(cfg, 0, 1, torch.device("cpu"))
    assert rec["labels_rule"] == "given list (labels)" and rec["precision"] == "bf16"
    names = sorted(p.name for p in (tmp_path / "l").glob("*_c*.png"))
    assert names == ["000000_c0003.png", "000001_c0003.png", "000002_c0010.png", "000003_c0000.png"]
    assert np.load(tmp_path / "l" / "samples.npz")["arr_1"].tolist() == [3, 3, 10, 0]


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_sampler_runs_the_model_in_the_precision_it_is_given(precision, dtype) -> None:
    """Every Linear of the MAR and the head computes in `precision` (a Sampler ignoring it would run fp32);
    the latents handed to the VAE are float32 either way."""
    model = tiny_model()
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    settings = SamplingConfig(num_iter=2, guidance=2.0, batch_size=2, precision=precision)
    latents = Sampler(model, None, settings).latents([1, 2], [0, 1], seed=0)
    for h in hooks:
        h.remove()
    assert seen == {dtype} and latents.dtype == torch.float32 and latents.shape == (2, 4, 4, 4)


@pytest.mark.slow
def test_tb_sample_from_a_run_folder_uses_its_ema_weights(train_setup, tiny_vae_dir, tmp_path) -> None:
    """A run folder is exported (EMA of `latest`) into the sample folder and sampled from."""
    cfg = SampleJobConfig(model=str(train_setup.reference), out=str(tmp_path / "r"), vae=VAEConfig(path=str(tiny_vae_dir)),
                          num_samples=10, sampling=SamplingConfig(num_iter=2, batch_size=10))
    rec = run_sample(cfg, 0, 1, torch.device("cpu"))
    assert Path(rec["model"]) == tmp_path / "r" / "model.safetensors"
    assert rec["model_weights"] == "ema" and rec["model_step"] == 10
