import json
import os
import subprocess
import sys

import pytest
import yaml

from assocmem.cli import main

SMALL = ["task.m=3", "task.L=8", "model.d_model=8", "optim.steps=5", "optim.batch_size=16", "eval.n_eval=64"]


def test_run_json_then_skip_then_force(tmp_path, capsys):
    args = ["run", "lca", *SMALL, "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"run_id", "accuracy", "wall_s"} <= set(first) and not first["skipped"]
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["skipped"] and second["run_id"] == first["run_id"] and second["accuracy"] == first["accuracy"]
    assert main(args + ["--force"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not third["skipped"] and third["accuracy"] == first["accuracy"]


def test_bad_input_exits_2_with_one_line():
    for bad, needle in [("task.m=99", "task.m"), ("model.nope=1", "model.nope")]:
        p = subprocess.run([sys.executable, "-m", "assocmem.cli", "run", "lca", bad], capture_output=True, text=True)
        assert p.returncode == 2
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "allowed" in lines[0]


def test_sweep_and_runs_listing(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"task": "lca", "base": dict(s.split("=") for s in SMALL),
                                    "grid": {"seed": [0, 1], "task.L": [8, 16]}}))
    # values from the dict above are strings; the YAML round trip must still validate as ints
    grid.write_text(grid.read_text().replace("'", ""))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 4 ran" in out and "task.L" in out
    assert main(["runs", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "4 runs in" in out and "accuracy" in out
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2


def _grid(path, **grid):
    path.write_text(yaml.safe_dump({"task": "lca", "base": {k: yaml.safe_load(v) for k, v in
                                                            (s.split("=") for s in SMALL)},
                                    "grid": grid or {"seed": [0, 1]}}))
    return str(path)


def _bad_inputs(tmp):
    """name -> argv; each must exit 2 with one line naming the problem, before any training."""
    (tmp / "latin1.yaml").write_bytes(b"task: {m: 3}\n# caf\xe9\n")
    (tmp / "folder").mkdir()
    (tmp / "a_file").write_text("x")
    g = _grid(tmp / "g.yaml")
    out = str(tmp / "o")
    return {
        "config not UTF-8": (["run", "lca", "--config", str(tmp / "latin1.yaml"), "--out", out], "UTF-8"),
        "config a folder": (["run", "lca", "--config", str(tmp / "folder"), "--out", out], "folder"),
        "grid value empty list": (["sweep", _grid(tmp / "e.yaml", **{"task.m": []}), "--out", out], "task.m"),
        "grid not UTF-8": (["sweep", str(tmp / "latin1.yaml"), "--out", out], "UTF-8"),
        "grid a folder": (["sweep", str(tmp / "folder"), "--out", out], "folder"),
        "sweep --out a file": (["sweep", g, "--out", str(tmp / "a_file")], "a_file"),
        "run --out a file": (["run", "lca", *SMALL, "--out", str(tmp / "a_file")], "a_file"),
        "run --out empty": (["run", "lca", *SMALL, "--out", ""], "--out"),
        "sweep --out empty": (["sweep", g, "--out", ""], "--out"),
        "override of a grid key": (["sweep", g, "seed=3", "--out", out], "seed"),
        "duplicate key": (["run", "lca", *SMALL, "task.m=4", "--out", out], "task.m"),
        "sweep --jobs 0": (["sweep", g, "--jobs", "0", "--out", out], "--jobs"),
        "reproduce --jobs 0": (["reproduce", "elephants", "--jobs", "0", "--out", out], "--jobs"),
        "reproduce --out a file": (["reproduce", "elephants", "--out", str(tmp / "a_file")], "a_file"),
        "device cuda": (["run", "lca", *SMALL, "device=cuda", "--out", out], "device"),
    }


@pytest.mark.parametrize("case", [
    "config not UTF-8", "config a folder", "grid value empty list", "grid not UTF-8", "grid a folder",
    "sweep --out a file", "run --out a file", "run --out empty", "sweep --out empty", "override of a grid key",
    "duplicate key", "sweep --jobs 0", "reproduce --jobs 0", "reproduce --out a file", "device cuda"])
def test_each_bad_input_exits_2_with_one_line_before_training(tmp_path, capsys, case):
    if case == "device cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    argv, needle = _bad_inputs(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("assocmem: error: ") and needle in err[0], err
    assert not (tmp_path / "o" / "runs").exists() and not (tmp_path / "o" / "runs.parquet").exists()


def test_config_file_accepts_dotted_keys(tmp_path, capsys):
    nested, dotted = tmp_path / "n.yaml", tmp_path / "d.yaml"
    nested.write_text("task: {m: 3, L: 8}\nmodel: {d_model: 8}\noptim: {steps: 5, batch_size: 16}\neval: {n_eval: 64}\n")
    dotted.write_text("task.m: 3\ntask.L: 8\nmodel.d_model: 8\noptim: {steps: 5}\noptim.batch_size: 16\neval.n_eval: 64\n")
    ids = []
    for f in (nested, dotted):
        assert main(["run", "lca", "--config", str(f), "--out", str(tmp_path / "o"), "--json"]) == 0
        ids.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"])
    assert ids[0] == ids[1]


def test_runs_check_and_read_only_store(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "lca", *SMALL, "--out", str(out), "--json"]) == 0
    rid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"]
    assert main(["runs", "--check", "--out", str(out)]) == 0
    assert "no damaged runs" in capsys.readouterr().out
    os.chmod(out / "runs", 0o555)
    os.chmod(out, 0o555)
    try:            # (root can write anyway; the listing and the served result must work either way)
        assert main(["runs", "--out", str(out)]) == 0           # reads the folders of a read-only store
        assert "1 runs in" in capsys.readouterr().out
        assert main(["run", "lca", *SMALL, "--out", str(out), "--json"]) == 0    # served, not rewritten
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"]
    finally:
        os.chmod(out, 0o755)
        os.chmod(out / "runs", 0o755)
    m = out / "runs" / rid / "metrics.json"
    m.write_text(m.read_text()[:20])                            # truncated
    assert main(["runs", "--check", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{rid}: ") and "1 damaged run" in lines[-1]


def test_ctrl_c_message_is_truthful(monkeypatch, capsys):
    import assocmem.cli as cli
    from assocmem.sweep import Interrupted

    def interrupted(args):
        raise Interrupted(3, 60)

    def bare(args):
        raise KeyboardInterrupt

    for fn, expect in ((interrupted, "assocmem: interrupted: stored 3 of 60 runs; rerun to continue"),
                       (bare, "assocmem: interrupted")):
        monkeypatch.setattr(cli, "_cmd_runs", fn)
        assert cli.main(["runs"]) == 130
        assert capsys.readouterr().err.strip() == expect


def test_reproduce_passes_the_backend_explicitly(tmp_path, monkeypatch, capsys):
    import types

    import assocmem.cli as cli
    import assocmem.sweep as sweep
    seen = {}

    from assocmem.findings import Section as RealSection

    def Section():
        return RealSection("fake", "Fake")

    def with_backend(out_dir, scale, jobs, force, backend=None):
        seen["with"] = (jobs, backend)
        return Section()

    def without_backend(out_dir, scale, jobs, force):           # e.g. hijack: trains nothing
        seen["without"] = jobs
        return Section()
    mod = types.ModuleType("fake_repro")
    mod.a, mod.b = with_backend, without_backend
    monkeypatch.setitem(sys.modules, "fake_repro", mod)
    monkeypatch.setattr(cli, "REPRODUCTIONS", {"a": "fake_repro:a", "b": "fake_repro:b"})
    import assocmem.report as report
    monkeypatch.setattr(report, "write_index", lambda entries, out: out / "index.html")
    monkeypatch.setattr(sweep, "make_backend", lambda name, **kw: ("backend", name, kw))
    assert cli.main(["reproduce", "all", "--backend", "ray", "--jobs", "3", "--out", str(tmp_path)]) == 0
    assert seen == {"with": (3, ("backend", "ray", {"jobs": 3, "address": None})), "without": 3}
    assert not hasattr(sweep, "override_backend")
    assert cli.main(["reproduce", "a", "--out", str(tmp_path)]) == 0
    assert seen["with"] == (None, None)                          # local: the experiment builds its own


def test_reproduce_hijack_takes_the_model_options(tmp_path, monkeypatch, capsys):
    """``assocmem reproduce hijack --models ... --device ... --dtype ... --n 0`` reaches the experiment
    exactly as ``assocmem hijack reproduce`` does; bad values exit 2 before any work."""
    import assocmem.experiments.hijack as exp
    seen = []

    from assocmem.findings import Section as RealSection

    def Section():
        return RealSection("fake", "Fake")

    monkeypatch.setattr(exp, "reproduce", lambda out_dir, scale, force, **kw: seen.append(kw) or Section())
    argv = ["--models", "gpt2,google/gemma-2b", "--device", "cpu", "--dtype", "bfloat16", "--n", "0",
            "--k", "0,2", "--batch-tokens", "512", "--out", str(tmp_path)]
    assert main(["reproduce", "hijack", *argv]) == 0
    assert main(["hijack", "reproduce", *argv]) == 0
    assert seen[0] == seen[1] == {"n": 0, "models": ["gpt2", "google/gemma-2b"], "ks": [0, 2], "chunk": None,
                                  "batch_tokens": 512, "device": "cpu", "dtype": "bfloat16", "device_map": None,
                                  "revision": None, "attn_implementation": None}
    capsys.readouterr()
    assert main(["reproduce", "hijack", "--n", "-1", "--out", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and len(seen) == 2


def test_listing_into_a_closed_pipe_is_quiet(tmp_path):
    """``assocmem runs | head -1``: no traceback when the reader leaves early."""
    for seed in range(3):
        assert main(["run", "lca", f"seed={seed}", "optim.steps=2", "--out", str(tmp_path), "--json"]) == 0
    r, w = os.pipe()
    os.close(r)                          # the reader is gone before we write
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "assocmem.cli", "runs", "--out", str(tmp_path)], stdout=w,
                       stderr=subprocess.PIPE, text=True, env=env)
    os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr
