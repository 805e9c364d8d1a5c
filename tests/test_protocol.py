"""Code protocol: a task's results may change only together with its protocol version.

Each task runs a tiny config with a fixed seed; a digest of its rounded metrics and weights is kept in
tests/protocol_fingerprints.json under the task's protocol string. If the code's results change while
``PROTOCOL`` (runners/<task>.py) stays the same, the digest differs and the test fails: bump the
protocol, so stored runs of the old code are recomputed instead of reused, then record the new digest
with ``ASSOCMEM_UPDATE_FINGERPRINTS=1 pytest tests/test_protocol.py``.
"""
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import assocmem.runners.lca as lca_runner
from assocmem.registry import get_task, run_id
from assocmem.store import RunStore
from assocmem.sweep import run_configs

FINGERPRINTS = Path(__file__).with_name("protocol_fingerprints.json")
UPDATE = os.environ.get("ASSOCMEM_UPDATE_FINGERPRINTS") == "1"

TINY = {
    "lca": {"task": {"m": 3, "L": 8}, "model": {"d_model": 8}, "optim": {"steps": 5, "batch_size": 16},
            "eval": {"n_eval": 64}, "seed": 0},
    "geometric": {"task": {"N": 16, "R": 2}, "model": {"d_model": 8}, "optim": {"max_steps": 20, "lr": 1e-2},
                  "seed": 0},
    "induction": {"task": {"T": 32, "K": 3}, "model": {"d_model": 16, "n_ctx": 64},
                  "optim": {"batch": 4, "steps": 3, "log_every": 3},
                  "eval": {"batch": 4, "every": 3, "T_test": [64], "long_batch": 2, "bucket": 16}, "seed": 0},
}


def _round(x):
    """4 significant digits: stable across BLAS builds, still moved by any real change of results."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return str(x)


def fingerprint(result) -> str:
    metrics = {k: v for k, v in result.metrics.items() if k not in ("wall_s", "stack_size")}
    weights = {k: [list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
               for k, v in sorted(result.weights.items())}
    payload = json.dumps({"status": result.status, "metrics": _round(metrics), "weights": _round(weights)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _config(name, request):
    data = json.loads(json.dumps(TINY[name]))
    if name == "induction":    # the text it trains on; skips where the shared data is absent
        data["task"]["data_path"] = str(request.getfixturevalue("shared_data") / "tinyshakespeare" / "input.txt")
    return get_task(name).make_config(data)


@pytest.mark.parametrize("name", sorted(TINY))
def test_results_change_only_with_the_protocol(name, request):
    task = get_task(name)
    torch.manual_seed(0)
    got = fingerprint(task.run(_config(name, request)))
    table = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.exists() else {}
    if UPDATE:
        table.setdefault(name, {})[task.protocol] = got
        FINGERPRINTS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        return
    want = table.get(name, {}).get(task.protocol)
    assert want is not None, (
        f"no fingerprint recorded for {name} protocol {task.protocol!r}; record it with "
        f"ASSOCMEM_UPDATE_FINGERPRINTS=1 pytest tests/test_protocol.py")
    assert got == want, (
        f"{name}: results of the tiny reference run changed (fingerprint {got}, recorded {want} for protocol "
        f"{task.protocol!r}). If the change is intended, bump PROTOCOL in runners/{name}.py (stored runs of "
        f"the old code are then recomputed), then record the new fingerprint with "
        f"ASSOCMEM_UPDATE_FINGERPRINTS=1 pytest tests/test_protocol.py")


def test_every_task_has_a_protocol_and_it_names_the_run():
    for name in TINY:
        task = get_task(name)
        assert task.protocol.startswith(name + "-"), task.protocol
        cfg = task.make_config({})
        other = dataclasses.replace(task, protocol=task.protocol + "-next")
        assert run_id(task, cfg) != run_id(other, cfg)
        assert run_id(task, cfg) == run_id(get_task(name), task.make_config({}))


def test_changing_the_protocol_recomputes_the_runs(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    task = get_task("lca")
    cfgs = [task.make_config({**TINY["lca"], "seed": s}) for s in (0, 1)]
    rep = run_configs(task, cfgs, store, progress=False)
    assert rep.ran == 2
    assert run_configs(task, cfgs, store, progress=False).ran == 0        # same protocol: reused
    bumped = dataclasses.replace(task, protocol="lca-bumped")
    monkeypatch.setattr(lca_runner, "SPEC", bumped)
    rep = run_configs(bumped, cfgs, store, progress=False)
    assert rep.ran == 2 and rep.skipped == 0                             # new protocol: recomputed
    new_ids = [run_id(bumped, c) for c in cfgs]
    assert set(new_ids).isdisjoint(run_id(task, c) for c in cfgs)
    assert all(store.is_finished(r) for r in new_ids) and len(store.run_ids()) == 4
    df = store.table("lca").set_index("run_id")
    assert list(df.loc[new_ids, "protocol"]) == ["lca-bumped"] * 2
    assert list(df.drop(index=new_ids)["protocol"]) == [task.protocol] * 2
    assert all(store.load(r)["meta"]["protocol"] == "lca-bumped" for r in new_ids)


def test_fingerprint_sees_a_change_of_results():
    task = get_task("lca")
    a = task.run(task.make_config(TINY["lca"]))
    b = task.run(task.make_config({**TINY["lca"], "optim": {**TINY["lca"]["optim"], "lr": 0.02}}))
    assert fingerprint(a) == fingerprint(task.run(task.make_config(TINY["lca"])))   # deterministic
    assert fingerprint(a) != fingerprint(b)
