"""The exported weights file: one safetensors file that carries its own architecture.

    model.safetensors   every tensor of the bare TokenBridge state dict (fp32), and in its metadata
                        "config" = the resolved ModelConfig as JSON (plus free-form keys such as
                        "weights": "ema", "step": "1000")
    model.json          the same config, pretty-printed, beside it (for people and for tools that do
                        not read safetensors metadata)

This is the convention diffusers users know (`from_pretrained(path)`): a trained model is loaded from
the file alone, with no training code, no DeepSpeed and no run folder. `tb-export` writes it;
`TokenBridge.from_pretrained` reads it. Both files are written atomically and get the permissions a
plain `open()` would give under the current umask.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from tb_core.config import from_dict, to_dict
from tb_core.errors import ConfigError, InputError
from tb_core.fileio import atomic_write_bytes, atomic_write_json

from .config import ModelConfig, resolve

WEIGHTS_NAME = "model.safetensors"
CONFIG_KEY = "config"


def weights_path(path: str | os.PathLike) -> Path:
    """A weights file, or a folder holding `model.safetensors` -> the file (InputError if absent)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise InputError(f"{p}: exported weights not found (want a .safetensors file from tb-export, "
                         f"or a folder holding {WEIGHTS_NAME})")
    return p


def save_weights(path: str | os.PathLike, state_dict: dict[str, Tensor], config: ModelConfig,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write `path` (.safetensors, config in its metadata) and the `<stem>.json` sidecar; -> `path`.

    The file is built in memory (safetensors' `save`) and renamed into place, so a reader never sees
    half a file; peak memory is about twice the weights.
    """
    from safetensors.torch import save

    path = Path(path)
    cfg = to_dict(resolve(config))
    meta = {**(metadata or {}), CONFIG_KEY: json.dumps(cfg)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    atomic_write_json(path.with_suffix(".json"), cfg)
    return path


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, str]]:
    """-> (resolved ModelConfig, the file's metadata) of an exported file, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    p = weights_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputError(f"{p}: cannot read safetensors: {e}") from None
    if CONFIG_KEY in metadata:
        try:
            raw, source = json.loads(metadata[CONFIG_KEY]), f"{p} (metadata '{CONFIG_KEY}')"
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: metadata '{CONFIG_KEY}' is not valid JSON: {e}") from None
    else:
        sidecar = p.with_suffix(".json")
        if not sidecar.is_file():
            raise InputError(f"{p}: no model config (metadata '{CONFIG_KEY}' or sidecar {sidecar.name}); "
                             "was it written by tb-export?")
        try:
            raw, source = json.loads(sidecar.read_text()), str(sidecar)
        except json.JSONDecodeError as e:
            raise InputError(f"{sidecar}: invalid JSON: {e}") from None
    try:
        return resolve(from_dict(ModelConfig, raw, source=source)), metadata
    except ConfigError as e:
        raise InputError(f"{p}: its model config does not fit this version of tb_model: {e}") from None


def read_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of an exported file, on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = weights_path(path)
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{p}: cannot read safetensors: {e}") from None


__all__ = ["WEIGHTS_NAME", "CONFIG_KEY", "weights_path", "save_weights", "read_config", "read_state_dict"]
