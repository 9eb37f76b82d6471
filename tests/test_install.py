"""A plain (non-editable) install works away from the source checkout.

The project is copied (setup files and the three packages only) and installed with
`pip install --no-deps --no-build-isolation --target SITE` — the dependencies come from the test
environment, so nothing is downloaded. Every check then runs with PYTHONPATH=SITE from an empty
temporary folder: the console scripts answer `--help`, every data file of the packages was shipped,
a copied job file resolves `engine.deepspeed=zero3` to the packaged ZeRO preset, not to a `configs/`
folder of the checkout, and the packaged demo configs run from any folder: `tb-precompute --config
precompute_demo` (its `demo:` input comes through the installed entry point) then `tb-train --config demo`
(its VAE is a `pkg:` path into the installed package).
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tb_core", "tb_model", "tb_train")
SETUP_FILES = ("setup.cfg", "pyproject.toml", "README.md")
DATA_DIRS = ("tb_train/configs", "tb_train/demo/assets")

pytestmark = pytest.mark.slow


def _console_scripts() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entries = cfg["options.entry_points"]["console_scripts"]
    return [ln.split("=")[0].strip() for ln in entries.splitlines() if "=" in ln]


_TRAIN_CHECK = """
import sys
import tb_train
from tb_core.config import load_config
from tb_train.engine.engine import deepspeed_config, resolve_deepspeed_file
from tb_train.train.job import TrainJobConfig
cfg = load_config(TrainJobConfig, sys.argv[1], ["engine.deepspeed=zero3", "data.path=" + sys.argv[2]])
ds = deepspeed_config(cfg.engine, cfg.optim, cfg.data.micro_batch, 1)
print(tb_train.__file__)
print(resolve_deepspeed_file(cfg.engine.deepspeed))
print(ds["zero_optimization"]["stage"])
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    src, site = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in SETUP_FILES:
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=src)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return site


def test_every_console_script_is_covered():
    assert {"tb-demo", "tb-train", "tb-precompute", "tb-export"} <= set(_console_scripts())


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_package_holds_every_data_file(site):
    for folder in DATA_DIRS:
        files = {p.relative_to(ROOT) for p in (ROOT / folder).rglob("*") if p.is_file()
                 and "__pycache__" not in p.parts}
        missing = sorted(str(f) for f in files if not (site / f).is_file())
        assert not missing, f"not shipped by a non-editable install (setup.cfg package_data): {missing}"
    assert not (site / "slurm").exists() and not (site / "tests").exists()


@pytest.mark.parametrize("script", _console_scripts())
def test_console_scripts_answer_help_away_from_the_checkout(site, tmp_path, script):
    res = _run(site, tmp_path, str(site / "bin" / script), "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: {script}")


def test_copied_job_file_resolves_zero3_from_package_data(site, tmp_path):
    job = tmp_path / "my_job.yaml"
    shutil.copy2(site / "tb_train" / "configs" / "jobs" / "demo.yaml", job)
    res = _run(site, tmp_path, sys.executable, "-c", _TRAIN_CHECK, str(job), str(tmp_path / "latents"))
    assert res.returncode == 0, res.stderr[-3000:]
    module_file, zero_file, stage = res.stdout.split()
    assert Path(module_file).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(zero_file) == site / "tb_train" / "configs" / "deepspeed" / "zero3.json"
    assert stage == "3"
    res = _run(site, tmp_path, str(site / "bin" / "tb-train"), "--config", str(job), "engine.deepspeed=zero3", "--help")
    assert res.returncode == 0 and "--config" in res.stdout, res.stderr[-2000:]


def test_packaged_demo_configs_run_from_any_folder(site, tmp_path):
    latents, run = tmp_path / "latents", tmp_path / "run"
    res = _run(site, tmp_path, str(site / "bin" / "tb-precompute"), "--config", "precompute_demo",
               f"input=demo:{tmp_path / 'images'}", f"output={latents}", "num_workers=0", "progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (latents / "manifest.json").is_file()
    res = _run(site, tmp_path, str(site / "bin" / "tb-train"), "--config", "demo", f"data.path={latents}",
               f"run.dir={run}", "run.max_steps=2", "data.num_workers=0", "metrics.image_every=2",
               "samples.num_images=2", "eval.every_steps=0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert list((run / "tensorboard").glob("events.*"))  # the grid decoded through the packaged VAE
