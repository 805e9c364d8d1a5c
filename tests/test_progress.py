"""Progress of a single long run: every training loop reports its steps through training.on_step, and
``assocmem run`` shows them as a bar on a terminal's stderr while its stdout stays as it was."""
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
import torch

from assocmem.registry import get_task
from assocmem.training import on_step, step_done

from test_protocol import TINY, _config


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_training_loop_reports_every_step_once(name, request):
    seen = []
    with on_step(lambda step, total, values: seen.append((step, total, values.get("loss")))):
        result = get_task(name).run(_config(name, request))
    assert result.status == "ok"
    steps = [s for s, _, _ in seen]
    total = seen[0][1]
    assert steps == list(range(1, len(steps) + 1))            # in order, each once (forked parts silent)
    if name == "geometric":                                    # may stop early at 100% accuracy
        assert total == TINY[name]["optim"]["max_steps"] and 1 <= len(steps) <= total
    else:
        assert total == len(steps) == TINY[name]["optim"]["steps"]
    losses = [v for _, _, v in seen if v is not None]
    assert losses and all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in losses)


def test_nothing_listens_outside_the_block():
    calls = []
    with on_step(lambda *a: calls.append(a)):
        step_done(1, 2)
    step_done(2, 2)
    assert calls == [(1, 2, {})]


@pytest.mark.slow
def test_assocmem_run_draws_a_bar_on_a_terminal_and_keeps_json_stdout(tmp_path, shared_data):
    data = shared_data / "tinyshakespeare" / "input.txt"
    argv = [sys.executable, "-m", "assocmem.cli", "run", "induction", f"task.data_path={data}", "task.T=32",
            "model.d_model=16", "model.n_ctx=64", "optim.batch=4", "optim.steps=40", "eval.batch=4",
            "eval.T_test=[64]", "eval.long_batch=2", "--out", str(tmp_path), "--json"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a terminal 100 columns wide
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    os.close(slave)
    err = b""
    while True:                                   # drain the terminal until the child closes it
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:                           # EIO: the child exited
            break
        if not chunk:
            break
        err += chunk
    out, _ = p.communicate(timeout=120)
    os.close(master)
    assert p.returncode == 0, err.decode(errors="replace")
    text = err.decode(errors="replace")
    assert "train" in text and "40/40" in text and "step" in text
    last = json.loads(out.strip().splitlines()[-1])            # --json: the last stdout line is the record
    assert last["task"] == "induction" and last["status"] == "ok" and not last["skipped"]
    # stderr not a terminal: no bar at all
    r = subprocess.run(argv[:-3] + ["--out", str(tmp_path / "b"), "--json"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and "40/40" not in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "ok"
