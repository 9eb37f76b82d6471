"""Paths that name a file inside an installed package, so a packaged config can point at packaged data.

A config file shipped inside a package cannot name its neighbours by a path relative to the repository
(`tb_train/...` exists only in a checkout) nor by an absolute one. `pkg:PACKAGE/REL` names `REL` inside
the installed PACKAGE (found with importlib, without importing any module of the caller's choice beyond
the package itself), e.g. `pkg:tb_train.demo/assets/demo_vae`; any other string is an ordinary path.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tb_core.errors import ConfigError

PREFIX = "pkg:"


def resolve_path(spec: str) -> Path:
    """`pkg:PACKAGE/REL` -> the file or folder inside the installed package; anything else -> Path(spec)."""
    if not spec.startswith(PREFIX):
        return Path(spec).expanduser()
    package, _, rel = spec[len(PREFIX):].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{spec}: no installed package {package!r} (want pkg:PACKAGE/PATH)")
    return Path(list(found.submodule_search_locations)[0]) / rel


__all__ = ["PREFIX", "resolve_path"]
