"""Embedded demo data, the shipped demo VAE, the demo precompute config, and the ADM center crop."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tb_model.vae import VAEConfig, load_vae
from tb_core.config import load_config
from tb_train.demo.data import DEMO_CLASSES, DEMO_VAE, demo_digits, ensure_demo_images
from tb_train.data.images import ImageDataset, adm_center_crop, list_images, to_rgb8
from tb_train.data.precompute import PrecomputeConfig, run
from tb_train.data.shards import LatentShards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return ensure_demo_images(tmp_path_factory.mktemp("demo") / "images")


def test_demo_images_written_once(demo_folder):
    files = sorted(demo_folder.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in demo_folder.iterdir() if p.is_dir()) == list(DEMO_CLASSES)
    images, labels = demo_digits()
    first = demo_folder / DEMO_CLASSES[labels[0]] / "0000.png"
    with Image.open(first) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(img), images[0])
    stamp = first.stat().st_mtime_ns
    assert ensure_demo_images(demo_folder) == demo_folder and first.stat().st_mtime_ns == stamp


def test_demo_images_concurrent_callers(tmp_path):
    """Ranks of a job may all call it at once: every caller gets the one finished tree, no leftovers."""
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(ensure_demo_images, [tmp_path / "imgs"] * 2))
    assert got == [tmp_path / "imgs"] * 2
    assert len(list((tmp_path / "imgs").rglob("*.png"))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["imgs"]


def test_demo_images_refuse_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a finished demo image folder"):
        ensure_demo_images(tmp_path / "x")


def test_shipped_demo_vae_reconstructs_digits():
    vae = load_vae(VAEConfig(path=str(DEMO_VAE)))
    assert (vae.latent_channels, vae.downsample) == (4, 4)
    assert sum(f.stat().st_size for f in DEMO_VAE.iterdir()) < 3e6
    images, _ = demo_digits()
    x = torch.from_numpy(images[::28]).permute(0, 3, 1, 2).float() / 127.5 - 1  # 65 digits, all classes
    moments = vae.encode(x)
    assert moments.shape == (len(x), 8, 8, 8)
    scaled = moments[:, :4] * vae.scale
    assert 0.7 < scaled.std().item() < 1.3  # scaling_factor = 1/std of the posterior means
    recon = vae.decode(scaled)
    assert (recon - x).abs().mean().item() < 0.08


@pytest.mark.slow
def test_demo_config_precomputes_all_digits(tmp_path):
    cfg = load_config(PrecomputeConfig, ROOT / "configs/jobs/precompute_demo.yaml",
                      [f"input=demo:{tmp_path / 'images'}", f"output={tmp_path / 'lat'}",
                       f"vae.path={DEMO_VAE}", "num_workers=0", "progress=false"])
    summary = run(cfg)
    manifest = summary["manifest"]
    assert manifest["num_samples"] == 1797 and manifest["num_rejected"] == 0
    assert len(manifest["shards"]) == 8 and manifest["classes"] == list(DEMO_CLASSES)
    ds = LatentShards(tmp_path / "lat")
    moments, label = ds.read(len(ds) - 1)
    assert moments.shape == (2, 8, 8, 8) and label == 9
    stats = json.loads((tmp_path / "lat" / "stats.json").read_text())
    assert sorted(stats["channel_order"]) == [0, 1, 2, 3]
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    overall = np.sqrt(np.mean(std**2 + mean**2) - np.mean(mean) ** 2)  # pooled over channels
    assert 0.8 < overall < 1.25 and (std > 0.1).all()  # one scale for all channels, like KL-16's 0.2325


def test_adm_center_crop_shapes_modes_and_centering():
    for w, h in ((100, 60), (60, 100), (16, 16), (33, 17), (700, 500)):
        for mode in ("RGB", "L", "RGBA", "P"):
            out = adm_center_crop(Image.new(mode, (w, h)), 16)
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # Wide image, left third red / middle green / right third blue: the center crop is all green.
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, :40, 0] = arr[:, 40:80, 1] = arr[:, 80:, 2] = 255
    out = adm_center_crop(Image.fromarray(arr), 16).astype(int)
    assert (out[:, 2:-2, 1] > 250).all() and (out[:, 2:-2, [0, 2]] < 5).all()
    # Box pre-halving keeps a constant image exactly constant; a flat colour survives bicubic too.
    flat = adm_center_crop(Image.new("RGB", (517, 300), (10, 200, 30)), 64)
    assert (flat == np.array([10, 200, 30])).all()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG opens as mode I;16 (or I); PIL's own convert clips it to 255 almost everywhere."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    (tmp_path / "gray").mkdir()
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "gray" / "ramp16.png")
    with Image.open(tmp_path / "gray" / "ramp16.png") as img:
        assert img.mode in ("I;16", "I")
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9  # what the old path gave
        rgb = np.asarray(to_rgb8(img))
    want = np.rint(ramp.astype(np.uint16) / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb, np.repeat(want[..., None], 3, axis=2))
    # 32-bit integer mode I: the same scale, values outside 0..65535 clipped
    wide = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    assert np.asarray(to_rgb8(Image.fromarray(wide, mode="I")))[0, :, 0].tolist() == [0, 0, 1, 255, 255]
    # through the precompute dataset: mean brightness of the crop is the ramp's (~127), not white
    _, image, _, reason = ImageDataset(list_images(str(tmp_path)), 16)[0]
    assert reason == "" and abs(image.float().mean().item() - 127.5) < 3
