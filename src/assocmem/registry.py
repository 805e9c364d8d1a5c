"""Task registry: the name a user types (``assocmem run lca``) -> how to build, run and stack it.

Each task module defines a :class:`TaskSpec` called ``SPEC``. Modules are imported lazily so that the
CLI starts fast and optional dependencies of one task never break another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from .config import ConfigError, build, canonical_json, merge, to_dict

# name -> "module:attribute"; add one line per task family.
TASKS: dict[str, str] = {
    "lca": "assocmem.runners.lca:SPEC",
    "induction": "assocmem.runners.induction:SPEC",
    "geometric": "assocmem.runners.geometric:SPEC",
}


@dataclasses.dataclass
class RunResult:
    """What a run returns: scalar-or-list metrics, named weight tensors, and a status.

    status: ``ok``; ``diverged`` (non-finite loss or weights: deterministic, not retried);
    ``error`` (an exception: retried on the next invocation).
    """
    metrics: dict[str, Any]
    weights: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "ok"
    error: str | None = None


def _no_seed(cfg: Any) -> str:
    d = to_dict(cfg)
    d.pop("seed", None)
    d.pop("seeds", None)
    return repr(sorted(d.items()))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A runnable task family.

    run_stack(configs) runs configs that share ``stack_key`` (by default: equal up to their seeds)
    as one batched model and returns one :class:`RunResult` per config, in order. A run is a pure
    function of its config.
    """
    name: str
    config_cls: type
    run_stack: Callable[[Sequence[Any]], list[RunResult]]
    summary_keys: tuple[str, ...] = ()
    stack_key: Callable[[Any], str] = _no_seed
    max_stack: int = 64
    description: str = ""
    protocol: str = ""

    def make_config(self, data: dict | None = None) -> Any:
        return build(self.config_cls, data or {})

    def run(self, cfg: Any) -> RunResult:
        return self.run_stack([cfg])[0]


def run_id(task: TaskSpec, cfg: Any, length: int = 16) -> str:
    """A run's content address: SHA-256 of ``{task name, code protocol, resolved config}``."""
    payload = canonical_json({"task": task.name, "protocol": task.protocol, "config": to_dict(cfg)})
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def load_spec(path: str) -> TaskSpec:
    """Import a TaskSpec from its "module:attribute" path."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r} (allowed: {', '.join(sorted(TASKS))})")
    return load_spec(TASKS[name])


def config_from(task: TaskSpec, *layers: dict) -> Any:
    """Merge config layers (defaults < YAML < dot-list) and validate."""
    data: dict = {}
    for layer in layers:
        data = merge(data, layer or {})
    return task.make_config(data)
