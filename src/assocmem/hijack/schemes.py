"""Hijack schemes: a sentence S built from a record, prepended k times to the prompt.

    prompt_k = (S + sep) * k + prompt,   k = 0..K

Schemes live in an editable JSON file (the bundled ``assocmem/data/hijack_schemes.json``, or a user
file with the same layout); :func:`custom_scheme` makes one from a template string.

The placeholder ``{other}`` names another record's false target (the control scheme
"control_other": "Do not think of {other}."). It is filled from :func:`control_others`, a seeded
draw over the selected records, so a run separates the target-specific effect of "Do not think of
{target_new}." from the generic distraction of naming *some* other object.
"""
from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from .counterfact import Record

PLACEHOLDERS = ("subject", "target_new", "target_true", "target", "country", "other")


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    target: str = "new"                                  # "new" or "true": fills {target} and {country}
    template: str | None = None                          # one sentence for every record ...
    relations: Mapping[str, str] = dataclasses.field(default_factory=dict)   # ... or one per relation id
    no_target_word: frozenset[str] = frozenset()         # relation ids (or "*") whose S may not name the target
    figure: str = ""

    def __post_init__(self):
        if self.target not in ("new", "true"):
            raise ConfigError(f"scheme {self.name}: target: {self.target!r} (allowed: new, true)")
        if (self.template is None) == (not self.relations):
            raise ConfigError(f"scheme {self.name}: give exactly one of 'template' or 'relations'")
        for where, tpl in [("template", self.template), *self.relations.items()]:
            if tpl is not None:
                _check_template(tpl, f"scheme {self.name}: {where}")

    def applies_to(self, rec: Record) -> bool:
        return self.template is not None or rec.relation_id in self.relations

    @property
    def needs_other(self) -> bool:
        """Whether a template uses ``{other}`` (then :meth:`sentence` needs ``other``)."""
        return any("other" in _fields(t) for t in [self.template, *self.relations.values()] if t is not None)

    def sentence(self, rec: Record, countries: Mapping[str, str], other: str | None = None
                 ) -> tuple[str | None, str]:
        """(S, "") for the record, or (None, reason) when the scheme cannot be applied to it.

        ``other``: the value of ``{other}`` (see :func:`control_others`); needed when the template uses it."""
        tpl = self.template if self.template is not None else self.relations.get(rec.relation_id or "")
        if tpl is None:
            return None, f"relation {rec.relation_id} has no template"
        target = rec.target_new if self.target == "new" else rec.target_true
        values = {"subject": rec.subject, "target_new": rec.target_new, "target_true": rec.target_true,
                  "target": target, "country": countries.get(target), "other": other}
        if "{country}" in tpl and values["country"] is None:
            return None, f"no country for {target!r}"
        if "other" in _fields(tpl) and other is None:
            return None, "no other record"
        s = tpl.format(**values)
        if ("*" in self.no_target_word or rec.relation_id in self.no_target_word) and _names(s, target):
            return None, "sentence contains the target word"
        return s, ""


def _names(sentence: str, word: str) -> bool:
    """Whether ``word`` occurs in ``sentence`` as a whole word, ignoring case ("German" is not in "Germany")."""
    return re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", sentence.lower()) is not None


def _fields(tpl: str) -> list[str]:
    """The placeholder names of a template string (ValueError if it is malformed)."""
    return [f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None]


def _check_template(tpl: str, where: str) -> None:
    try:
        fields = _fields(tpl)
    except ValueError as e:
        raise ConfigError(f"{where}: {tpl!r} is not a valid template ({e})") from e
    bad = [f for f in fields if f not in PLACEHOLDERS]
    if bad:
        raise ConfigError(f"{where}: unknown placeholder {{{bad[0]}}} in {tpl!r} (allowed: "
                          + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ")")


def custom_scheme(template: str, name: str = "custom") -> Scheme:
    """A scheme from one template string; the target is "true" if it names {target_true}, else "new"."""
    return Scheme(name, target="true" if "{target_true}" in template else "new", template=template,
                  figure=name)


