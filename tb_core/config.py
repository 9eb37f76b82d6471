"""Strict dataclass configs filled from YAML files and dotted command-line overrides.

Each component owns a dataclass; a job config is a dataclass composed of them. Files are read
strictly: an unknown key, a value of the wrong type or a missing required field raises a one-line
`ConfigError` naming the file and the dotted key, before any heavy work starts. A YAML file may
name a `_base_` file (relative to itself) whose values it overrides, so job files stay short; a section
may name one too (`model: {_base_: ../model/L.yaml}`), so a job composes the model file people read.
`describe_keys` lists a config's dotted keys with type, default and the field's trailing comment, for
each job's `--help`.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import tokenize
import types
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from tb_core.errors import ConfigError
from tb_core.fileio import atomic_write_text

T = TypeVar("T")
BASE_KEY = "_base_"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int→float, list→tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{source}: key '{key}' must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: key '{key}' expects {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '4e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' expects float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' expects int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects bool, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' expects str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, strictly (unknown/missing/mistyped keys raise)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<top>'}' expects a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted(key)}' (known: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], dotted(name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{dotted(name)}'")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: '{prefix or cls.__name__}': {e}") from None
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists, as YAML writes them)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursing into mappings present in both (inputs are not modified)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_bases(data: dict, folder: Path, seen: tuple) -> dict:
    """Resolve `_base_` keys inside nested sections (paths relative to the file that names them)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _resolve_bases(value, folder, seen)
            base = value.pop(BASE_KEY, None)
            if base is not None:
                value = deep_merge(read_yaml(folder / base, seen), value)
        out[key] = value
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML mapping, resolving its `_base_` chains (a cycle or a missing base is an error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: '_base_' cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{path}: invalid YAML: {msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    seen = _seen + (path.resolve(),)
    base = data.pop(BASE_KEY, None)
    data = _resolve_bases(data, path.parent, seen)
    if base is None:
        return data
    return deep_merge(read_yaml(path.parent / base, seen), data)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """Turn ['model.size=L', 'optim.lr=4e-4'] into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is set both as a value and a section")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> T:
    """Fill `cls` from a YAML file (optional) and dotted overrides; errors name the file or override."""
    overrides = list(overrides)
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source += " + overrides"
    return from_dict(cls, data, source=source)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (what a run actually used), atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str        # dotted
    type: str
    default: Any
    required: bool
    comment: str    # the field's trailing `# comment` in the source ("" if none)


def _field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the class source (empty when the source is absent)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, line_name = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and row not in line_name and tok.start[1] == 4:
            line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            out.setdefault(line_name[row], tok.string.lstrip("# ").strip())
    return out


def _default_of(f: dataclasses.Field) -> tuple[Any, bool]:
    if f.default is not dataclasses.MISSING:
        return f.default, False
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory(), False
    return None, True


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of config dataclass `cls` (nested configs expanded; an optional nested config is
    listed by its own keys too) with type, default and comment, in declaration order."""
    hints = get_type_hints(cls)
    comments = _field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        nested = [a for a in (get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if nested:
            out.extend(describe_keys(nested[0], key + "."))
            continue
        default, required = _default_of(f)
        out.append(KeyDoc(key, _type_name(tp), to_dict(default), required, comments.get(f.name, "")))
    return out


__all__ = ["describe_keys", "KeyDoc", "from_dict", "to_dict", "deep_merge", "read_yaml", "parse_overrides", "load_config", "dump_config"]
