"""Speed of the hijack scorer, side by side in one process on the same records and prompts:

- fast:   the trie scorer (:class:`assocmem.llm.scoring.FastScorer`): one token trie per record
          (every k, both targets), tries packed into rows, a 4-D ancestor mask, logits only where read;
- padded: a padded-batch baseline written here, as ROME's evaluation batches: ONE forward per record
          holding all its prompts x both targets, right padding with an attention mask, each target's
          log-probs read at its own positions; logits are computed only at the positions read
          (transformers' boolean ``logits_to_keep``), so the baseline is not handicapped by the vocabulary;
- plain:  the reference loop, one sequence per forward (:func:`assocmem.llm.scoring.plain_score`;
          ``--skip-plain`` leaves it out, it is slow).

    nice -n 5 .venv/bin/python benchmarks/hijack_speed.py --model smollm2-135m --n 20 --k 0..10 --threads 2 --skip-plain

Reports records/s (a record = all its k and both targets), the ratios fast/padded and fast/plain, the
largest |log-prob difference| of fast and padded against plain (against padded when plain is skipped),
the tokens each method runs (padding included) and the FLOP/s achieved, counted as 2 x params x tokens
run ("nominal") and as 2 x non-embedding params x tokens run ("body": the lm_head, which the fast and
padded methods apply only where they read, left out). ``--repeat R`` times fast and padded R times
alternately and keeps each one's best (the machine may be shared). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence

import torch

from assocmem.hijack.cli import selected, selection_options


# ------------------------------------------------------------------------------ padded-batch baseline

@torch.inference_mode()
def padded_score(model, tokenizer, requests, mask: bool = True) -> tuple[list, dict]:
    """ROME-style batched scoring: one right-padded forward per group of requests (a record: all its k
    and both targets), reading each target's per-token log-probs at its own positions.

    Same tokenisation as the fast scorer (:func:`assocmem.llm.scoring._encode_many`), so the scores
    are comparable token for token. Returns ``(scored, stats)`` with ``scored[i][t]`` a
    :class:`~assocmem.llm.scoring.Scored` and stats {"tokens": real tokens, "padded": B x W summed,
    "forwards", "logit_rows"}.
    """
    from assocmem.llm.scoring import Scored, _encode_many
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = iter(_encode_many(tokenizer, [(r.context, t) for r in requests for t in r.targets]))
    groups: dict = {}
    for ri, req in enumerate(requests):
        key = ("request", ri) if req.group is None else ("group", req.group)
        for ti in range(len(req.targets)):
            ctx, tgt, mode = next(enc)
            groups.setdefault(key, []).append((ri, ti, ctx, tgt, mode))
    out: list = [[None] * len(r.targets) for r in requests]
    stats = {"tokens": 0, "padded": 0, "forwards": 0, "logit_rows": 0}
    for seqs in groups.values():
        B, W = len(seqs), max(len(c) + len(t) for _, _, c, t, _ in seqs)
        ids = torch.full((B, W), pad, dtype=torch.long)
        att = torch.zeros((B, W), dtype=torch.long)
        keep = torch.zeros((B, W), dtype=torch.bool)     # positions whose next-token logits are read
        for b, (_, _, c, t, _) in enumerate(seqs):
            n = len(c) + len(t)
            ids[b, :n] = torch.tensor(c + t)
            att[b, :n] = 1
            keep[b, len(c) - 1:n - 1] = True
        kw = {"attention_mask": att.to(device)} if mask else {}
        logits = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep.to(device), **kw).logits
        logits = logits.float()                           # [sum(keep), V], row-major over (b, position)
        logz = torch.logsumexp(logits, dim=-1)
        row = 0
        for b, (ri, ti, c, t, mode) in enumerate(seqs):
            sl = torch.arange(row, row + len(t), device=logits.device)
            lp = logits[sl, torch.tensor(t, device=logits.device)] - logz[sl]
            out[ri][ti] = Scored(lp.cpu().numpy(), mode)
            row += len(t)
        stats["tokens"] += sum(len(c) + len(t) for _, _, c, t, _ in seqs)
        stats["padded"] += B * W
        stats["forwards"] += 1
        stats["logit_rows"] += row
    return out, stats


# ------------------------------------------------------------------------------------------ helpers

def body_params(model) -> int:
    """Parameters outside the input embedding and the output head (tied or not)."""
    seen = {id(p) for p in model.parameters()}
    skip = set()
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        if mod is not None:
            skip |= {id(p) for p in mod.parameters() if id(p) in seen}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def diff(a, b) -> float:
    from assocmem.llm.scoring import max_abs_diff
    return float(max_abs_diff(a, b))


def timed(fn, repeat: int) -> tuple[float, list[float], object]:
    times, res = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, res


def compare(model, tokenizer, reqs: Sequence, n_records: int, params: int, body: int, repeat: int = 2,
            skip_plain: bool = False, mask: bool = True, batch_tokens: int | None = None,
            sync=lambda: None, verify: bool = True) -> dict:
    """Time fast vs padded (alternately, ``repeat`` times each, best kept) and plain once on ``reqs``.
    ``sync``: waits for the device (CUDA timing); ``verify``: the fast scorer's once-per-model fp32
    check against the plain loop (off for 16-bit, where the two round differently)."""
    from assocmem.llm.scoring import FastScorer, plain_score
    scorer = FastScorer(model, tokenizer, batch_tokens=batch_tokens, verify=verify)
    one = [r for r in reqs if r.group == reqs[0].group]
    scorer.score(one)                                                   # warm-up + once-per-model check
    padded_score(model, tokenizer, one, mask)
    sync()
    t_fast, t_pad = [], []
    for _ in range(repeat):
        scorer.stats.update(nodes=0, padded=0, forwards=0)
        t0 = time.perf_counter()
        fast = scorer.score(reqs)
        sync()
        t_fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pad, pstats = padded_score(model, tokenizer, reqs, mask)
        sync()
        t_pad.append(time.perf_counter() - t0)
    tf, tp = min(t_fast), min(t_pad)
    fst = dict(scorer.stats)
    res = {"records": n_records, "sequences": sum(len(r.targets) for r in reqs), "repeat": repeat,
           "fast_s": round(tf, 3), "padded_s": round(tp, 3), "fast_s_all": [round(t, 3) for t in t_fast],
           "padded_s_all": [round(t, 3) for t in t_pad],
           "fast_records_per_s": round(n_records / tf, 3), "padded_records_per_s": round(n_records / tp, 3),
           "fast_over_padded": round(tp / tf, 2),
           "tokens_real": pstats["tokens"], "tokens_padded_baseline": pstats["padded"],
           "tokens_fast_nodes": fst["nodes"], "tokens_fast_run": fst["padded"], "fast_forwards": fst["forwards"],
           "padded_forwards": pstats["forwards"], "padding_mask": mask,
           "batch_tokens": fst.get("batch_tokens"),
           "fast_gflops_nominal": round(2 * params * fst["padded"] / tf / 1e9, 2),
           "padded_gflops_nominal": round(2 * params * pstats["padded"] / tp / 1e9, 2),
           "fast_gflops_body": round(2 * body * fst["padded"] / tf / 1e9, 2),
           "padded_gflops_body": round(2 * body * pstats["padded"] / tp / 1e9, 2),
           "max_abs_logprob_diff_fast_vs_padded": diff(fast, pad)}
    if not skip_plain:
        t0 = time.perf_counter()
        plain = plain_score(model, tokenizer, reqs, progress=False)
        sync()
        tq = time.perf_counter() - t0
        res.update({"plain_s": round(tq, 3), "plain_records_per_s": round(n_records / tq, 3),
                    "fast_over_plain": round(tq / tf, 2), "padded_over_plain": round(tq / tp, 2),
                    "tokens_plain": pstats["tokens"],
                    "plain_gflops_nominal": round(2 * params * pstats["tokens"] / tq / 1e9, 2),
                    "max_abs_logprob_diff_fast_vs_plain": diff(fast, plain),
                    "max_abs_logprob_diff_padded_vs_plain": diff(pad, plain)})
    return res


def report(res: dict, label: str) -> None:
    print(label)
    print(f"  fast scorer : {res['fast_s']:8.2f} s  {res['fast_records_per_s']:8.3f} records/s  "
          f"{res['tokens_fast_run']:>7} tokens run ({res['tokens_fast_nodes']} trie nodes)  "
          f"{res['fast_gflops_nominal']:8.1f} GFLOP/s nominal  {res['fast_gflops_body']:8.1f} body")
    print(f"  padded batch: {res['padded_s']:8.2f} s  {res['padded_records_per_s']:8.3f} records/s  "
          f"{res['tokens_padded_baseline']:>7} tokens run ({res['tokens_real']} real)  "
          f"{res['padded_gflops_nominal']:8.1f} GFLOP/s nominal  {res['padded_gflops_body']:8.1f} body")
    if "plain_s" in res:
        print(f"  plain loop  : {res['plain_s']:8.2f} s  {res['plain_records_per_s']:8.3f} records/s  "
              f"{res['tokens_plain']:>7} tokens run  {res['plain_gflops_nominal']:8.1f} GFLOP/s nominal")
        print(f"  fast/padded {res['fast_over_padded']}x, fast/plain {res['fast_over_plain']}x; max |log-prob "
              f"diff| vs plain: fast {res['max_abs_logprob_diff_fast_vs_plain']:.2e}, padded "
              f"{res['max_abs_logprob_diff_padded_vs_plain']:.2e}")
    else:
        print(f"  fast/padded {res['fast_over_padded']}x; max |log-prob diff| fast vs padded "
              f"{res['max_abs_logprob_diff_fast_vs_padded']:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    selection_options(ap, n=20, k="0..10")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of fast and padded each (best kept)")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the slow plain loop")
    ap.add_argument("--no-pad-mask", action="store_true",
                    help="padded baseline without the attention mask (right padding needs none for causal LMs)")
    ap.add_argument("--batch-tokens", type=int, help="fast scorer's budget per forward (default: its own)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from assocmem.hijack.evaluate import build_requests
    from assocmem.llm.models import load_model

    ks, book, scheme, records = selected(args)
    reqs, _, _ = build_requests(records, scheme, ks, book.countries, book.separator)
    lm = load_model(args.model, device="cpu", dtype=args.dtype, progress=False)
    params, body = lm.n_params, body_params(lm.model)
    load0 = os.getloadavg()[0]
    res = compare(lm.model, lm.tokenizer, reqs, len(records), params, body, args.repeat, args.skip_plain,
                  not args.no_pad_mask, args.batch_tokens)
    res = {"model": args.model, "params": params, "body_params": body, "dtype": args.dtype, "device": "cpu",
           "scheme": args.scheme, "k": f"{min(ks)}..{max(ks)}", "n": len(records), "threads": args.threads,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)], **res}
    report(res, f"{args.model} ({params / 1e6:.1f}M params, {body / 1e6:.1f}M outside embeddings), {args.dtype}, "
                f"{len(records)} records x k={res['k']} x 2 targets, {args.threads} threads, "
                f"load {res['loadavg_1min_before_after']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
