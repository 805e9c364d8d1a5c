"""``assocmem hijack explain``: where and why a real model is hijacked (mechanism lab).

    assocmem hijack explain --model smollm2-135m --scheme generic_false --n 200 --k 0..5 --out explain/smollm2

Writes ``DIR/tables/*.parquet`` (one tidy table per analysis), ``DIR/figures/*.png|pdf``,
``DIR/summary.json`` and ``DIR/report.{md,html}``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from ..config import ConfigError


def add_parser(sub) -> None:
    """Register ``hijack explain`` on the ``hijack`` sub-parsers."""
    p = sub.add_parser("explain", help="mechanism lab: logit lens, attention to the cue, DLA, patching, ablation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local directory or hub id")
    p.add_argument("--scheme", default="generic_false", help="scheme name or template string")
    p.add_argument("--schemes-file", default=None)
    p.add_argument("--data", default=None, help="CounterFact file (default: the shared copy)")
    p.add_argument("--relation", default=None, help="comma list of relation ids")
    p.add_argument("--n", type=int, default=200, help="records (split into selection and evaluation)")
    p.add_argument("--k", default="0..5", help="k values: 0..K, a list 0,1,5, or one K")
    p.add_argument("--select-frac", type=float, default=0.5, help="fraction of records that select components")
    p.add_argument("--n-patch", type=int, default=48, help="selection records used for patching (0: all)")
    p.add_argument("--ablate", default="1,2,4,8", help="numbers h of top heads to mean-ablate")
    p.add_argument("--neutral", default="default", help="neutral text for the clean cost (default: tiny-Shakespeare)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: the loader's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="explain", help="output folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(fn=_cmd_explain)


def _load(args):
    from ..llm.models import load_model
    params = inspect.signature(load_model).parameters
    kw = {"device": args.device} if "device" in params else {}
    if args.dtype and "dtype" in params:
        kw["dtype"] = args.dtype
    elif args.dtype:
        raise ConfigError(f"dtype: {args.dtype!r} (this loader supports only its default)")
    return load_model(args.model, progress=not args.json, **kw)


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from .. import findings
    from ..report import write_report
    from ..io import atomic_write_json, atomic_write_parquet
    from . import explain_report
    from .cli import parse_ks
    from .counterfact import load_counterfact, select
    from .schemes import load_schemes

    if not 0 < args.select_frac < 1:
        raise ConfigError(f"select-frac: {args.select_frac} (allowed: a number strictly between 0 and 1)")
    if args.n < 4:
        raise ConfigError(f"n: {args.n} (allowed: at least 4 records, to split into selection and evaluation)")
    try:
        hs = sorted({int(x) for x in args.ablate.split(",") if x.strip()})
    except ValueError:
        hs = []
    if not hs or min(hs) < 1:
        raise ConfigError(f"ablate: {args.ablate!r} (allowed: a comma list of positive integers, e.g. 1,2,4,8)")
    ks = parse_ks(args.k)
    ks = ks if len(ks) > 1 else list(range(ks[0] + 1))
    if max(ks) < 1:
        raise ConfigError(f"k: {args.k!r} (allowed: a largest k of at least 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    book = load_schemes(args.schemes_file)
    scheme = book.get(args.scheme)
    ds = load_counterfact(args.data)
    rels = [r.strip() for r in args.relation.split(",")] if args.relation else (
        sorted(scheme.relations) if scheme.relations else None)
    records = select(ds.records, rels, args.n, args.seed)
    lm = _load(args)
    t0 = time.perf_counter()
    t = explain_report.analyse(lm.model, lm.tokenizer, records, scheme, book.countries, ks, book.separator,
                  select_frac=args.select_frac, n_patch=args.n_patch or None, hs=hs,
                  neutral_path=None if args.neutral == "none" else args.neutral, seed=args.seed,
                  progress=not args.json)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    for key in explain_report.TABLES:
        atomic_write_parquet(t[key], out / "tables" / f"{key}.parquet")
    s = explain_report.summary(t)
    s.update(model=args.model, scheme=scheme.name, n_records=len(records), ks=ks, seed=args.seed,
             data=ds.source, wall_s=round(wall, 1), model_meta=lm.meta)
    atomic_write_json(out / "summary.json", s, default=str)
    fams = explain_report.families(t, out / "figures", args.model)
    section = findings.Section("hijack_explain", f"Why {args.model} is hijacked: the mechanism lab",
                             intro=f"Scheme {scheme.name}, {len(records)} records, k = {ks}, seed {args.seed}.",
                             families=fams, meta=findings.run_meta(model=args.model, wall_s=round(wall, 1)))
    write_report(section, out)
    if args.json:
        print(json.dumps(s, default=str))
    else:
        print(f"{args.model} | {scheme.name} | {len(records)} records | {wall:.1f} s")
        for key in ("margin_by_k", "top_cue_heads", "top_dla", "top_patch_to_clean", "ablation", "ov_median_ranks",
                    "concept", "timing"):
            print(f"{key}: {s[key]}")
        print(f"report: {out / 'report.md'}")
    return 0
