"""How many tokens the fast scorer runs for the paper's figure set, and what that costs on a GPU
(an ESTIMATE from measured token counts, not a GPU measurement).

    nice -n 5 .venv/bin/python benchmarks/hijack_tokens.py [--sample 300] [--k 0..10] [--mfu 0.3] [--peak-tflops 989]

For each of the 12 curves of ``assocmem reproduce hijack`` (generic_false/true over all records,
relation_false/true for P103, P131, P190, P641, P1412 over their records) it builds the fast scorer's
tries (no model needed) for a seeded sample of records with each bundled tokenizer as a proxy
(SmolLM2's byte-level BPE for GPT-2 and LLaMA-2, gemma-3's SentencePiece for Gemma-2B) and measures
per record: trie nodes, the tokens after packing rows (what a forward runs), the plain loop's tokens,
the padded baseline's tokens, and the host CPU time (process time, so a busy machine inflates it
less than wall time) to tokenise and build the tries and the ancestor masks. Then, per
paper model: total tokens run x 2 x params / (MFU x peak) = GPU time, and memory = weights (2 bytes a
parameter in bf16) + the largest forward's activations under the scorer's cost model
(:mod:`assocmem.llm.budget`; a batch of ``max_rows`` typical packed rows). Last line JSON.
"""
from __future__ import annotations

import argparse
import json
import time
import types

PAPER = {  # name: (params, proxy tokenizer, config sizes for the cost model)
    "gpt2": (124_439_808, "smollm2-135m",
             dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, vocab_size=50257)),
    "google/gemma-2b": (2_506_172_416, "gemma3-270m",
                        dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, vocab_size=256000)),
    "google/gemma-2b-it": (2_506_172_416, "gemma3-270m",
                           dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                                vocab_size=256000)),
    "meta-llama/Llama-2-7b-hf": (6_738_415_616, "smollm2-135m",
                                 dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      vocab_size=32000)),
}
RELATIONS = ("P103", "P131", "P190", "P641", "P1412")


def tokenizer_of(name: str):
    from transformers import AutoTokenizer

    from assocmem.io import cache_dir
    path = cache_dir() / "models" / f"{name}-fp32"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    from assocmem.llm.models import load_model
    return load_model(name, progress=False).tokenizer


