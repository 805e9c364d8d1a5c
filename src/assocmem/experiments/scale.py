"""How big a reproduction runs: every paper declares its settings once, with their defaults, and names
its scales ("quick", "paper", ...) by the settings they change.

    DEFAULTS = {"d": REQUIRED, "steps": 500, "lr": 0.03}
    SCALES = make_scales(DEFAULTS, quick={"d": 64}, paper={"d": 256, "steps": 1000})
    SCALES["quick"].d          # 64

A setting a scale does not know is an error at import time, so a misspelt key cannot pass unnoticed.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

REQUIRED: Any = object()       # a default every scale must replace


class Scale:
    """One paper's settings at one named scale, read as attributes; immutable (:meth:`replace` copies)."""

    __slots__ = ("name", "_settings")

    def __init__(self, name: str, settings: Mapping[str, Any]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_settings", MappingProxyType(dict(settings)))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._settings[key]
        except KeyError:
            raise AttributeError(f"scale {self.name!r} has no setting {key!r} "
                                 f"(allowed: {', '.join(self._settings)})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"scale {self.name!r} is immutable; use .replace({key}=...)")

    def replace(self, name: str | None = None, **changes: Any) -> Scale:
        """A copy with some settings changed (only settings this scale has)."""
        unknown = sorted(set(changes) - set(self._settings))
        if unknown:
            raise AttributeError(f"scale {self.name!r} has no setting {unknown[0]!r} "
                                 f"(allowed: {', '.join(self._settings)})")
        return Scale(name or self.name, {**self._settings, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scale) and (self.name, self.as_dict()) == (other.name, other.as_dict())

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self._settings))))

    def __reduce__(self):
        return Scale, (self.name, self.as_dict())

    def __repr__(self) -> str:
        return f"Scale({self.name!r}, {self.as_dict()!r})"


def make_scales(defaults: Mapping[str, Any], **scales: Mapping[str, Any]) -> dict[str, Scale]:
    """``{name: Scale}``, each scale ``defaults`` updated by its own settings.

    Raises ValueError for a setting not in ``defaults`` or a :data:`REQUIRED` one left out."""
    out = {}
    for name, given in scales.items():
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"scale {name!r}: unknown setting {unknown[0]!r} (allowed: {', '.join(defaults)})")
        settings = {**defaults, **given}
        missing = [k for k, v in settings.items() if v is REQUIRED]
        if missing:
            raise ValueError(f"scale {name!r}: setting {missing[0]!r} is required")
        out[name] = Scale(name, settings)
    return out
