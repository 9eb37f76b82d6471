"""Config files the code itself needs (ZeRO presets, the demo jobs, cluster presets), shipped in the package.

A name such as `zero2` or `demo` must resolve the same way from a source checkout and from a plain
(non-editable) `pip install`, where no `configs/` folder exists. The files live in `tb_train/configs/`
as package data; the top-level `configs/` folder of the repository is the user-facing recipe folder and
holds identical copies of them (tests/test_structure.py fails if the two drift apart) beside the recipes
the code never reads by name (the ImageNet jobs, the model sizes).
"""
from __future__ import annotations

from pathlib import Path

from tb_core.errors import ConfigError

PACKAGED = Path(__file__).resolve().parent / "configs"
KINDS = {"deepspeed": (".json",), "jobs": (".yaml", ".yml"), "cluster": (".yaml", ".yml")}


def packaged_names(kind: str) -> list[str]:
    """Names of the packaged configs of one kind, e.g. ['zero0', 'zero1', 'zero2', 'zero3']."""
    return sorted(p.stem for p in (PACKAGED / kind).iterdir() if p.suffix in KINDS[kind])


def config_path(spec: str, kind: str) -> Path:
    """`spec` is a path to a file (used if it exists or looks like a path) or a packaged config's name."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; known: {sorted(KINDS)}")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    looks_like_path = "/" in spec or path.suffix in (".json", ".yaml", ".yml")
    if not looks_like_path:
        for suffix in KINDS[kind]:
            packaged = PACKAGED / kind / (spec + suffix)
            if packaged.is_file():
                return packaged
    known = ", ".join(packaged_names(kind))
    raise ConfigError(f"{kind} config {spec!r}: no such file, and not a packaged name ({known})")


__all__ = ["PACKAGED", "config_path", "packaged_names"]