@dataclasses.dataclass
class SchemeBook:
    schemes: dict[str, Scheme]
    countries: dict[str, str]
    separator: str = " "
    source: str = ""

    def get(self, name: str) -> Scheme:
        """A scheme by name, or a custom scheme when ``name`` is a template containing '{'."""
        if "{" in name:
            return custom_scheme(name)
        if name not in self.schemes:
            raise ConfigError(f"scheme: {name!r} is unknown (allowed: {', '.join(self.schemes)}, "
                              "or a template string such as 'Do not think of {target_new}.')")
        return self.schemes[name]


def _parse(doc: Any, source: str) -> SchemeBook:
    if not isinstance(doc, dict) or not isinstance(doc.get("schemes"), dict):
        raise ConfigError(f"schemes file {source}: expected an object with a 'schemes' object")
    schemes = {}
    for name, spec in doc["schemes"].items():
        if not isinstance(spec, dict):
            raise ConfigError(f"schemes file {source}: scheme {name}: expected an object")
        unknown = set(spec) - {"target", "template", "relations", "no_target_word", "figure", "note"}
        if unknown:
            raise ConfigError(f"schemes file {source}: scheme {name}: unknown key {sorted(unknown)[0]!r} "
                              "(allowed: target, template, relations, no_target_word, figure, note)")
        schemes[name] = Scheme(name, target=spec.get("target", "new"), template=spec.get("template"),
                               relations=dict(spec.get("relations") or {}),
                               no_target_word=frozenset(spec.get("no_target_word") or ()),
                               figure=spec.get("figure", name))
    countries = doc.get("countries") or {}
    sep = doc.get("separator", " ")
    if not isinstance(countries, dict) or not isinstance(sep, str):
        raise ConfigError(f"schemes file {source}: 'countries' must be an object and 'separator' a string")
    return SchemeBook(schemes, dict(countries), sep, source)


def load_schemes(path: str | Path | None = None) -> SchemeBook:
    """The bundled schemes, with those of ``path`` (same layout) added or replacing same-named ones."""
    ref = resources.files("assocmem") / "data" / "hijack_schemes.json"
    book = _parse(json.loads(ref.read_text(encoding="utf-8")), "bundled hijack_schemes.json")
    if path:
        p = Path(path)
        try:
            user = _parse(json.loads(p.read_text(encoding="utf-8")), str(p))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"schemes file {p}: cannot read ({e})") from e
        book.schemes.update(user.schemes)
        book.countries.update(user.countries)
        book.source += f" + {p}"
    return book


def control_others(records: Sequence[Record], seed: int = 0, tries: int = 64) -> dict[int, str]:
    """{case_id: another record's target_new} for the control scheme's ``{other}``.

    For each record (in case_id order, so the draw does not depend on the input order) a uniformly
    random *other* record among ``records`` is drawn with ``numpy.random.default_rng(seed)``
    until its target_new differs from both the record's own target_new and target_true (up to
    ``tries`` draws, then one draw from the explicit list of valid records; this is the same
    uniform distribution over valid records). Records with no valid other record are left out."""
    recs = sorted(records, key=lambda r: r.case_id)
    rng = np.random.default_rng(seed)
    news = [r.target_new for r in recs]
    out: dict[int, str] = {}
    for i, rec in enumerate(recs):
        own = (rec.target_new, rec.target_true)
        for j in rng.integers(0, len(recs), size=tries) if len(recs) > 1 else ():
            if j != i and news[j] not in own:
                out[rec.case_id] = news[j]
                break
        else:
            valid = [j for j in range(len(recs)) if j != i and news[j] not in own]
            if valid:
                out[rec.case_id] = news[valid[int(rng.integers(0, len(valid)))]]
    return out


def hijack_prompt(sentence: str, prompt: str, k: int, sep: str = " ") -> str:
    """``(sentence + sep) * k + prompt``."""
    return (sentence + sep) * k + prompt
