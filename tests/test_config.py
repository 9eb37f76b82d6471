"""The config system: strict YAML, dotted overrides, `_base_` chains and the resolved dump."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from tb_core.config import dump_config, load_config, parse_overrides, to_dict
from tb_core.errors import ConfigError


@dataclass
class Optim:
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Model:
    size: Literal["tiny", "L", "H"] = "tiny"
    order: Optional[list[int]] = None


@dataclass
class Job:
    data: str
    steps: int = 10
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    path = write(tmp_path, "job.yaml", {"data": "/shards", "model": {"size": "L"}, "optim": {"lr": 1}})
    cfg = load_config(Job, path, ["optim.lr=4e-4", "model.order=[1,0]", "steps=3"])
    assert cfg.model.size == "L" and cfg.model.order == [1, 0] and cfg.steps == 3
    assert cfg.optim.lr == 4e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "data, overrides, needle",
    [
        ({"data": "x", "optim": {"lrr": 1.0}}, [], "unknown key 'optim.lrr'"),
        ({"data": "x", "steps": "ten"}, [], "key 'steps' expects int"),
        ({"data": "x", "steps": 1.5}, [], "key 'steps' expects int"),
        ({"data": "x", "model": {"size": "XL"}}, [], "key 'model.size' must be one of"),
        ({"data": "x", "optim": {"betas": [0.9]}}, [], "key 'optim.betas' expects 2 items"),
        ({"steps": 2}, [], "missing required key 'data'"),
        ({"data": "x"}, ["model.sise=L"], "unknown key 'model.sise'"),
        ({"data": "x"}, ["steps"], "expected key=value"),
    ],
)
def test_errors_are_one_line_and_name_file_and_key(tmp_path, data, overrides, needle):
    path = write(tmp_path, "bad.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(Job, path, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    if not overrides:
        assert str(path) in msg


def test_base_chain_and_missing_file(tmp_path):
    write(tmp_path, "base.yaml", {"data": "/a", "steps": 5, "optim": {"lr": 1e-3}})
    child = write(tmp_path, "child.yaml", {"_base_": "base.yaml", "optim": {"betas": [0.8, 0.9]}})
    cfg = load_config(Job, child)
    assert (cfg.data, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("/a", 5, 1e-3, (0.8, 0.9))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "nope.yaml")
    loop = write(tmp_path, "loop.yaml", {"_base_": "loop.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Job, loop)


def test_a_section_composes_its_own_base_file(tmp_path):
    """`optim: {_base_: ../parts/optim.yaml}` fills that section from a file relative to the job file."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "jobs").mkdir()
    write(tmp_path / "parts", "optim.yaml", {"lr": 2e-3, "betas": [0.7, 0.8]})
    job = write(tmp_path / "jobs", "job.yaml", {"data": "/d", "optim": {"_base_": "../parts/optim.yaml", "lr": 5e-4}})
    cfg = load_config(Job, job)
    assert (cfg.optim.lr, cfg.optim.betas) == (5e-4, (0.7, 0.8))
    missing = write(tmp_path / "jobs", "m.yaml", {"data": "/d", "optim": {"_base_": "nope.yaml"}})
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Job, missing)


def test_imagenet_jobs_compose_the_model_files_people_read():
    from tb_model.config import ModelConfig, resolve
    from tb_train.recipes import config_path
    from tb_train.train.job import TrainJobConfig

    for size, width in (("L", 1024), ("H", 1280)):
        cfg = load_config(TrainJobConfig, config_path(f"imagenet256_{size}", "jobs"), ["data.path=/d"])
        alone = load_config(ModelConfig, config_path(size, "model"))
        assert cfg.model.size == size and cfg.model.latent_channels == alone.latent_channels == 16
        assert (cfg.model.channel_order, cfg.model.quantizer) == (alone.channel_order, alone.quantizer)
        assert cfg.model.dropout == cfg.model.label_drop == 0.1  # the job's training keys on top of the file
        assert resolve(cfg.model).width == resolve(alone).width == width


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [1, 2\nsteps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, path)
    assert "invalid YAML" in str(err.value) and "\n" not in str(err.value)


def test_resolved_dump_round_trips(tmp_path):
    cfg = load_config(Job, None, ["data=/s", "model.size=H"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(Job, out) == cfg
    assert yaml.safe_load(out.read_text()) == to_dict(cfg)
    assert not list(out.parent.glob("*.tmp"))


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true", "e=[1, 2]", "f="]) == {
        "a": {"b": 1, "c": "x"}, "d": True, "e": [1, 2], "f": ""}


def test_dump_follows_the_umask(tmp_path):
    """Written like any file the user creates (0644 under umask 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        dump_config(load_config(Job, None, ["data=/s"]), tmp_path / "config.yaml")
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
