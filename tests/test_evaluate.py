"""tb-eval: metric functions against torch-fidelity, the Inception features end to end, rank-parallel
extraction, and one-line errors for bad input. Inception weights are random (fixtures/inception.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from tb_core.errors import InputError
from tb_train.eval import job as evaluate
from tb_train.eval.job import EvaluateJobConfig
from tb_train.eval.metrics import feature_stats, frechet_distance, inception_score, precision_recall

REPO = Path(__file__).resolve().parents[1]


def smooth_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: a random colour gradient and a bright square per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = rng.uniform(20, 200, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        y, x = rng.integers(0, size // 2, 2)
        base[y:y + size // 3, x:x + size // 3] += 50
        out.append(np.clip(base + rng.normal(0, 4, base.shape), 0, 255))
    return np.stack(out).astype(np.uint8)


def shifted(images: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + amount, 0, 255).astype(np.uint8)


# -- metric functions ----------------------------------------------------------------------------------
def test_frechet_distance_equals_torch_fidelity_and_grows_with_shift() -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    b = torch.randn(300, 16, generator=g) * 1.1
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-7)
    assert frechet_distance(*feature_stats(a), *feature_stats(a)) == pytest.approx(0, abs=1e-9)
    fids = [frechet_distance(*feature_stats(a), *feature_stats(a + s)) for s in (0.1, 0.5, 2.0)]
    assert 0 < fids[0] < fids[1] < fids[2]
    assert fids[2] == pytest.approx(16 * 2.0 ** 2, rel=1e-6)  # a pure mean shift adds |shift|^2


def test_frechet_distance_of_rank_deficient_sets_matches_sqrtm() -> None:
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 40, generator=g), torch.randn(12, 40, generator=g) + 0.3  # N < D: singular sigmas
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    adm = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(adm, rel=1e-5)


def test_inception_score_identical_is_one_and_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    same = torch.randn(1, 30).expand(40, 30)
    assert inception_score(same, 10) == pytest.approx((1.0, 0.0), abs=1e-9)
    confident = torch.eye(20).repeat(2, 1) * 30  # 40 samples, 20 classes, sure of each: IS -> 20 per split
    assert inception_score(confident, 2)[0] == pytest.approx(20, rel=1e-3)
    logits = torch.randn(57, 30, generator=torch.Generator().manual_seed(2)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert inception_score(logits, 10) == pytest.approx(
        (theirs["inception_score_mean"], theirs["inception_score_std"]), rel=1e-9)


def test_precision_recall_self_is_one_and_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(50, 8, generator=g) * 1.5 + 0.5
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    ours = precision_recall(real, fake, k=3, batch=7)  # batching must not matter
    assert ours == calculate_precision_recall_full(fake, real, 3)  # torch-fidelity: (generated, real)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1


# -- the Inception extractor and tb-eval end to end ----------------------------------------------------
@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_sets")
    imgs = smooth_images(8, seed=0)
    other = smooth_images(8, seed=1)
    paths = {"a": root / "a.npz", "a_copy": root / "a_copy.npz", "b": root / "b.npz",
             "shift20": root / "shift20.npz", "shift60": root / "shift60.npz"}
    np.savez(paths["a"], arr_0=imgs)
    np.savez(paths["a_copy"], arr_0=imgs)
    np.savez(paths["b"], arr_0=other)
    np.savez(paths["shift20"], arr_0=shifted(imgs, 20))
    np.savez(paths["shift60"], arr_0=shifted(imgs, 60))
    return paths


def _eval(samples: Path, reference: Path, weights: Path, **kw) -> dict:
    cfg = EvaluateJobConfig(samples=str(samples), reference=str(reference), inception_weights=str(weights), **kw)
    return evaluate.evaluate(cfg)


@pytest.mark.slow
def test_tb_eval_equals_torch_fidelity_on_the_same_images(image_sets, inception_weights, tmp_path) -> None:
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, path):
            self.arr = np.load(path)["arr_0"]

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return torch.from_numpy(self.arr[i]).permute(2, 0, 1).contiguous()

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(image_sets["b"]), input2=Images(image_sets["a"]), fid=True, isc=True, prc=True,
        isc_splits=3, samples_shuffle=False, feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(inception_weights), cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=8)
    ours = _eval(image_sets["b"], image_sets["a"], inception_weights, splits=3, out=str(tmp_path / "m.json"),
                 protocol="equal_splits")  # torch-fidelity's IS splits and float32 P/R distances
    assert ours["fid"] > 1e-3
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert (ours["precision"], ours["recall"]) == pytest.approx((theirs["precision"], theirs["recall"]))
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == ours["fid"]


def test_fid_self_zero_and_growing_with_shift_through_inception(image_sets, inception_weights, tmp_path) -> None:
    same = _eval(image_sets["a"], image_sets["a_copy"], inception_weights, splits=2, out=str(tmp_path / "0.json"))
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["sfid"] == pytest.approx(0, abs=1e-6)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    f20 = _eval(image_sets["shift20"], image_sets["a"], inception_weights, splits=2, out=str(tmp_path / "1.json"))
    f60 = _eval(image_sets["shift60"], image_sets["a"], inception_weights, splits=2, out=str(tmp_path / "2.json"))
    assert 0 < f20["fid"] < f60["fid"]
    cached = list(image_sets["a"].parent.glob("a.npz.tbeval-*.npz"))
    assert len(cached) == 1  # the reference's statistics were computed once and reused


def test_adm_reference_statistics_and_sfid(image_sets, inception_weights, tmp_path) -> None:
    """An ADM-style file: mu/sigma (and mu_s/sigma_s) are used as given; arr_0 only for precision/recall."""
    from tb_train.eval.inception import InceptionExtractor

    imgs = np.load(image_sets["b"])["arr_0"]
    feats = InceptionExtractor(inception_weights)(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    mu, sigma = feature_stats(feats["pool"])
    mu_s, sigma_s = feature_stats(feats["spatial"])
    assert feats["spatial"].shape == (8, 17 * 17 * 7)
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=np.load(image_sets["a"])["arr_0"])
    out = _eval(image_sets["b"], ref, inception_weights, splits=2, out=str(tmp_path / "m.json"))
    assert out["fid"] == pytest.approx(0, abs=1e-6) and out["sfid"] == pytest.approx(0, abs=1e-6)
    assert out["precision"] < 1.0  # against arr_0 = set a, not the statistics' set b
    # set a against b's statistics: sFID is the Fréchet distance of the SPATIAL features (not of pool3)
    other = _eval(image_sets["a"], ref, inception_weights, splits=2, out=str(tmp_path / "a.json"))
    feats_a = InceptionExtractor(inception_weights)(torch.from_numpy(np.load(image_sets["a"])["arr_0"]).permute(0, 3, 1, 2))
    expected_sfid = frechet_distance(*feature_stats(feats_a["spatial"]), mu_s, sigma_s)
    expected_fid = frechet_distance(*feature_stats(feats_a["pool"]), mu, sigma)
    assert other["sfid"] == pytest.approx(expected_sfid, rel=1e-6) and other["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert abs(other["sfid"] - other["fid"]) > 0.01 * other["fid"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_tb_eval_equals_one_rank(image_sets, inception_weights, tmp_path) -> None:
    """The CLI on 2 gloo ranks (each extracts its slice) writes the numbers of one process."""
    from tb_train.dist import free_port

    def run(world: int, out: Path) -> dict:
        port = free_port()
        argv = [sys.executable, "-m", "tb_train.eval", f"samples={image_sets['b']}",
                f"reference={image_sets['shift20']}", f"inception_weights={inception_weights}", "splits=2",
                f"out={out}", "batch_size=5", "protocol=paper"]
        procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
            procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0] * world, results
        assert "WARNING" in results[0][1] and "NOT comparable" in results[0][0]  # protocol paper, 8 != 50000
        assert results[0][0].strip().splitlines()[-1].startswith("FID ")
        return json.loads(out.read_text())

    one, two = run(1, tmp_path / "one.json"), run(2, tmp_path / "two.json")
    for key in ("fid", "is_mean", "is_std", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert two["world_size"] == 2 and two["warnings"] and two["protocol"] == "paper"


# -- bad input: one line naming the file ---------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(image_sets, inception_weights, tmp_path) -> None:
    imgs = np.load(image_sets["a"])["arr_0"]
    cases = {}
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32))
    cases["float.npz"] = (tmp_path / "float.npz", image_sets["a"], inception_weights, "uint8")
    np.savez(tmp_path / "nostats.npz", foo=np.zeros(3))
    cases["nostats"] = (image_sets["a"], tmp_path / "nostats.npz", inception_weights, "neither mu/sigma")
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(2048))
    cases["mu_only"] = (image_sets["a"], tmp_path / "mu_only.npz", inception_weights, "but not sigma")
    cases["weights"] = (image_sets["a"], image_sets["b"], tmp_path / "missing.pth", "Inception weights not found")
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    cases["size"] = (tmp_path / "big.npz", image_sets["a"], inception_weights, "samples are 32x32")
    gaps = tmp_path / "gaps"
    gaps.mkdir()
    from PIL import Image
    for i in (0, 1, 3):
        Image.fromarray(imgs[i]).save(gaps / f"{i:06d}_c0000.png")
    cases["gaps"] = (gaps, image_sets["a"], inception_weights, "gaps: 1 of 4 samples missing (first: index 2)")
    for name, (samples, ref, weights, expected) in cases.items():
        with pytest.raises(InputError) as err:
            _eval(samples, ref, weights, out=str(tmp_path / "never.json"))
        msg = str(err.value)
        assert expected in msg and "\n" not in msg, (name, msg)
    assert not (tmp_path / "never.json").exists()


def test_cli_error_is_one_line_on_stderr(image_sets, tmp_path, capsys) -> None:
    with mock.patch.dict(os.environ):
        code = evaluate.main([f"samples={image_sets['a']}", f"reference={image_sets['b']}",
                              f"inception_weights={tmp_path / 'none.pth'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("tb-eval: error: ") and "none.pth" in err[-1]
