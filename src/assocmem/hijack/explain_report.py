"""The mechanism lab end to end: :func:`analyse` runs every analysis of :mod:`explain` and
:mod:`explain_patch` on one model and scheme and returns tidy tables; :func:`families` turns them into
report families; :func:`explain_stored` is the stored, scale-sized version used by ``reproduce hijack``."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import findings
from ..experiments.scale import REQUIRED, make_scales
from . import explain
from . import explain_patch

NEUTRAL_RELPATH = Path("shared") / "data" / "tinyshakespeare" / "input.txt"


def default_neutral_path() -> str | None:
    """tiny-Shakespeare from ``$ASSOCMEM_SHARED_DATA`` or ../shared/data (None if absent)."""
    shared = os.environ.get("ASSOCMEM_SHARED_DATA")
    cands = [Path(shared) / "tinyshakespeare" / "input.txt"] if shared else []
    cands += [Path.cwd().parent / NEUTRAL_RELPATH] + [p.parent / NEUTRAL_RELPATH for p in Path(__file__).resolve().parents]
    return next((str(c) for c in cands if c.exists()), None)


def analyse(model, tok, records, scheme, countries, ks: Sequence[int], sep: str = " ", select_frac: float = 0.5,
            n_patch: int | None = 48, hs: Sequence[int] = (1, 2, 4, 8), n_ov: int = 4,
            neutral_path: str | None = "default", seed: int = 0, progress: bool = False) -> dict:
    """All analyses; returns {name: DataFrame} plus "timing" (seconds per step) and "notes" (list[str]).

    Records keep their given (seeded) order; the first ``select_frac`` of them choose the patching
    ranking and the ablation means, the rest evaluate the ablation, OV reading and concept control."""
    ks = sorted(set(int(k) for k in ks) | {0})
    K = ks[-1]
    timing, notes, t = {}, [], time.perf_counter()

    def tick(name):
        nonlocal t
        now = time.perf_counter()
        timing[name] = round(now - t, 2)
        t = now

    lab = explain.Lab(model, tok)
    prompts, skipped = explain.build_prompts(tok, records, scheme, countries, ks, sep)
    if skipped:
        notes.append("records skipped: " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    traces = explain.run_traces(lab, prompts, progress=progress)
    tick("traces")
    by = {(tr.prompt.case_id, tr.prompt.k): tr for tr in traces}
    sel, ev = explain.split([p.case_id for p in prompts], select_frac)
    rec_by = {r.case_id: r for r in records}
    out = {"margins": explain.margins_table(traces).assign(split=lambda d: np.where(d.case_id.isin(sel), "select",
                                                                                      "eval")),
           "logit_lens": explain.logit_lens(traces)}
    cue = explain.cue_attention(traces)
    out["cue_attention"] = explain.cue_correlation(cue) if len(cue) else cue
    out["dla"] = explain.dla(traces, ks=(0, K))
    out["dla_rank"] = explain.dla_ranking(out["dla"])
    tick("lens_cue_dla")
    patch_ids = sel[:n_patch] if n_patch else sel
    out["patching"] = explain_patch.patching(lab, by, patch_ids, K, progress=progress)
    out["patch_rank"] = explain_patch.patch_ranking(out["patching"])
    tick("patching")
    ranked = explain_patch.top_heads(out["patch_rank"], max(hs))
    means = explain_patch.head_means([by[(c, 0)] for c in sel])
    npath = default_neutral_path() if neutral_path == "default" else neutral_path
    neutral = explain_patch.neutral_ids(tok, npath)
    if neutral is None:
        notes.append(f"neutral text not found ({npath or 'tiny-Shakespeare'}): clean cost shown as ES at k=0 only")
    ev_recs = [rec_by[c] for c in ev]
    out["ablation"] = explain_patch.ablation(lab, ev_recs, scheme, countries, ks, sep, ranked, means, (0, *hs), neutral)
    tick("ablation")
    out["ov"] = explain_patch.ov_copying(lab, ranked[:n_ov], ev_recs, records)
    tick("ov")
    out["concept"] = explain_patch.concept_control(lab, ev_recs, records, K, sep, seed)
    tick("concept")
    out["timing"], out["notes"] = timing, notes
    out["splits"] = {"select": len(sel), "eval": len(ev), "patched": len(patch_ids)}
    return out


def summary(t: dict) -> dict:
    """The headline numbers of one :func:`analyse` result (JSON-friendly)."""
    m = t["margins"].groupby("k")["margin"].mean()
    lens = t["logit_lens"]
    K = int(lens["k"].max())
    lastL = int(lens["layer"].max())
    ll = lens.groupby(["k", "layer"])["margin"].mean().unstack("k")
    shift = (ll[K] - ll[0])
    cue = t["cue_attention"]
    cueK = cue[cue["k"] == K].sort_values("mass", ascending=False).head(5) if len(cue) else cue
    pr = t["patch_rank"]
    heads = lambda d: [f"L{a}H{b}:{f:.3f}" for a, b, f in zip(d["layer"], d["head"], d["frac"])]  # noqa: E731
    ab = t["ablation"]
    abK = ab[ab["k"] == K].set_index("h")
    ab0 = ab[ab["k"] == 0].set_index("h")
    ov = (t["ov"].groupby(["layer", "head"])[["rank_self", "rank_relation"]].median().reset_index() if len(t["ov"])
          else pd.DataFrame(columns=["layer", "head", "rank_self", "rank_relation"]))
    cc = t["concept"]
    return {
        "margin_by_k": {int(k): round(float(v), 3) for k, v in m.items()},
        "lens_first_layer_half_shift": int(np.argmax(shift.to_numpy() >= 0.5 * shift.iloc[-1]))
        if shift.iloc[-1] > 0 else None,
        "lens_shift_by_layer": [round(float(v), 3) for v in shift],
        "lens_final_layer": lastL,
        "top_cue_heads": [f"L{a}H{b}:{ms:.3f} (r={r:.2f})" for a, b, ms, r in
                          zip(cueK["layer"], cueK["head"], cueK["mass"], cueK["corr"])],
        "top_dla": [f"{c}{'' if l < 0 else l}{'' if h < 0 else 'H' + str(h)}:{s:+.3f}" for c, l, h, s in
                    zip(*[t["dla_rank"][x].head(8) for x in ("component", "layer", "head", "shift")])],
        "top_patch_to_clean": heads(pr[(pr.direction == "to_clean") & (pr.component == "head")].head(8)),
        "top_patch_to_hijacked": heads(pr[(pr.direction == "to_hijacked") & (pr.component == "head")].head(8)),
        "resid_patch_to_clean": [round(float(f), 3) for f in
                                 pr[(pr.direction == "to_clean") & (pr.component == "resid")]
                                 .sort_values("layer")["frac"]],
        "ablation": {int(h): {"es_k0": round(float(ab0.loc[h, "es"]), 3), f"es_k{K}": round(float(r["es"]), 3),
                              "neutral_loss": round(float(r["neutral_loss"]), 4)} for h, r in abK.iterrows()},
        "ov_median_ranks": {f"L{a}H{b}": [float(x), float(y)] for a, b, x, y in
                            zip(ov["layer"], ov["head"], ov["rank_self"], ov["rank_relation"])},
        "concept": {c: round(float(cc[c].mean()), 3) for c in ("d_other", "d_new", "d_true")} if len(cc) else {},
        "concept_n": len(cc), "splits": t["splits"], "timing": t["timing"], "notes": t["notes"],
    }


LENS_TOL = 1e-3   # nats; the lens reads the same final norm and unembedding as the model (fp32: ~1e-6)
TABLES = ("margins", "logit_lens", "cue_attention", "dla", "dla_rank", "patching", "patch_rank", "ablation",
          "ov", "concept")


def families(t: dict, fig_dir: str | Path, model: str, rel: str = "figures") -> list[findings.Family]:
    """Report families (figures saved under ``fig_dir``, referenced as ``rel/<name>.png``)."""
    from ..plots import save
    from . import explain_plots
    s = summary(t)
    slug = model.replace("/", "-")
    K = max(s["margin_by_k"])
    figs = {"lens": explain_plots.plot_logit_lens(t["logit_lens"], f"{model}: logit lens"),
            "cue": explain_plots.plot_cue_attention(t["cue_attention"], K, f"{model}: attention to the cue"),
            "dla": explain_plots.plot_dla(t["dla_rank"], title=f"{model}: DLA (k=0 vs k={K})"),
            "patch": explain_plots.plot_patching(t["patch_rank"], title=f"{model}: activation patching"),
            "ablation": explain_plots.plot_ablation(t["ablation"], f"{model}: ablation as a defence"),
            }
    if len(t["ov"]):
        figs["ov"] = explain_plots.plot_ov(t["ov"], f"{model}: OV circuit of top heads")
    if len(t["concept"]):
        figs["concept"] = explain_plots.plot_concept(t["concept"], f"{model}: concept-level control")
    paths = {}
    for name, fig in figs.items():
        save(fig, fig_dir, f"explain_{slug}_{name}")
        paths[name] = f"{rel}/explain_{slug}_{name}.png"
    m = s["margin_by_k"]
    lens = t["logit_lens"]
    last = lens[lens["layer"] == lens["layer"].max()].merge(t["margins"], on=["case_id", "k"])
    lens_gap = float((last["margin_x"] - last["margin_y"]).abs().max())
    ab = s["ablation"]
    hmax = max(ab)
    checks = [
        findings.trend(f"{model}: hijack raises the margin (k=0 -> {K})", m[K] > m[0], f"{m[0]:+.2f} -> {m[K]:+.2f}"),
        findings.trend(f"{model}: final-layer lens equals the model's margin", lens_gap < LENS_TOL,
                     f"max |diff| {lens_gap:.1e}", note=f"tolerance {LENS_TOL:g} nats"),
        findings.Check(f"{model}: top cue-attention heads (k={K})", "; ".join(s["top_cue_heads"][:3]), "trend only"),
        findings.Check(f"{model}: top DLA shifts", "; ".join(s["top_dla"][:3]), "trend only"),
        findings.Check(f"{model}: top patching heads (to_clean)", "; ".join(s["top_patch_to_clean"][:3]),
                     "trend only"),
        findings.trend(f"{model}: ablating top-{hmax} heads lowers ES at k={K}",
                     ab[hmax][f"es_k{K}"] < ab[0][f"es_k{K}"],
                     f"{ab[0][f'es_k{K}']:.3f} -> {ab[hmax][f'es_k{K}']:.3f}",
                     note=f"neutral loss {ab[0]['neutral_loss']:.3f} -> {ab[hmax]['neutral_loss']:.3f}"),
    ]
    if s["concept"]:
        c = s["concept"]
        checks.append(findings.Check(f"{model}: concept control Δlog p (named, unnamed same-relation, true)",
                                   f"{c['d_other']:+.3f}, {c['d_new']:+.3f}, {c['d_true']:+.3f}", "trend only"))
    text = (f"Scheme margin (first-token log p(new) - log p(true)) by k: {m}. Splits: {s['splits']}. "
            f"Timing (s): {s['timing']}. " + " ".join(s["notes"]))
    return [findings.Family(f"Mechanism lab: {model}", list(paths.values()), checks, text)]


EXPLAIN_VERSION = "1"     # bump when an analysis changes what it computes
SCALES = make_scales({"n": REQUIRED, "ks": REQUIRED, "n_patch": REQUIRED, "hs": REQUIRED},
                     quick={"n": 40, "ks": (0, 1, 2, 3), "n_patch": 12, "hs": (1, 2, 4)},
                     paper={"n": 200, "ks": (0, 1, 2, 3, 4, 5), "n_patch": 48, "hs": (1, 2, 4, 8)})


def explain_stored(lm, out_dir: str | Path, ds, book, scale: str = "quick", scheme: str = "generic_false",
                   seed: int = 0, data_sha256: str | None = None, force: bool = False) -> tuple[dict, Path, bool]:
    """:func:`analyse` for ``reproduce hijack``, stored under ``out_dir/explain/<id>/`` where ``<id>`` is a
    content hash of the model identity, data SHA-256, scheme, scale settings, seed and
    :data:`EXPLAIN_VERSION`; a finished entry is read back instead of recomputed (unless ``force``).
    ``ds``: a loaded CounterFact (:func:`load_counterfact`), ``book``: the schemes (:func:`load_schemes`).

    Returns (tables as from :func:`analyse`, entry folder, computed now)."""
    from .. import io
    from ..llm.models import model_identity
    from .counterfact import select
    cfg = SCALES[scale]
    sch = book.get(scheme)
    neutral = default_neutral_path()
    spec = {**model_identity(lm), "data_sha256": data_sha256 or io.sha256_file(ds.source), "scheme": sch.name,
            "template": sch.template, "separator": book.separator, **cfg.as_dict(), "seed": seed,
            "neutral_sha256": neutral and io.sha256_file(neutral), "version": EXPLAIN_VERSION}
    root = Path(out_dir) / "explain"
    entry = root / f"{lm.name.replace('/', '-')}-{io.content_hash(spec)}"
    io.clean_leftovers(root)
    if (entry / "done.json").exists() and not force:
        done = json.loads((entry / "done.json").read_text())
        t = {key: pd.read_parquet(entry / f"{key}.parquet") for key in TABLES}
        return {**t, **{k: done[k] for k in ("timing", "notes", "splits")}}, entry, False
    recs = select(ds.records, sorted(sch.relations) if sch.relations else None, cfg.n, seed)
    t = analyse(lm.model, lm.tokenizer, recs, sch, book.countries, cfg.ks, book.separator,
                n_patch=cfg.n_patch, hs=cfg.hs, neutral_path=neutral, seed=seed)
    with io.building_dir(root, entry.name) as tmp:
        for key in TABLES:
            io.atomic_write_parquet(t[key], tmp / f"{key}.parquet")
        io.atomic_write_json(tmp / "done.json", {"spec": spec, "data": ds.source, "model_meta": lm.meta,
                                                 **{k: t[k] for k in ("timing", "notes", "splits")}}, default=str)
        io.publish_dir(tmp, entry, replace=True)
    return t, entry, True
