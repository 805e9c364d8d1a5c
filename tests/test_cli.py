import json
import subprocess
import sys

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
