"""Reproduction of the LLM half of "Do LLMs dream of elephants?" (Jiang et al., NeurIPS 2024):
efficacy score (ES) vs number of prepends for every scheme and relation, and the Figure 1 demo. The
bundled small models are the offline default; any hub ids or local folders can replace them.

    assocmem reproduce hijack                     # quick: n records per curve sized for ~20 min, 2 cores
    assocmem hijack reproduce --n 300 --out DIR   # larger subsample (or ASSOCMEM_HIJACK_N=300)
    assocmem hijack reproduce --models gpt2,google/gemma-2b --device cuda --dtype bfloat16 --n 0

Per-record scores live in the results store ``out_dir/scores/<id>/`` (:mod:`assocmem.hijack.store`),
keyed by model, data, scheme, k list and scorer: reused unless ``force``, rescored when any of them
(e.g. the data file) changes, and resumed after an interruption.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .. import findings, plots
from .scale import REQUIRED, make_scales

MODELS = ("smollm2-135m", "gemma3-270m")
RELATIONS = ("P103", "P131", "P190", "P641", "P1412")
# n: CounterFact records per curve; ks: numbers of prepended context sentences
SCALES = make_scales({"n": REQUIRED, "ks": tuple(range(11))}, quick={"n": 30}, paper={"n": 500})
SEED = 0


@dataclasses.dataclass(frozen=True)
class Curve:
    scheme: str
    relation: str | None     # None: all records (generic schemes)
    figure: str

    @property
    def key(self) -> str:
        return f"{self.scheme}_{self.relation or 'all'}"


CURVES = [Curve("generic_false", None, "sub_false_accs"), Curve("generic_true", None, "sub_true_accs")] + [
    Curve(f"relation_{pol}", rel, f"sentence_{pol}_{rel}") for pol in ("false", "true") for rel in RELATIONS]


def _available(name: str) -> bool:
    """Bundled models: whether their package is installed; hub ids and local folders: assumed (a
    failed load says why)."""
    from ..llm.models import BUNDLED
    return name not in BUNDLED or importlib.util.find_spec(BUNDLED[name].package) is not None


def _score_model(lm, store, ds, data_sha, book, ks, n: int | None, force: bool, log, chunk: int | None,
                 batch_tokens: int | None) -> dict[str, pd.DataFrame]:
    """Score every curve for one model into the results store; returns {curve key: per-record table}."""
    from ..hijack.counterfact import select
    from ..hijack.store import CHUNK_DEFAULT, score_to_store
    tables, name = {}, lm.name
    for c in CURVES:
        scheme = book.get(c.scheme)
        rels = [c.relation] if c.relation else None
        recs = select(ds.records, rels, n, SEED)
        t0 = time.perf_counter()
        entry, scored = score_to_store(store, lm, recs, scheme, ks, book.countries, data=ds.source,
                                       data_sha256=data_sha, separator=book.separator, seed=SEED,
                                       skip_too_long=True, batch_tokens=batch_tokens, chunk=chunk or CHUNK_DEFAULT,
                                       relation=rels, progress=True, force=force)
        if scored:
            log["wall"][f"{name}/{c.key}"] = round(time.perf_counter() - t0, 1)
        done = entry.done
        if done["skipped"] or done["too_long"]:
            log["skipped"][f"{name}/{c.key}"] = {**done["skipped"], **({"too_long_pairs": done["too_long"]}
                                                                      if done["too_long"] else {})}
        log["entries"][f"{name}/{c.key}"] = entry.id
        tables[c.key] = entry.table()
    return tables


@plots.figure("sub_{polarity}_accs", "sentence_{polarity}_{relation}")
def curve_figure(curve: Curve, results: dict[str, dict[str, pd.DataFrame]]):
    fig, ax = plots.new_figure()
    for i, (model, summ) in enumerate(results.items()):
        s = summ.get(curve.key)
        if s is None or s.empty:
            continue
        color = plots.COLORS[i % len(plots.COLORS)]
        ax.plot(s.k, s.value, marker="o", ms=3.5, color=color, label=f"{model} (n={int(s.n.iloc[0])})")
        ax.fill_between(s.k, s.lo, s.hi, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("Number of prepends")
    ax.set_ylabel("Efficacy Score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(curve.figure)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


@plots.figure("hijack-example")
def demo_figure(demos: dict[str, list[dict]]):
    fig, axes = plots.new_figure(nrows=max(1, len(demos)), ncols=2, figsize=(8, 2.4 * max(1, len(demos))),
                                 squeeze=False)
    for row, (model, res) in enumerate(demos.items()):
        for col, r in enumerate(res):
            ax = axes[row][col]
            toks = [t for t, _ in r["top"]][::-1]
            ax.barh(range(len(toks)), [p for _, p in r["top"]][::-1], color=plots.COLORS[col])
            ax.set_yticks(range(len(toks)), [repr(t) for t in toks])
            ax.set_xlim(0, 1)
            ax.set_title(f"{model}: {'with' if r['context'] else 'without'} context", fontsize=9)
    return fig


def _checks(model: str, summ: dict[str, pd.DataFrame], ks: Sequence[int]) -> list[findings.Check]:
    out = []
    k1 = 1 if 1 in ks else min(k for k in ks if k > 0)
    for c in CURVES:
        s = summ.get(c.key)
        if s is None or s.empty:
            out.append(findings.Check(f"{model}: {c.figure}", None, "missing", note="no records"))
            continue
        v = s.set_index("k")
        k0, kmax = min(ks), max(ks)
        note = f"n={int(s.n.iloc[0])}; ES k={k0}: {v.value[k0]:.3f}, k={kmax}: {v.value[kmax]:.3f}"
        if c.scheme == "generic_false":
            up = v.lo[k1] > v.hi[k0]
            stays = all(v.value[k] > v.hi[k0] for k in ks if k1 <= k <= 5)
            out.append(findings.trend(f"{model}: {c.figure} rises k={k0}->{k1} (CIs apart), stays up to k=5",
                                    up and stays, round(float(v.value[k1] - v.value[k0]), 3),
                                    "ES rises with k", note, source="paper"))
        elif c.scheme.endswith("false"):
            out.append(findings.trend(f"{model}: {c.figure} ES(k={kmax}) > ES(k={k0})", v.value[kmax] > v.value[k0],
                                    round(float(v.value[kmax] - v.value[k0]), 3), "ES rises with k", note, source="paper"))
        else:
            out.append(findings.trend(f"{model}: {c.figure} ES(k={kmax}) < ES(k={k0})", v.value[kmax] < v.value[k0],
                                    round(float(v.value[kmax] - v.value[k0]), 3), "ES falls with k", note, source="paper"))
    return out


def _example_table(records) -> str:
    from ..hijack.schemes import load_schemes
    book = load_schemes()
    lines = ["| relation | context (relation_false, k=1) | true target | false target |", "|---|---|---|---|"]
    for rel in RELATIONS:
        for r in sorted((r for r in records if r.relation_id == rel), key=lambda r: r.case_id):
            s, _ = book.get("relation_false").sentence(r, book.countries)
            if s:
                lines.append(f"| {rel} | {s} {r.text} | {r.target_true} | {r.target_new} |")
                break
    return "\n".join(lines)


def reproduce(out_dir, scale: str = "quick", force: bool = False, n: int | None = None,
              models: Sequence[str] | None = None, ks: Sequence[int] | None = None, device: str = "auto",
              dtype: str = "auto", device_map: str | None = None, revision: str | None = None,
              attn_implementation: str | None = None, chunk: int | None = None,
              batch_tokens: int | None = None, explain: bool = True) -> findings.Section:
    """Score every curve for each model, one model at a time.

    ``n``: records per curve (None: ``$ASSOCMEM_HIJACK_N`` or the scale's default; 0: all records).
    ``models``: bundled names, hub ids or local folders; ``device``/``dtype``/... go to ``load_model``.
    ``explain``: add the mechanism lab (:func:`assocmem.hijack.explain_report.explain_stored`, sized by
    ``scale``) for each model."""
    from .. import io
    from ..config import ConfigError
    from ..hijack.counterfact import load_counterfact
    from ..hijack.demo import EIFFEL_CONTEXT, EIFFEL_PROMPT, top_next_tokens
    from ..hijack.evaluate import metric_curve
    from ..hijack.explain_report import explain_stored
    from ..hijack.explain_report import families as explain_families
    from ..hijack.schemes import load_schemes
    from ..hijack.store import ScoreStore
    from ..llm.models import load_model

    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not allowed (allowed: {', '.join(SCALES)})")
    out = Path(out_dir)
    if n is None:
        n = int(os.environ.get("ASSOCMEM_HIJACK_N") or SCALES[scale].n)
    n_sel = int(n) or None                 # 0 = every record
    ks = list(ks or SCALES[scale].ks)
    models = list(models or MODELS)
    t_start = time.perf_counter()
    ds = load_counterfact()
    data_sha = io.sha256_file(ds.source)
    book = load_schemes()
    store = ScoreStore(out)
    log: dict = {"models": {}, "wall": {}, "skipped": {}, "entries": {}}
    results: dict[str, dict[str, pd.DataFrame]] = {}
    demos: dict[str, list[dict]] = {}
    explained: dict[str, dict] = {}
    unexplained: dict[str, str] = {}
    missing = [m for m in models if not _available(m)]
    for name in models:
        if name in missing:
            continue
        lm = load_model(name, device=device, dtype=dtype, device_map=device_map, revision=revision,
                        attn_implementation=attn_implementation, progress=False)
        log["models"][name] = lm.meta | {"params": lm.n_params}
        tables = _score_model(lm, store, ds, data_sha, book, ks, n_sel, force, log, chunk, batch_tokens)
        results[name] = {key: metric_curve(df, "es", seed=SEED) for key, df in tables.items()}
        demos[name] = [top_next_tokens(lm.model, lm.tokenizer, EIFFEL_PROMPT, c) for c in (None, EIFFEL_CONTEXT)]
        if explain:
            t0 = time.perf_counter()
            try:
                explained[name], entry, _ = explain_stored(lm, out, ds, book, scale, seed=SEED,
                                                           data_sha256=data_sha, force=force)
                log["entries"][f"{name} explain"] = entry.name
            except ConfigError as e:         # an architecture the hooks do not know: scores still stand
                unexplained[name] = str(e)
            log["wall"][f"{name} explain"] = round(time.perf_counter() - t0, 1)
        del lm

    figdir = out / "figures"
    families = []
    fig1 = findings.Family("Figure 1: top next tokens without and with a prepended sentence",
                         text=f"Prompt {EIFFEL_PROMPT!r}; context {EIFFEL_CONTEXT!r}.")
    if demos:
        plots.save(demo_figure(demos), figdir, "hijack-example")
        fig1.figures.append("figures/hijack-example.png")
    for name, res in demos.items():
        top0, top1 = res[0]["top"][0][0].strip(), res[1]["top"][0][0].strip()
        fig1.checks.append(findings.trend(f"{name}: top-1 without context is Paris", top0 == "Paris", top0, "Paris",
                                          source="paper"))
        fig1.checks.append(findings.trend(f"{name}: top-1 with context is Chicago", top1 == "Chicago", top1,
                                        "Chicago (GPT-2)", source="paper"))
    families.append(fig1)
    for group, curves in [("Generic prepends: 'Do not think of {target}.'", CURVES[:2]),
                          ("Relation sentences, false target (ES should rise)", CURVES[2:7]),
                          ("Relation sentences, true target (ES should fall)", CURVES[7:])]:
        fam = findings.Family(group)
        for c in curves:
            plots.save(curve_figure(c, results), figdir, c.figure)
            fam.figures.append(f"figures/{c.figure}.png")
        for name in results:
            fam.checks += [ch for ch in _checks(name, {c.key: results[name].get(c.key) for c in curves}, ks)
                           if any(c.figure in ch.name for c in curves)]
        families.append(fam)
    for name in missing:
        from ..llm.models import BUNDLED
        families[0].checks.append(findings.Check(f"{name}: not installed", None, "missing",
                                               note=BUNDLED[name].install))
    for name, t in explained.items():
        families += explain_families(t, figdir, name)
    if unexplained:
        families.append(findings.Family("Mechanism lab", checks=[
            findings.Check(f"{name}: mechanism lab", None, "missing", note=why) for name, why in unexplained.items()]))
    families.append(findings.Family("Appendix: one CounterFact example per relation", text=_example_table(ds.records)))
    rows = [{"model": m, "curve": k, **r} for m, res in results.items() for k, s in res.items()
            for r in s.to_dict("records")]
    if rows:
        io.atomic_write_parquet(pd.DataFrame(rows), out / "es_summary.parquet")
    section = findings.Section(
        "hijack", "Context hijacking of language models on CounterFact (Jiang et al. 2024, LLM part)",
        intro=(f"Efficacy score (ROME: mean per-token NLL of the false target below the true one) vs number of "
               f"prepends k, on {f'a seeded subsample of n={n}' if n_sel else 'all'} records per curve (relation "
               f"curves: records of that relation; relation ids are heuristic, see the data README) from "
               f"{ds.source} (SHA-256 {data_sha[:12]}...). Shaded: 95% bootstrap CI over records. Models: "
               f"{', '.join(models)}"
               + (" (the bundled stand-ins for the paper's GPT-2, Gemma-2B, LLaMA-7B)" if set(models) <= set(MODELS)
                  else "") + "; relation sentences are reconstructions. (record, k) pairs longer than a "
               "model's context are skipped and counted under 'skipped'."),
        families=families,
        meta=findings.run_meta(n=n_sel or "all", ks=f"{min(ks)}..{max(ks)}", seed=SEED, data=ds.source,
                             data_sha256=data_sha, store=str(store.dir), entries=log["entries"], schemes=book.source,
                             separator=repr(book.separator), models=log["models"], skipped=log["skipped"],
                             scoring_wall_s=log["wall"], total_wall_s=round(time.perf_counter() - t_start, 1)))
    return section
