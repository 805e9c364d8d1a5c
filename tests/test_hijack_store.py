"""The hijack results store: content-addressed entries, chunked commits, resume after SIGKILL and
Ctrl-C, prompt lengths against the model's context, and the score command's argument checks."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from assocmem.hijack.cli import parse_ks
from assocmem.hijack.testing import records

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """A GPT-2-style tiny model that can score only 48 positions."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from assocmem.llm.testing import tiny_tokenizer
    d = tmp_path_factory.mktemp("tiny-short")
    cfg = GPT2Config(vocab_size=400, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def cli(argv, capsys):
    from assocmem.cli import main
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def hidden(root):
    """Temp leftovers anywhere under root (every name the store writes is visible)."""
    return sorted(str(p) for p in root.rglob("*") if p.name.startswith("."))


def threads():
    import torch
    return torch.get_num_threads()


# ------------------------------------------------------------------------------- identity of entries

def test_runs_differing_in_data_k_sep_or_template_never_share(tiny_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    other = tmp_path / "cf2.json"
    other.write_text(json.dumps(records(), indent=2))        # same records, different file
    base = ["hijack", "score", "--model", tiny_dir, "--data", data_file, "--k", "0..2", "--out", tmp_path / "s",
            "--json", "--chunk", "3"]
    variants = {"base": [], "data": ["--data", other], "k": ["--k", "0..3"], "sep": ["--sep", "\n"],
                "template": ["--scheme", "Never think of {target_new}."],
                "template2": ["--scheme", "Forget {target_new}."]}
    res = {}
    for name, extra in variants.items():
        rc, out, _ = cli(base + extra, capsys)
        assert rc == 0
        res[name] = last_json(out)
        assert res[name]["cached"] is False
    assert len({r["id"] for r in res.values()}) == len(variants)
    assert res["template"]["scheme"] != res["template2"]["scheme"]          # custom-<hash>, not "custom"
    store = ScoreStore(tmp_path / "s")
    assert {e.id for e in store.entries()} == {r["id"] for r in res.values()}
    tables = {e.id: e.table() for e in store.entries()}
    assert tables[res["k"]["id"]].k.max() == 3 and tables[res["base"]["id"]].k.max() == 2
    assert set(tables[res["sep"]["id"]].sentence) == set(tables[res["base"]["id"]].sentence)
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*.parquet")}
    for name, extra in variants.items():                     # rerun: reused, nothing rewritten
        rc, out, _ = cli(base + extra, capsys)
        assert last_json(out)["cached"] is True and last_json(out)["id"] == res[name]["id"]
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*.parquet")} == before
    spec = store.entry(res["data"]["id"]).spec
    assert spec["data"] == str(other) and spec["data_sha256"] != store.entry(res["base"]["id"]).spec["data_sha256"]
    assert spec["records_sha256"] == store.entry(res["base"]["id"]).spec["records_sha256"]
    assert spec["template"] == "Do not think of {target_new}." and spec["chunk"] == 3
    assert store.entry(res["base"]["id"]).check() == [] and hidden(tmp_path / "s") == []
    summary = store.entry(res["base"]["id"]).summary()
    assert {"device", "dtype", "revision", "versions"} <= set(summary["model_meta"])


def test_relation_scheme_keys_its_per_relation_templates(tiny_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    rc, out, _ = cli(["hijack", "score", "--model", tiny_dir, "--data", data_file, "--scheme", "relation_false",
                      "--k", "0,1", "--out", tmp_path, "--json"], capsys)
    spec = ScoreStore(tmp_path).entry(last_json(out)["id"]).spec
    assert rc == 0 and isinstance(spec["template"], dict) and "P1412" in spec["template"]
    assert spec["scheme_def"]["countries"]["French"] == "France"     # {country} templates key the map


# ----------------------------------------------------------------------------------- kill and resume

DRIVER = r"""
import json, os, signal, sys
from assocmem import io
from assocmem.cli import main
from assocmem.hijack import evaluate
from assocmem.hijack.store import ScoreStore
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa
phases, argv, out, eid = json.loads(sys.argv[1]), sys.argv[2:], sys.argv[-1], None


def die_at(mode, target):
    if mode == "commit":     # die after `target` is fully written to its temp folder, before the rename
        orig = io.atomic_write
        def atomic_write(path, write):
            res = orig(path, write)
            if path.name == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return res
        io.atomic_write = atomic_write
    else:                    # die while scoring the target-th chunk of this process
        orig, calls = evaluate.score_records, []
        def score_records(*a, **k):
            calls.append(1)
            if len(calls) == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)
        evaluate.score_records = score_records


report = []
for mode, target in phases:  # one forked process per phase (the imports are paid once)
    pid = os.fork()
    if pid == 0:
        die_at(mode, target)
        os._exit(main(argv))
    _, status = os.waitpid(pid, 0)
    entries = [p for p in (ScoreStore(out).dir).iterdir() if not p.name.startswith(".")]
    e = ScoreStore(out).entry(entries[0].name)
    report.append({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                   "stored": e.stored_records(), "finished": e.finished,
                   "leftovers": sorted(p.name for p in e.path.iterdir() if p.name.startswith("."))})
print(json.dumps(report))
"""


@pytest.mark.slow   # one interpreter start (~5 s) and three forked runs
def test_sigkill_at_three_moments_then_resume_equals_uninterrupted(tiny_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    argv = ["hijack", "score", "--model", tiny_dir, "--data", data_file, "--k", "0..3", "--paraphrase",
            "--neighborhood", "--chunk", "1", "--threads", threads(), "--json"]
    rc, out, _ = cli(argv + ["--out", tmp_path / "ref"], capsys)
    ref = ScoreStore(tmp_path / "ref").entry(last_json(out)["id"])
    phases = [("commit", "chunk-000001.parquet"),    # 1: mid-write of the second chunk
              ("score", 3),                          # 2: while scoring (two more chunks committed first)
              ("commit", "table.parquet")]           # 3: mid-write of the final table
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(phases)]
                       + [str(a) for a in argv + ["--out", tmp_path / "run"]], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, p.stderr[-3000:]
    k1, k2, k3 = json.loads(p.stdout.strip().splitlines()[-1])
    assert [k["signal"] for k in (k1, k2, k3)] == [9, 9, 9]
    assert k1["stored"] == 1 and any(n.startswith(".tmp-") for n in k1["leftovers"])
    assert k2["stored"] == 3 and k2["leftovers"] == []           # the dead writer's leftover is gone
    assert k3["stored"] == 7 and not k3["finished"] and k3["leftovers"]
    rc, out, _ = cli(argv + ["--out", tmp_path / "run"], capsys)
    assert rc == 0 and last_json(out)["id"] == ref.id and last_json(out)["cached"] is False
    e = ScoreStore(tmp_path / "run").entry(ref.id)
    pd.testing.assert_frame_equal(e.table(), ref.table())
    assert e.done["records"] == 7 and sum(c["rows"] for c in e.done["chunks"]) == len(ref.table())
    assert not e.table().duplicated(["case_id", "k", "kind", "prompt_index"]).any()
    assert e.check() == [] and hidden(tmp_path / "run") == []


def test_ctrl_c_keeps_committed_chunks_and_says_how_many(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    from assocmem.hijack import evaluate
    from assocmem.hijack.store import ScoreStore
    orig, calls = evaluate.score_records, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(evaluate, "score_records", interrupted)
    argv = ["hijack", "score", "--model", tiny_dir, "--data", data_file, "--k", "0..2", "--chunk", "2",
            "--out", tmp_path, "--json"]
    rc, _, err = cli(argv, capsys)
    assert rc == 130 and "interrupted: 4 of 7 records stored in" in err and "resume" in err
    assert hidden(tmp_path) == [] and len(list(tmp_path.rglob("chunk-*.parquet"))) == 2
    monkeypatch.setattr(evaluate, "score_records", orig)
    rc, out, _ = cli(argv, capsys)
    e = ScoreStore(tmp_path).entry(last_json(out)["id"])
    assert rc == 0 and e.done["records"] == 7 and sorted(set(e.table().case_id)) == list(range(7))


# ------------------------------------------------------------------------------------ prompt lengths

def test_huge_k_range_exits_2_fast_and_small(tmp_path):
    # VmHWM is this process's own peak: ru_maxrss would carry the (large) pytest parent's peak across exec.
    code = ("import re\nfrom assocmem.cli import main\n"
            "rc = main(['hijack', 'score', '--model', 'smollm2-135m', '--k', '0..100000', '--n', '3', "
            f"'--out', {str(tmp_path)!r}])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print(rc, hwm)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    rc, maxrss_kib = map(int, p.stdout.split())
    assert rc == 2 and maxrss_kib < 1024 * 1024
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "k: '0..100000' has 100001 values" in lines[0]
    assert parse_ks("0..9999")[-1] == 9999 and parse_ks("5, 1,1") == [1, 5]
    with pytest.raises(Exception, match="at most 10000"):
        parse_ks(",".join(map(str, range(10001))))


def test_length_estimate_equals_brute_force(short_dir):
    """Every (record, k) the estimate calls too long is too long, and none is missed: compared with the
    exact lengths of the built strings at several limits (the estimate is exact near the limit)."""
    from transformers import AutoTokenizer

    from assocmem.hijack.counterfact import parse_records
    from assocmem.hijack.lengths import _exact, record_prompts, too_long_pairs
    from assocmem.hijack.schemes import hijack_prompt, load_schemes
    tok = AutoTokenizer.from_pretrained(short_dir)
    recs = parse_records(records()).records
    book = load_schemes()
    ks = list(range(0, 12))
    for scheme, sep in [("generic_false", " "), ("generic_true", "\n"), ("relation_false", " ")]:
        sch = book.get(scheme)
        sents = {r.case_id: s for r in recs if (s := sch.sentence(r, book.countries)[0]) is not None}
        exact = {(r.case_id, k): max(_exact(tok, hijack_prompt(sents[r.case_id], p, k, sep),
                                            (r.target_new, r.target_true))
                                     for p in record_prompts(r, True, True))
                 for r in recs if r.case_id in sents for k in ks}
        for limit in (20, 48, 75, 130):
            got = too_long_pairs(tok, recs, sents, ks, limit, sep, paraphrase=True, neighborhood=True)
            assert {(c, k) for c, k, _, _ in got} == {key for key, n in exact.items() if n > limit}
            assert all(n == exact[(c, k)] for c, k, n, ex in got if ex)


def test_too_long_prompt_refused_or_skipped_and_counted(short_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    base = ["hijack", "score", "--model", short_dir, "--data", data_file, "--k", "0..6", "--out", tmp_path]
    rc, _, err = cli(base, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert "prompt length: case_id=" in lines[0] and " k=" in lines[0] and "exceed the 48 positions" in lines[0]
    assert "--skip-too-long" in lines[0] and not list(tmp_path.rglob("chunk-*"))
    rc, out, _ = cli(base + ["--skip-too-long", "--json"], capsys)
    res = last_json(out)
    assert rc == 0 and res["too_long_pairs"] > 0
    e = ScoreStore(tmp_path).entry(res["id"])
    df = e.table()
    assert len(df[["case_id", "k"]].drop_duplicates()) + res["too_long_pairs"] == 7 * 7
    assert e.done["too_long"] == res["too_long_pairs"]
    assert e.summary()["too_long_pairs"] == res["too_long_pairs"]


# ------------------------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("flag,value", [("--threads", -1), ("--seed", -1), ("--chunk", 0), ("--batch-tokens", 0),
                                        ("--threads", 0)])
def test_bad_numbers_exit_2_with_one_line(flag, value, tiny_dir, data_file, tmp_path, capsys):
    rc, _, err = cli(["hijack", "score", "--model", tiny_dir, "--data", data_file, "--out", tmp_path, flag, value],
                     capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{flag}: {value}" in err


def test_truncated_gzip_is_one_line(tiny_dir, tmp_path, capsys):
    blob = gzip.compress(json.dumps(records()).encode())
    bad = tmp_path / "cut.json.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    rc, _, err = cli(["hijack", "score", "--model", tiny_dir, "--data", bad, "--out", tmp_path], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cut.json.gz is not valid JSON or gzip" in err
    bad.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    rc, _, err = cli(["hijack", "score", "--model", tiny_dir, "--data", bad, "--out", tmp_path], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_chunks_are_record_slices_in_order(tiny_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    rc, out, _ = cli(["hijack", "score", "--model", tiny_dir, "--data", data_file, "--k", "0,2", "--chunk", "3",
                      "--seed", "4", "--out", tmp_path, "--json"], capsys)
    e = ScoreStore(tmp_path).entry(last_json(out)["id"])
    from assocmem.hijack.counterfact import parse_records, select
    order = [r.case_id for r in select(parse_records(records()).records, None, None, 4)]
    chunks = [pd.read_parquet(p) for p in e.chunk_files()]
    assert [c["records"] for c in e.done["chunks"]] == [3, 3, 1]
    assert [list(dict.fromkeys(c.case_id)) for c in chunks] == [order[:3], order[3:6], order[6:]]
    assert np.array_equal(pd.concat(chunks, ignore_index=True).to_numpy(), e.table().to_numpy())


def test_damaged_chunk_is_scored_again(tiny_dir, data_file, tmp_path, capsys):
    from assocmem.hijack.store import ScoreStore
    argv = ["hijack", "score", "--model", tiny_dir, "--data", data_file, "--k", "0,1", "--chunk", "2",
            "--out", tmp_path, "--json"]
    rc, out, _ = cli(argv, capsys)
    e = ScoreStore(tmp_path).entry(last_json(out)["id"])
    before = e.table()
    (e.path / "done.json").unlink()
    (e.path / "table.parquet").unlink()
    (e.path / "chunk-000001.parquet").write_bytes(b"not parquet")
    assert e.stored_records() == 5                  # 7 records in chunks of 2; chunk 1 unreadable
    rc, out, _ = cli(argv, capsys)
    assert rc == 0 and last_json(out)["cached"] is False and e.check() == []
    pd.testing.assert_frame_equal(e.table(), before)
