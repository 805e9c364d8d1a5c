"""Runner: stacked member == single run, freeze schedule, store/CLI integration, config errors."""
import json

import pytest
import torch

from assocmem.cli import main
from assocmem.config import ConfigError, replace
from assocmem.registry import get_task

SMALL = {"task": {"T": 32, "K": 3}, "model": {"d_model": 32, "n_ctx": 64},
         "optim": {"batch": 8, "steps": 6, "log_every": 2},
         "eval": {"batch": 8, "every": 3, "T_test": [64], "long_batch": 4, "bucket": 16}}


@pytest.fixture(scope="module")
def spec(shared_data):
    return get_task("induction")


def _cfg(spec, shared_data, **flat):
    data = {**SMALL, "task": {**SMALL["task"], "data_path": str(shared_data / "tinyshakespeare" / "input.txt")}}
    cfg = spec.make_config(data)
    return replace(cfg, **flat) if flat else cfg


@pytest.mark.parametrize("extra", [{}, {"model.pos": "rel_bias", "model.ffn": "linear", "optim.loss": "all"}])
def test_stacked_member_equals_single_run(spec, shared_data, extra):
    cfgs = [_cfg(spec, shared_data, seed=s, **extra) for s in (0, 1)]
    stacked = spec.run_stack(cfgs)
    single = spec.run_stack([cfgs[1]])[0]
    assert stacked[1].status == single.status == "ok"
    for k, v in single.weights.items():
        torch.testing.assert_close(stacked[1].weights[k], v, atol=1e-5, rtol=1e-4)
    assert stacked[1].metrics["acc_end"] == pytest.approx(single.metrics["acc_end"], abs=1e-6)
    assert not torch.equal(stacked[0].weights["W_K1"], stacked[1].weights["W_K1"])


def test_freeze_schedule(spec, shared_data):
    cfg = _cfg(spec, shared_data, **{"optim.freeze_until": ["W_K1:100"]})
    r = spec.run(cfg)
    from assocmem.runners.induction import build_model
    init = build_model(cfg, [torch.Generator().manual_seed(cfg.seeds.resolve(cfg.seed).init)])
    assert torch.equal(r.weights["W_K1"], init.W_K1[0].detach())
    assert not torch.equal(r.weights["W_K2"], init.W_K2[0].detach())
    with pytest.raises(ConfigError, match="optim.freeze_until"):
        replace(cfg, **{"optim.freeze_until": ["W_K1"]})


def test_init_scale_reaches_the_model(spec, shared_data):
    from assocmem.runners.induction import build_model
    cfg = _cfg(spec, shared_data, **{"model.init_scale": 0.0})
    m = build_model(cfg, [torch.Generator().manual_seed(0)])
    assert float(m.W_K2.detach().abs().max()) == 0.0 and float(m.W_V2.detach().abs().max()) > 0.0


def test_generic_model_runs(spec, shared_data):
    r = spec.run(_cfg(spec, shared_data, **{"model.kind": "generic", "optim.name": "adamw",
                                             "optim.lr": 0.01, "optim.loss": "all", "eval.T_test": []}))
    assert r.status == "ok" and 0.0 <= r.metrics["acc_end"] <= 1.0


def test_cli_run_json_and_missing_data(shared_data, tmp_path, capsys):
    path = shared_data / "tinyshakespeare" / "input.txt"
    args = ["run", "induction", f"task.data_path={path}", "task.T=16", "model.d_model=16", "model.n_ctx=32",
            "optim.batch=4", "optim.steps=2", "eval.batch=4", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "ok" and out["task"] == "induction"
    assert main(["run", "induction", f"task.data_path={tmp_path / 'missing.txt'}", "--out", str(tmp_path)]) == 2
    assert "task.data_path" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_pipeline_smoke(shared_data, tmp_path):
    """The whole reproduction (tiny 'smoke' scale): runs stored, figures and report written, and a
    rerun reuses every stored run."""
    from assocmem.experiments.induction import reproduce
    from assocmem.report import write_report
    path = str(shared_data / "tinyshakespeare" / "input.txt")
    sec = reproduce(tmp_path, "smoke", data_path=path)
    write_report(sec, tmp_path)
    assert (tmp_path / "report.md").exists() and (tmp_path / "runs.parquet").exists()
    assert (tmp_path / "figures" / "ws_hijack_fraction.png").exists()
    assert (tmp_path / "figures" / "ws_lambda_n.png").exists()
    names = [c.name for c in sec.checks()]
    assert any(n.startswith("C-14") for n in names) and any(n.startswith("C-7") for n in names)
    assert any(n.startswith("C-14(b) trained RPE") for n in names) and any(n.startswith("C-13 remedy") for n in names)
    far = [c for c in sec.checks() if c.name.startswith("C-7 pairs only beyond")]
    assert len(far) == 1 and far[0].verdict == "trend holds"     # APE construction collapses, RPE keeps 1.0
    sec2 = reproduce(tmp_path, "smoke", data_path=path)
    assert "0 trained now" in sec2.intro


def test_device_field(spec, shared_data):
    cfg = _cfg(spec, shared_data)
    assert cfg.device == "cpu"
    with pytest.raises(ConfigError, match="device"):
        replace(cfg, device="tpu")
    if not torch.cuda.is_available():
        from assocmem.training import resolve_device
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device(replace(cfg, device="cuda").device)