def measure(tok, records, scheme, ks, book) -> dict:
    from assocmem.hijack.evaluate import build_requests
    from assocmem.llm.scoring import _build_rows, _encode_many
    from assocmem.llm.trie import pack
    reqs, _, skipped = build_requests(records, scheme, ks, book.countries, book.separator)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = _build_rows(tok, reqs)
    packed = pack(rows, max(256, max(len(r.trie) for r in rows)))
    for r in packed:
        r.trie.ancestors()
    host, cpu = time.perf_counter() - t0, time.process_time() - c0
    lens = sorted(len(r.trie) for r in packed)      # the scorer batches rows sorted by width, <= 64 a batch
    run = sum(len(lens[i:i + 64]) * lens[i:i + 64][-1] for i in range(0, len(lens), 64))
    enc = _encode_many(tok, [(r.context, t) for r in reqs for t in r.targets])
    per_rec: dict = {}
    for r, (c, t, _), in zip([r for r in reqs for _ in r.targets], enc):
        per_rec.setdefault(r.group, []).append(len(c) + len(t))
    n = len(rows)
    width = max(len(r.trie) for r in packed)
    return {"records": n, "skipped": skipped.total, "nodes": sum(len(r.trie) for r in rows) / n,
            "run": run / n, "plain": sum(sum(v) for v in per_rec.values()) / n,
            "padded": sum(len(v) * max(v) for v in per_rec.values()) / n, "host_ms": 1e3 * cpu / n,
            "host_wall_ms": 1e3 * host / n,
            "row_width": width, "reads_per_row": sum(len(r.reads) for r in packed) / len(packed)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", type=int, default=300, help="records measured per curve")
    ap.add_argument("--k", default="0..10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOP utilisation")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="card memory, for the scorer's default budget")
    ap.add_argument("--data")
    args = ap.parse_args(argv)

    import torch

    from assocmem.hijack.cli import parse_ks
    from assocmem.hijack.counterfact import load_counterfact, select
    from assocmem.hijack.schemes import load_schemes
    from assocmem.llm.budget import FRACTION, MAX_BATCH_TOKENS, cost_model

    ks = parse_ks(args.k)
    book = load_schemes()
    allrec = load_counterfact(args.data).records
    curves = [("generic_false", None), ("generic_true", None)] + [
        (s, rel) for s in ("relation_false", "relation_true") for rel in RELATIONS]
    measured: dict = {}
    for proxy in sorted({p for _, p, _ in PAPER.values()}):
        tok = tokenizer_of(proxy)
        for scheme, rel in curves:
            pool = select(allrec, rel, None, args.seed)
            m = measure(tok, select(allrec, rel, args.sample, args.seed), book.get(scheme), ks, book)
            scored = len(pool) * m["records"] / (m["records"] + m["skipped"])   # skip rate of the sample
            measured[(proxy, scheme, rel)] = {**m, "pool": len(pool), "scored_est": round(scored)}
            print(f"{proxy:13} {scheme:15} {rel or 'all':6} pool {len(pool):6}  per record: nodes {m['nodes']:6.1f}"
                  f"  run {m['run']:6.1f}  plain {m['plain']:7.1f}  padded {m['padded']:7.1f}  host "
                  f"{m['host_ms']:5.2f} ms  (row width {m['row_width']}, {m['reads_per_row']:.0f} reads/row)",
                  flush=True)
    est = {}
    for model, (params, proxy, sizes) in PAPER.items():
        rows = [v for (p, _, _), v in measured.items() if p == proxy]
        tokens = sum(v["scored_est"] * v["run"] for v in rows)
        plain = sum(v["scored_est"] * v["plain"] for v in rows)
        host_s = sum(v["scored_est"] * v["host_ms"] for v in rows) / 1e3
        gpu_s = 2 * params * tokens / (args.mfu * args.peak_tflops * 1e12)
        cm = cost_model(types.SimpleNamespace(config=types.SimpleNamespace(**sizes)), torch.bfloat16,
                        sizes["vocab_size"])
        weights = 2 * params
        budget = min(MAX_BATCH_TOKENS, int(FRACTION["cuda"] * (args.gpu_gib * 2**30 - weights) / cm.act_bytes))
        w = max(v["row_width"] for v in rows)
        reads = max(v["reads_per_row"] for v in rows)
        batch = min(budget, cm.tokens(64, w, int(reads)))            # FastScorer's max_rows = 64
        est[model] = {"params": params, "proxy_tokenizer": proxy, "records_scored": sum(v["scored_est"] for v in rows),
                      "tokens_run": round(tokens), "plain_tokens": round(plain), "pflop": round(2 * params * tokens / 1e15, 2),
                      "gpu_min_at_mfu": round(gpu_s / 60, 1), "host_min": round(host_s / 60, 1),
                      "weights_gib": round(weights / 2**30, 2),
                      "activations_gib": round(batch * cm.act_bytes / 2**30, 2),
                      "budget_tokens": budget, "largest_batch_token_equivalents": batch}
        e = est[model]
        print(f"{model:26} {params / 1e9:5.2f}B  tokens run {tokens / 1e6:6.2f}M (plain loop {plain / 1e6:6.1f}M)  "
              f"{e['pflop']:7.2f} PFLOP  GPU {e['gpu_min_at_mfu']:6.1f} min at MFU {args.mfu}  host "
              f"{e['host_min']:5.1f} min  memory {e['weights_gib']} GiB weights + {e['activations_gib']} GiB activations")
    out = {"k": args.k, "sample": args.sample, "mfu": args.mfu, "peak_tflops": args.peak_tflops,
           "curves": {f"{p}|{s}|{r or 'all'}": v for (p, s, r), v in measured.items()}, "estimate": est}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
