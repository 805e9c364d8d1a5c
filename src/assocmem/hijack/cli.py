"""``assocmem hijack {score,demo,reproduce}``: context hijacking of causal LMs on CounterFact.

    assocmem hijack score --model smollm2-135m --scheme generic_false --k 0..5 --n 200 --json
    assocmem hijack demo --model smollm2-135m "The Eiffel Tower is in the city of" \
        --context "The Eiffel Tower is not in Chicago."
    assocmem hijack reproduce --n 100 --out reproduction/hijack
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from ..config import ConfigError


def parse_ks(text: str) -> list[int]:
    """"0..10" (inclusive range), "0,1,5" (list) or "3" (just k = 3)."""
    m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", text)
    try:
        ks = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(x) for x in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 0:
        raise ConfigError(f"k: {text!r} (allowed: a range like 0..10, a list like 0,1,5, or one integer >= 0)")
    return sorted(set(ks))


def _csv(text: str | None) -> list[str] | None:
    """Comma list to a list of stripped items; None for an empty value."""
    return [r.strip() for r in text.split(",") if r.strip()] if text else None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")[:60] or "x"


def _cmd_score(args: argparse.Namespace) -> int:
    import torch

    from ..llm.models import load_model
    from ..store import atomic_write_text
    from .counterfact import load_counterfact, select
    from .evaluate import score_records, summarize, tie_rate, write_parquet
    from .schemes import load_schemes

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = parse_ks(args.k)
    book = load_schemes(args.schemes_file)
    scheme = book.get(args.scheme)
    sep = book.separator if args.sep is None else args.sep
    ds = load_counterfact(args.data, skip_invalid=args.skip_invalid)
    rels = _csv(args.relation) or (sorted(scheme.relations) if scheme.relations else None)
    records = select(ds.records, rels, args.n, args.seed)
    lm = load_model(args.model, progress=not args.json)
    t0 = time.perf_counter()
    df, skipped = score_records(lm.model, lm.tokenizer, records, scheme, ks, book.countries, sep=sep,
                                paraphrase=args.paraphrase, method=args.method, progress=not args.json)
    wall = time.perf_counter() - t0
    if df.empty:
        raise ConfigError(f"scheme: {scheme.name} applies to none of the {len(records)} selected records "
                          f"(skipped: {skipped.counts})")
    es = summarize(df, "es", seed=args.seed)
    first = summarize(df, "es_first", seed=args.seed)
    ps = summarize(df, "ps", seed=args.seed) if args.paraphrase else None
    out = Path(args.out)
    stem = f"{_slug(args.model)}_{_slug(scheme.name)}_{_slug(args.relation or 'all')}_n{int(es.n[0])}_seed{args.seed}"
    write_parquet(df, out / f"{stem}.parquet")
    summary = {"model": args.model, "scheme": scheme.name, "k": [int(k) for k in es.k],
               "es": [round(float(v), 6) for v in es.value], "n": int(es.n[0]),
               "es_lo": [round(float(v), 6) for v in es.lo], "es_hi": [round(float(v), 6) for v in es.hi],
               "es_first": [round(float(v), 6) for v in first.value], "first_token_tie_rate": tie_rate(df),
               "ps": None if ps is None or ps.empty else [round(float(v), 6) for v in ps.value],
               "ps_n": None if ps is None or ps.empty else int(ps.n[0]),
               "skipped": skipped.counts, "invalid_records_skipped": len(ds.skipped), "data": ds.source,
               "relation": rels, "seed": args.seed, "separator": sep, "wall_s": round(wall, 2),
               "table": str(out / f"{stem}.parquet"), "model_meta": lm.meta}
    atomic_write_text(out / f"{stem}.json", json.dumps(summary, indent=1, default=str))
    if not args.json:
        print(f"{args.model} | {scheme.name} | n={summary['n']} records | data {ds.source}")
        print(f"{'k':>3} {'ES':>7} {'95% CI':>17} {'ES(first tok)':>14}" + ("   PS" if summary["ps"] else ""))
        for i, k in enumerate(summary["k"]):
            line = f"{k:>3} {es.value[i]:7.3f} [{es.lo[i]:6.3f}, {es.hi[i]:6.3f}] {first.value[i]:14.3f}"
            print(line + (f" {ps.value.iloc[i]:6.3f}" if summary["ps"] else ""))
        if skipped.total:
            print(f"skipped records: {skipped.counts}")
        print(f"scored in {wall:.1f} s; per-record table: {summary['table']}")
    else:
        print(json.dumps({k: summary[k] for k in ("model", "scheme", "k", "es", "n", "es_lo", "es_hi",
                                                  "es_first", "ps", "wall_s", "table")}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..llm.models import load_model
    from .demo import top_next_tokens

    lm = load_model(args.model, progress=not args.json)
    contexts = [None] + args.context
    res = [top_next_tokens(lm.model, lm.tokenizer, args.prompt, c, top=args.top, sep=args.sep) for c in contexts]
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "results": res}))
        return 0
    for r in res:
        print(f"\n{r['text']!r}")
        for tok, p in r["top"]:
            print(f"  {tok!r:>16}  {p:6.3f}  {'#' * int(round(40 * p))}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ..experiments.hijack import reproduce
    section = reproduce(Path(args.out), scale=args.scale, jobs=1, force=args.force, n=args.n,
                        models=_csv(args.models), ks=parse_ks(args.k) if args.k else None)
    print(f"hijack: {section.tally()} -> {Path(args.out) / 'report.html'}")
    return 0


def add_parser(subparsers) -> None:
    h = subparsers.add_parser("hijack", help="context hijacking of causal LMs on CounterFact")
    sub = h.add_subparsers(dest="hijack_command", required=True)

    s = sub.add_parser("score", help="efficacy score (ES) per number of prepends k, with bootstrap CIs")
    s.add_argument("--model", required=True, help="bundled name (smollm2-135m, gemma3-270m), local dir or hub id")
    s.add_argument("--scheme", default="generic_false",
                   help="scheme name from the schemes file, or a template like 'Do not think of {target_new}.'")
    s.add_argument("--k", default="0..10", help="prepend counts: 0..K, a list 0,1,5, or one value (default 0..10)")
    s.add_argument("--relation", help="only records with these relation ids (comma list), e.g. P190")
    s.add_argument("--n", type=int, default=200, help="records in the seeded subsample (default 200; 0 = all)")
    s.add_argument("--seed", type=int, default=0, help="subsample and bootstrap seed")
    s.add_argument("--data", help="CounterFact .json/.json.gz, or 'original' (default: shared rebuilt file)")
    s.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    s.add_argument("--schemes-file", help="JSON file with extra schemes/countries (bundled layout)")
    s.add_argument("--sep", help="separator after each prepended sentence (default from schemes file: ' ')")
    s.add_argument("--paraphrase", action="store_true", help="also score paraphrase prompts (PS)")
    s.add_argument("--method", choices=["fast", "plain"], default="fast", help="scorer (plain = reference loop)")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--out", default="assocmem-out/hijack", help="folder for the per-record parquet and summary")
    s.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    s.set_defaults(fn=lambda a: _cmd_score(_fix_n(a)))

    d = sub.add_parser("demo", help="top next tokens without and with a prepended context (paper Fig. 1)")
    d.add_argument("prompt")
    d.add_argument("--model", required=True)
    d.add_argument("--context", action="append", default=[], help="sentence to prepend (repeatable)")
    d.add_argument("--top", type=int, default=5)
    d.add_argument("--sep", default=" ")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    r = sub.add_parser("reproduce", help="the paper's ES-vs-prepends figures for the bundled models")
    r.add_argument("--n", type=int, help="records per curve (default: sized for ~20 min on 2 cores)")
    r.add_argument("--models", help="comma list (default: smollm2-135m,gemma3-270m)")
    r.add_argument("--k", help="prepend counts (default 0..10)")
    r.add_argument("--scale", choices=["quick", "paper"], default="quick")
    r.add_argument("--out", default="reproduction/hijack")
    r.add_argument("--force", action="store_true", help="rescore even cached curves")
    r.set_defaults(fn=_cmd_reproduce)

    from . import explain_cli, leaderboard
    leaderboard.add_parser(sub)
    explain_cli.add_parser(sub)


def _fix_n(args: argparse.Namespace) -> argparse.Namespace:
    if args.n is not None and args.n < 0:
        raise ConfigError(f"n: {args.n} (allowed: 0 for all records, or a positive number)")
    args.n = args.n or None
    return args
