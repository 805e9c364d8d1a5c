"""The BLAS route is chosen by measurement on the machine that runs, cached, and overridable."""
import json
from itertools import count

import pytest

from assocmem import blas


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ASSOCMEM_CACHE", str(tmp_path))
    monkeypatch.delenv("ASSOCMEM_BLAS", raising=False)
    monkeypatch.setattr(blas, "_route", None)
    return tmp_path


def test_the_environment_overrides_and_a_bad_value_is_refused(fresh, monkeypatch):
    for forced in blas.ROUTES:
        monkeypatch.setattr(blas, "_route", None)
        monkeypatch.setenv("ASSOCMEM_BLAS", forced)
        assert blas.route() == forced
    monkeypatch.setattr(blas, "_route", None)
    monkeypatch.setenv("ASSOCMEM_BLAS", "mkl")
    with pytest.raises(ValueError, match="ASSOCMEM_BLAS: 'mkl' is not allowed"):
        blas.route()
    assert not (fresh / "blas-route.json").exists()            # an override measures nothing


@pytest.mark.parametrize("slower", blas.ROUTES)
def test_the_faster_route_is_chosen_and_cached(fresh, monkeypatch, slower):
    calls = []

    def fake_measure():
        calls.append(1)
        return {r: (2.0 if r == slower else 1.0) for r in blas.ROUTES}
    monkeypatch.setattr(blas, "measure", fake_measure)
    faster = next(r for r in blas.ROUTES if r != slower)
    assert blas.route() == faster and len(calls) == 1
    table = json.loads((fresh / "blas-route.json").read_text())
    (entry,) = table.values()
    assert entry["route"] == faster and entry["key"] == blas.machine_key()
    monkeypatch.setattr(blas, "_route", None)                   # a new process: read, not measured
    assert blas.route() == faster and len(calls) == 1
    monkeypatch.setattr(blas, "_route", None)                   # other library versions: measured again
    monkeypatch.setattr(blas, "machine_key", lambda: {"cpu": "another"})
    assert blas.route() == faster and len(calls) == 2


def test_a_damaged_cache_is_measured_again(fresh, monkeypatch):
    (fresh / "blas-route.json").write_text("{not json")
    monkeypatch.setattr(blas, "measure", lambda: {"numpy": 1.0, "torch": 3.0})
    assert blas.route() == "numpy"
    assert json.loads((fresh / "blas-route.json").read_text())


def test_a_near_tie_goes_to_torch_and_numpy_needs_a_clear_margin():
    assert blas.choose({"numpy": 0.97, "torch": 1.0}) == "torch"     # 3% faster: a tie
    assert blas.choose({"numpy": 1.03, "torch": 1.0}) == "torch"
    assert blas.choose({"numpy": 0.90, "torch": 1.0}) == "numpy"     # 10% faster


def test_measure_times_both_routes_with_the_given_clock():
    ticks = count()
    times = blas.measure(repeat=2, timer=lambda: float(next(ticks)))
    assert set(times) == set(blas.ROUTES) and all(t == 1.0 for t in times.values())


def test_a_sweep_records_the_route_in_each_run(fresh, monkeypatch, tmp_path):
    from assocmem.registry import get_task
    from assocmem.store import RunStore
    from assocmem.sweep import run_configs
    monkeypatch.setenv("ASSOCMEM_BLAS", "torch")
    task = get_task("lca")
    cfg = task.make_config({"task": {"m": 3, "L": 8}, "model": {"d_model": 8}, "optim": {"steps": 2, "batch_size": 8},
                            "eval": {"n_eval": 16}})
    store = RunStore(tmp_path / "store")
    run_configs(task, [cfg], store, progress=False)
    (rid,) = store.table("lca")["run_id"]
    assert store.load(rid)["meta"]["blas"] == "torch"
