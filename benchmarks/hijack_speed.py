"""Speed of the hijack scorer: the fast trie-batched scorer vs the plain one-sequence-at-a-time loop on
the same CounterFact records (default: bundled SmolLM2-135M, generic_false, k = 0..10).

    .venv/bin/python benchmarks/hijack_speed.py [--model smollm2-135m] [--n 20] [--k 0..10] [--threads 2]

Prints records/s (a record = all its k and both targets), the speed-up, the largest log-probability
difference between the two, and FLOP/s against the 2 * params * tokens rule:
``achieved`` counts the tokens each method actually runs (trie nodes incl. padding for the fast one),
``effective`` credits the fast scorer with the plain loop's tokens. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="generic_false")
    ap.add_argument("--n", type=int, default=20, help="records")
    ap.add_argument("--k", default="0..10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--data", help="CounterFact file (default: shared rebuilt file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from assocmem.hijack.cli import parse_ks
    from assocmem.hijack.counterfact import load_counterfact, select
    from assocmem.hijack.evaluate import build_requests
    from assocmem.hijack.schemes import load_schemes
    from assocmem.llm.models import load_model
    from assocmem.llm.scoring import FastScorer, _encode_many, max_abs_diff, plain_score

    ks = parse_ks(args.k)
    book = load_schemes()
    records = select(load_counterfact(args.data).records, None, args.n, args.seed)
    reqs, _, _ = build_requests(records, book.get(args.scheme), ks, book.countries, book.separator)
    lm = load_model(args.model, progress=False)
    params = lm.n_params
    enc = _encode_many(lm.tokenizer, [(r.context, t) for r in reqs for t in r.targets])
    plain_tokens = sum(len(c) + len(t) for c, t, _ in enc)

    scorer = FastScorer(lm.model, lm.tokenizer)
    scorer.score(reqs[: len(ks)])                               # warm-up (one record)
    scorer.stats = {"nodes": 0, "padded": 0, "forwards": 0}
    t0 = time.perf_counter()
    fast = scorer.score(reqs)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_score(lm.model, lm.tokenizer, reqs, progress=True)
    t_plain = time.perf_counter() - t0

    res = {
        "model": args.model, "params": params, "records": len(records), "k": f"{min(ks)}..{max(ks)}",
        "sequences": 2 * len(reqs), "threads": args.threads, "machine": platform.machine(),
        "plain_s": round(t_plain, 2), "fast_s": round(t_fast, 2),
        "plain_records_per_s": round(len(records) / t_plain, 3),
        "fast_records_per_s": round(len(records) / t_fast, 3),
        "speedup": round(t_plain / t_fast, 2),
        "max_abs_logprob_diff": max_abs_diff(plain, fast),
        "plain_tokens": plain_tokens, "fast_nodes": scorer.stats["nodes"], "fast_padded": scorer.stats["padded"],
        "plain_gflops_achieved": round(2 * params * plain_tokens / t_plain / 1e9, 2),
        "fast_gflops_achieved": round(2 * params * scorer.stats["padded"] / t_fast / 1e9, 2),
        "fast_gflops_effective": round(2 * params * plain_tokens / t_fast / 1e9, 2),
    }
    print(f"{args.model} ({params / 1e6:.1f}M params), {len(records)} records x k={res['k']} x 2 targets, "
          f"{args.threads} threads")
    print(f"  plain loop : {t_plain:8.1f} s  {res['plain_records_per_s']:7.3f} records/s  "
          f"{plain_tokens} tokens  {res['plain_gflops_achieved']} GFLOP/s")
    print(f"  fast scorer: {t_fast:8.1f} s  {res['fast_records_per_s']:7.3f} records/s  "
          f"{scorer.stats['nodes']} trie nodes ({scorer.stats['padded']} padded)  "
          f"{res['fast_gflops_achieved']} GFLOP/s achieved, {res['fast_gflops_effective']} effective")
    print(f"  speed-up {res['speedup']}x, max |log-prob difference| {res['max_abs_logprob_diff']:.2e}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
