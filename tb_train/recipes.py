"""The packaged config files: job recipes, model sizes, ZeRO presets, cluster presets.

A name such as `zero2`, `demo` or `imagenet256_L` must resolve the same way from a source checkout and
from a plain (non-editable) `pip install`, where no repository folder exists. There is ONE copy of each
file, in `tb_train/configs/` (package data); the repository's top-level `configs` is a symbolic link to
it, so documented paths like `configs/jobs/imagenet256_L.yaml` keep working in a checkout.
"""
from __future__ import annotations

from pathlib import Path

from tb_core.errors import ConfigError

PACKAGED = Path(__file__).resolve().parent / "configs"
KINDS = {"deepspeed": (".json",), "jobs": (".yaml", ".yml"), "cluster": (".yaml", ".yml"), "model": (".yaml", ".yml")}


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
