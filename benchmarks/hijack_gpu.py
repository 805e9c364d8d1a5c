"""Device check (prepared, < 8 min of device time): the fast trie scorer vs the padded-batch baseline of
``benchmarks/hijack_speed.py`` on a randomly initialised ~1B-parameter Llama-architecture model in
bfloat16, on CounterFact-shaped hijack requests; records/s, the ratio, and MFU against the card's
dense bf16 peak.

What a device run needs (see /work/.library/device/README.md). The device machine has Python 3.12 with
torch, transformers, numpy, pandas, pyyaml and tqdm but no network and no ``../shared`` data, so the
repo's ``.venv`` is NOT needed (run the package from ``src`` with PYTHONPATH); the workload is carried:

1. Here, once:   .venv/bin/python benchmarks/hijack_gpu.py --prepare .bench_gpu --n 2000
   writes ``.bench_gpu/`` (ignored by git through .git/info/exclude): the SmolLM2 BPE tokenizer from the
   model cache (3.4 MB) and a seeded subsample of CounterFact records (about 1 MB of gzipped JSON).
2. On the device: run(command="PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/hijack_gpu.py
   --device cuda --workload .bench_gpu --out $OUT/hijack_gpu.json", carry=[".bench_gpu"], timeout_s=480)

Without ``--workload`` the script falls back to the tiny built-in BPE tokenizer and the hand-written
fixture records (``--tiny``-style smoke runs). CPU smoke test:

    .venv/bin/python benchmarks/hijack_gpu.py --device cpu --tiny [--workload .bench_gpu]

What it does: builds ``LlamaConfig`` (hidden 2048, 16 layers, 32 heads, intermediate 5632, vocab = the
tokenizer's; about 1.0B parameters with the 49k-token SmolLM2 vocabulary) with random weights on the
device in bf16 (``--tiny``: hidden 64, 2 layers, fp32 by default); first an exactness check in fp32 on a
few records (fast and padded vs the plain loop, expected <= 1e-4 in log-prob), then the timed
comparison in the run dtype (fast vs padded, alternately ``--repeat`` times, best kept). MFU =
2 x params x tokens run / time / peak: "nominal" counts every parameter for every token run (padding
included), which overstates the fast scorer's lm_head work (it applies the head only where it reads).
The peak comes from a small table by ``torch.cuda.get_device_name`` (H100 SXM/HBM3 and H200: 989
TFLOP/s dense bf16; H100 PCIe 756; H100 NVL 835; A100 312) or ``--peak-tflops``. Last line JSON.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0)]
FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=5632, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, max_position_embeddings=1024)


def peak_tflops(device: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "given"
    if not device.startswith("cuda"):
        return None, "cpu (no peak)"
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tf in PEAK_BF16_TFLOPS:
        if key in name.upper():
            return tf, name
    return None, name


def parse_ks(text: str) -> list[int]:
    a, _, b = text.partition("..")
    return list(range(int(a), int(b) + 1)) if b else [int(x) for x in text.split(",")]


def prepare(folder: Path, n: int, seed: int) -> None:
    """Write the carried workload: the SmolLM2 tokenizer files and ``n`` seeded CounterFact records."""
    from assocmem.hijack.counterfact import load_counterfact, read_json, select
    from assocmem.io import atomic_write_bytes, cache_dir
    src = cache_dir() / "models" / "smollm2-135m-fp32"
    if not (src / "tokenizer.json").exists():
        from assocmem.llm.models import load_model
        load_model("smollm2-135m", progress=False)      # builds the cached fp32 copy with its tokenizer
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, folder / "tokenizer" / f)
    cf = load_counterfact(None)
    keep = {r.case_id for r in select(cf.records, None, n, seed)}
    sub = [r for r in read_json(cf.source) if r["case_id"] in keep]
    atomic_write_bytes(folder / "counterfact.json.gz", gzip.compress(json.dumps(sub).encode()))
    print(f"wrote {folder}/tokenizer and {folder}/counterfact.json.gz ({len(sub)} records)")


def workload(folder: str | None, n: int, seed: int):
    """(tokenizer, records): carried files, or the tiny tokenizer and fixture records."""
    from assocmem.hijack.counterfact import load_counterfact, select
    if folder:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
        recs = select(load_counterfact(str(Path(folder) / "counterfact.json.gz")).records, None, n, seed)
        return tok, recs, "counterfact subset + SmolLM2 tokenizer"
    from assocmem.hijack.counterfact import parse_records
    from assocmem.hijack.testing import records
    from assocmem.llm.testing import tiny_tokenizer
    recs = parse_records(records()).records
    return tiny_tokenizer(bos=True), recs[:n] if n else recs, "fixture records + tiny BPE tokenizer"


def build_model(tokenizer, tiny: bool, device: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **(TINY if tiny else FULL))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny on CPU)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--workload", help="folder written by --prepare (tokenizer/ and counterfact.json.gz)")
    ap.add_argument("--prepare", metavar="FOLDER", help="write the carried workload here and exit")
    ap.add_argument("--n", type=int, default=None, help="records (default 1000; --tiny 5; --prepare 2000)")
    ap.add_argument("--k", default="0..10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--check-records", type=int, default=5, help="records in the fp32 exactness check (0: none)")
    ap.add_argument("--batch-tokens", type=int, help="fast scorer's budget per forward (default: from free memory)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.prepare:
        prepare(Path(args.prepare), args.n or 2000, args.seed)
        return 0
    from hijack_speed import body_params, compare
    from assocmem.hijack.evaluate import build_requests
    from assocmem.hijack.schemes import load_schemes
    from assocmem.llm.scoring import max_abs_diff, plain_score

    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA asked for but not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny and dev == "cpu" else "bfloat16"))
    n = args.n if args.n is not None else (5 if args.tiny else 1000)
    t0 = time.perf_counter()
    tok, records, source = workload(args.workload, n, args.seed)
    book = load_schemes()
    reqs, _, _ = build_requests(records, book.get("generic_false"), parse_ks(args.k), book.countries, book.separator)
    model = build_model(tok, args.tiny, dev, torch.float32 if args.check_records else dtype, args.seed)
    params, body = sum(p.numel() for p in model.parameters()), body_params(model)
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
    setup_s = time.perf_counter() - t0
    res = {"device": dev, "dtype": str(dtype).replace("torch.", ""), "params": params, "body_params": body,
           "config": TINY if args.tiny else FULL, "vocab": len(tok), "workload": source, "n": len(records),
           "k": args.k, "sequences": 2 * len(reqs), "setup_s": round(setup_s, 1),
           "torch": torch.__version__, "machine": platform.node()}
    import transformers
    res["transformers"] = transformers.__version__

    if args.check_records:          # exactness on this device's kernels, in fp32 (the 4-D mask path included)
        chk = [r for r in reqs if r.group in {rec.case_id for rec in records[:args.check_records]}]
        from assocmem.llm.scoring import FastScorer
        from hijack_speed import padded_score
        fast = FastScorer(model, tok, verify=False).score(chk)
        pad, _ = padded_score(model, tok, chk)
        plain = plain_score(model, tok, chk)
        res["fp32_check"] = {"records": args.check_records, "fast_vs_plain": max_abs_diff(fast, plain),
                             "padded_vs_plain": max_abs_diff(pad, plain)}
        print(f"fp32 exactness on {dev}: max |log-prob diff| fast vs plain {res['fp32_check']['fast_vs_plain']:.2e}, "
              f"padded vs plain {res['fp32_check']['padded_vs_plain']:.2e}", flush=True)
        model = model.to(dtype)
        sync()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = compare(model, tok, reqs, len(records), params, body, repeat=args.repeat, skip_plain=True,
                batch_tokens=args.batch_tokens, sync=sync, verify=dtype == torch.float32)
    res.update(r)
    peak, card = peak_tflops(dev, args.peak_tflops)
    res.update({"card": card, "peak_bf16_tflops": peak})
    if dev.startswith("cuda"):
        res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for m in ("fast", "padded"):
        tf = r[f"{m}_gflops_nominal"] / 1e3
        res[f"{m}_tflops_nominal"] = round(tf, 2)
        res[f"{m}_mfu_nominal"] = round(tf / peak, 4) if peak else None
        res[f"{m}_mfu_body"] = round(r[f"{m}_gflops_body"] / 1e3 / peak, 4) if peak else None
    print(f"{card}: {params / 1e9:.3f}B-param Llama ({res['dtype']}), {len(records)} records x k={args.k} x 2 "
          f"targets ({source}); setup {res['setup_s']} s")
    for m in ("fast", "padded"):
        print(f"  {m:<6}: {r[f'{m}_s']:8.2f} s  {r[f'{m}_records_per_s']:9.2f} records/s  "
              f"{res[f'{m}_tflops_nominal']:8.2f} TFLOP/s nominal  MFU {res[f'{m}_mfu_nominal']}")
    print(f"  fast/padded {r['fast_over_padded']}x; tokens run: fast {r['tokens_fast_run']}, padded "
          f"{r['tokens_padded_baseline']} ({r['tokens_real']} real); max |log-prob diff| fast vs padded "
          f"{r['max_abs_logprob_diff_fast_vs_padded']:.2e} (in {res['dtype']})")
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
