"""Typed, validated configuration objects.

A config is a frozen dataclass tree. Leaf fields are declared with :func:`param`, which records the
allowed range or choices; :func:`build` turns a nested mapping into a validated instance and raises
:class:`ConfigError` -- one line naming the dotted key and what is allowed -- on the first problem.

Overrides come as dot-lists (``task.m=6 optim.lr=0.01 seed=0``) or YAML files; both are merged into
the defaults and validated by the same function, so the CLI, sweeps and library calls agree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` is a single line naming the key and the allowed values."""


def param(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: Sequence[Any] | None = None, help: str = "") -> Any:
    """A config field with its constraints: ``lo <= value <= hi`` and/or ``value in choices``."""
    meta = {"lo": lo, "hi": hi, "choices": tuple(choices) if choices is not None else None, "help": help}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _allowed(f: dataclasses.Field, typ: Any) -> str:
    m = f.metadata
    if m.get("choices") is not None:
        return "one of " + ", ".join(str(c) for c in m["choices"])
    name = getattr(typ, "__name__", str(typ))
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"{name} in [{lo}, {hi}]"
    if lo is not None:
        return f"{name} >= {lo}"
    if hi is not None:
        return f"{name} <= {hi}"
    return name


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``typ``; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(typ) or (Any,)
        return tuple(_coerce(v, elem, key) for v in value)
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ!r}")


def _check(value: Any, f: dataclasses.Field, typ: Any, key: str) -> None:
    m = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        bad = (m.get("choices") is not None and v not in m["choices"]) \
            or (m.get("lo") is not None and v < m["lo"]) or (m.get("hi") is not None and v > m["hi"])
        if bad:
            raise ConfigError(f"{key}: {v!r} is not allowed (allowed: {_allowed(f, typ)})")


def build(cls: type, data: Mapping[str, Any] | None = None, prefix: str = "") -> Any:
    """Build and validate a config of dataclass type ``cls`` from a (partial) nested mapping."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        typ, key = hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            sub = data.get(name, {})
            if dataclasses.is_dataclass(sub):
                sub = to_dict(sub)
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{key}: expected a group of keys ({', '.join(x.name for x in dataclasses.fields(typ))}), got {sub!r}")
            kwargs[name] = build(typ, sub, key + ".")
        elif name in data:
            value = _coerce(data[name], typ, key)
            _check(value, f, typ, key)
            kwargs[name] = value
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dict of a config (tuples become lists, JSON-ready)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"task": {"m": 6}}`` -> ``{"task.m": 6}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`; nested mappings in values are merged too."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{p}' is a value, not a group of keys")
        if isinstance(value, Mapping):
            node[leaf] = merge(node.get(leaf, {}), unflatten(flatten(value)))
        else:
            node[leaf] = value
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_dotlist(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["task.m=6", "optim.lr=1e-2"]`` into a nested dict; values are read as YAML scalars."""
    flat = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are written key=value (e.g. task.m=6)")
        key, raw = item.split("=", 1)
        if key.strip() in flat:
            raise ConfigError(f"{key.strip()}: given twice on the command line (allowed: each key once)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 misses '1e-2'
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        flat[key.strip()] = value
    return unflatten(flat)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not str(path) or not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder (allowed: a YAML file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (allowed: a YAML file)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return dict(data)


def replace(cfg: Any, **flat_updates: Any) -> Any:
    """A validated copy of ``cfg`` with dotted keys replaced: ``replace(cfg, **{"task.m": 7})``."""
    return build(type(cfg), merge(to_dict(cfg), unflatten(flat_updates)))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(task: str, cfg: Any, length: int = 16) -> str:
    """Content hash of a resolved config: the run id."""
    payload = canonical_json({"task": task, "config": to_dict(cfg)})
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def stream_seed(seed: int, stream: str) -> int:
    """Independent 63-bit seed for a named random stream (task, init, train, eval) of a master seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little") >> 1


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Separate seeds per random stream; ``None`` derives the stream's seed from the run's ``seed``."""
    task: int | None = param(None, lo=0)
    init: int | None = param(None, lo=0)
    train: int | None = param(None, lo=0)
    eval: int | None = param(None, lo=0)

    def resolve(self, seed: int) -> Seeds:
        return Seeds(**{k: (v if v is not None else stream_seed(seed, k))
                        for k, v in dataclasses.asdict(self).items()})
