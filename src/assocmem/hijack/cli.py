"""``assocmem hijack {score,demo,reproduce}``: context hijacking of causal LMs on CounterFact.

    assocmem hijack score --model smollm2-135m --scheme generic_false --k 0..5 --n 200 --json
    assocmem hijack demo --model smollm2-135m "The Eiffel Tower is in the city of" \
        --context "The Eiffel Tower is not in Chicago."
    assocmem hijack reproduce --n 100 --out reproduction/hijack
    assocmem hijack reproduce --models gpt2,google/gemma-2b --device cuda --dtype bfloat16 --n 0

Scores go to a results store (:mod:`assocmem.hijack.store`) keyed by everything that determines them;
runs resume after a kill or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from ..config import ConfigError


MAX_KS = 10_000


def parse_ks(text: str) -> list[int]:
    """"0..10" (inclusive range), "0,1,5" (list) or "3" (just k = 3); at most :data:`MAX_KS` values."""
    m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", text)
    allowed = f"(allowed: a range like 0..10, a list like 0,1,5, or one integer >= 0; at most {MAX_KS} values)"
    if m and int(m.group(2)) - int(m.group(1)) + 1 > MAX_KS:
        raise ConfigError(f"k: {text!r} has {int(m.group(2)) - int(m.group(1)) + 1} values {allowed}")
    if not m and text.count(",") >= MAX_KS:
        raise ConfigError(f"k: {text[:40]!r}... has {text.count(',') + 1} values {allowed}")
    try:
        ks = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(x) for x in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 0:
        raise ConfigError(f"k: {text!r} {allowed}")
    return sorted(set(ks))


def _csv(text: str | None) -> list[str] | None:
    """Comma list to a list of stripped items; None for an empty value."""
    return [r.strip() for r in text.split(",") if r.strip()] if text else None


def _positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < minimum:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: {v} (allowed: an integer >= {minimum})")


def _model_kwargs(args: argparse.Namespace) -> dict:
    """load_model options from the command line (device, dtype, device map, revision, attention)."""
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map, "revision": args.revision,
            "attn_implementation": args.attn_implementation}


def _scheme(book, name: str):
    """A named scheme, or a custom template named ``custom-<hash of the template>``."""
    from ..io import content_hash
    from .schemes import custom_scheme
    return custom_scheme(name, name=f"custom-{content_hash(name, 8)}") if "{" in name else book.get(name)


def _rounded(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def _cmd_score(args: argparse.Namespace) -> int:
    _positive(args, "threads", "chunk", "batch_tokens")
    _positive(args, "seed", minimum=0)
    ks = parse_ks(args.k)
    from .. import io
    from .counterfact import load_counterfact, select
    from .evaluate import metric_curve, tie_rate
    from .schemes import load_schemes
    from .store import ScoreStore, score_to_store

    book = load_schemes(args.schemes_file)
    scheme = _scheme(book, args.scheme)
    sep = book.separator if args.sep is None else args.sep
    ds = load_counterfact(args.data, skip_invalid=args.skip_invalid)
    rels = _csv(args.relation) or (sorted(scheme.relations) if scheme.relations else None)
    records = select(ds.records, rels, args.n, args.seed)

    import torch

    from ..llm.models import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, progress=not args.json, **_model_kwargs(args))
    store = ScoreStore(args.out)
    t0 = time.perf_counter()
    entry, scored = score_to_store(store, lm, records, scheme, ks, book.countries, data=ds.source, separator=sep,
                                   seed=args.seed, paraphrase=args.paraphrase, neighborhood=args.neighborhood,
                                   method=args.method, skip_too_long=args.skip_too_long,
                                   batch_tokens=args.batch_tokens, chunk=args.chunk or 25, relation=rels,
                                   progress=not args.json, force=args.force)
    wall = time.perf_counter() - t0
    df, done = entry.table(), entry.done
    if df.empty:
        raise ConfigError(f"scheme: {scheme.name} gave no prompts to score for the {len(records)} selected records "
                          f"(skipped: {done['skipped']}; too-long record-k pairs: {done['too_long']}) [{entry.path}]")
    es = metric_curve(df, "es", seed=args.seed)
    first = metric_curve(df, "es_first", seed=args.seed)
    ps = metric_curve(df, "ps", seed=args.seed) if args.paraphrase else None
    ns = metric_curve(df, "ns", seed=args.seed) if args.neighborhood else None
    summary = entry.summary()
    if summary is None or scored:
        summary = {"id": entry.id, "entry": str(entry.path), "model": args.model, "scheme": scheme.name,
                   "template": entry.spec["template"], "k": [int(k) for k in es.k], "es": _rounded(es.value),
                   "n": int(es.n[0]), "es_lo": _rounded(es.lo), "es_hi": _rounded(es.hi),
                   "es_first": _rounded(first.value), "first_token_tie_rate": tie_rate(df),
                   "ps": None if ps is None or ps.empty else _rounded(ps.value),
                   "ps_n": None if ps is None or ps.empty else int(ps.n[0]),
                   "ns": None if ns is None or ns.empty else _rounded(ns.value),
                   "ns_n": None if ns is None or ns.empty else int(ns.n[0]),
                   "skipped": done["skipped"], "too_long_pairs": done["too_long"],
                   "invalid_records_skipped": len(ds.skipped), "records": len(records), "data": ds.source,
                   "relation": rels, "seed": args.seed, "separator": sep, "wall_s": round(wall, 2),
                   "table": str(entry.path / "table.parquet"), "model_meta": lm.meta,
                   "batch_tokens": args.batch_tokens}
        io.atomic_write_json(entry.path / "summary.json", summary, default=str)
    summary = {**summary, "wall_s": round(wall, 2), "cached": not scored}
    if not args.json:
        print(f"{args.model} | {scheme.name} | n={summary['n']} records | data {ds.source}")
        extra = ("   PS" if summary["ps"] else "") + ("   NS" if summary["ns"] else "")
        print(f"{'k':>3} {'ES':>7} {'95% CI':>17} {'ES(first tok)':>14}" + extra)
        psv = dict(zip(ps.k, ps.value)) if summary["ps"] else {}
        nsv = dict(zip(ns.k, ns.value)) if summary["ns"] else {}
        for i, k in enumerate(summary["k"]):
            line = f"{k:>3} {es.value[i]:7.3f} [{es.lo[i]:6.3f}, {es.hi[i]:6.3f}] {first.value[i]:14.3f}"
            line += f" {psv.get(k, float('nan')):6.3f}" if psv else ""
            print(line + (f" {nsv.get(k, float('nan')):6.3f}" if nsv else ""))
        if done["skipped"]:
            print(f"skipped records: {done['skipped']}")
        if done["too_long"]:
            print(f"skipped record-k pairs longer than the model's context: {done['too_long']}")
        print(("reused stored scores" if not scored else f"scored in {wall:.1f} s")
              + f"; per-record table: {summary['table']}")
        print(f"store entry: {entry.path}")
    else:
        print(json.dumps({k: summary[k] for k in ("model", "scheme", "k", "es", "n", "es_lo", "es_hi", "es_first",
                                                  "ps", "ns", "too_long_pairs", "wall_s", "cached", "table",
                                                  "id", "entry")}, default=str))
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


def selection_options(p: argparse.ArgumentParser, n: int, k: str) -> None:
    """--scheme --n --k --seed --data: the records and prompts a script scores (benchmarks, checks)."""
    p.add_argument("--scheme", default="generic_false")
    p.add_argument("--n", type=int, default=n, help="records (seeded subsample)")
    p.add_argument("--k", default=k)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="CounterFact file (default: the shared rebuilt file)")


def selected(args: argparse.Namespace):
    """(ks, schemes book, scheme, records) for :func:`selection_options`'s arguments."""
    from .counterfact import load_counterfact, select
    from .schemes import load_schemes
    book = load_schemes()
    return parse_ks(args.k), book, book.get(args.scheme), select(load_counterfact(args.data).records, None,
                                                                 args.n, args.seed)


def reproduce_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`assocmem.experiments.hijack.reproduce` from the options that
    :func:`reproduce_options` added (checked; ``torch`` threads set when asked)."""
    _positive(args, "threads", "chunk", "batch_tokens")
    _positive(args, "n", minimum=0)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return {"n": args.n, "models": _csv(args.models), "ks": parse_ks(args.k) if args.k else None,
            "chunk": args.chunk, "batch_tokens": args.batch_tokens, **_model_kwargs(args)}


def reproduce_options(p: argparse.ArgumentParser) -> None:
    """Options of the hijack reproduction, shared by ``assocmem reproduce`` and ``assocmem hijack reproduce``."""
    p.add_argument("--n", type=int, help="hijack: CounterFact records per curve (default per scale; 0 = all)")
    p.add_argument("--models", help="hijack: comma list of bundled names, hub ids or local folders "
                                    "(default: smollm2-135m,gemma3-270m)")
    p.add_argument("--k", help="hijack: prepend counts (default 0..10)")
    _model_options(p)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    kwargs = reproduce_kwargs(args)
    from ..experiments.hijack import reproduce
    from ..report import write_report
    section = reproduce(Path(args.out), scale=args.scale, force=args.force, **kwargs)
    write_report(section, Path(args.out))
    print(f"hijack: {section.tally()} -> {Path(args.out) / 'report.html'}")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (fp32 on CPU, the checkpoint's dtype on GPU), float32, bfloat16 or float16")
    p.add_argument("--device-map", help="'auto': spread a model too large for one GPU over the devices")
    p.add_argument("--revision", help="hub model revision (branch, tag or commit)")
    p.add_argument("--attn-implementation", help="eager, sdpa, ... (default: transformers' choice)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per forward pass of the fast scorer (default: from free memory)")
    p.add_argument("--chunk", type=int, help="records per committed chunk of the results store (default 25)")
    p.add_argument("--threads", type=int, help="torch CPU threads")


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
    s.add_argument("--neighborhood", action="store_true", help="also score neighbourhood prompts (NS)")
    s.add_argument("--method", choices=["fast", "plain"], default="fast", help="scorer (plain = reference loop)")
    s.add_argument("--skip-too-long", action="store_true",
                   help="skip and count (record, k) pairs longer than the model's context instead of failing")
    _model_options(s)
    s.add_argument("--out", default="assocmem-out/hijack",
                   help="results store folder (entries under OUT/scores/<id>/; default assocmem-out/hijack)")
    s.add_argument("--force", action="store_true", help="score again even if the store holds these scores")
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

    r = sub.add_parser("reproduce", help="the paper's ES-vs-prepends figures (bundled models or any others)")
    reproduce_options(r)
    r.add_argument("--scale", choices=["quick", "paper"], default="quick")
    r.add_argument("--out", default="reproduction/hijack")
    r.add_argument("--force", action="store_true", help="rescore even stored curves")
    r.set_defaults(fn=_cmd_reproduce)

    from . import explain_cli, leaderboard
    leaderboard.add_parser(sub)
    explain_cli.add_parser(sub)


def _fix_n(args: argparse.Namespace) -> argparse.Namespace:
    if args.n is not None and args.n < 0:
        raise ConfigError(f"n: {args.n} (allowed: 0 for all records, or a positive number)")
    args.n = args.n or None
    return args
