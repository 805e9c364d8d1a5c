"""The Ray backend on a real local cluster (head + one worker node, started with `ray start`):
same run ids and metrics as the local backend, and a worker crash is retried without duplicates."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray not installed (pip install 'assocmem[ray]')")

from assocmem.registry import run_id  # noqa: E402
from assocmem.registry import TASKS  # noqa: E402
from assocmem.store import RunStore  # noqa: E402
from assocmem.sweep import expand_grid, run_configs  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = {"task.m": 3, "task.L": 8, "model.d_model": 8, "optim.steps": 10, "optim.batch_size": 16,
         "eval.n_eval": 64}

CRASHY = '''
import os
from pathlib import Path
from assocmem.runners import lca

def run_stack(configs):
    marker = Path(os.environ["ASSOCMEM_CRASH_MARKER"]) / f"{configs[0].task.L}-{configs[0].seed}"
    if configs[0].seed == 1 and not marker.exists():
        marker.write_text("crashed once")
        os._exit(1)          # the worker process dies mid-job, as if killed
    return lca.run_stack(configs)

import dataclasses
SPEC = dataclasses.replace(lca.SPEC, name="crashy", run_stack=run_stack)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "mods").mkdir()
    (tmp / "mods" / "crashy_task.py").write_text(textwrap.dedent(CRASHY))
    (tmp / "markers").mkdir()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "PYTHONPATH": f"{tmp / 'mods'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ASSOCMEM_CRASH_MARKER": str(tmp / "markers"), "RAY_USAGE_STATS_ENABLED": "0",
           # Ray >= 2.5x writes ~/.ray/auth_token on a local ray.init(); with that file present, a
           # worker node cannot join a head started by `ray start` unless auth is off explicitly
           "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--num-cpus=1", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        subprocess.run([ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True)
        os.environ["ASSOCMEM_CRASH_MARKER"] = str(tmp / "markers")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        sys.path.insert(0, str(tmp / "mods"))
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
        sys.path.remove(str(tmp / "mods")) if str(tmp / "mods") in sys.path else None


def test_ray_matches_local_and_survives_a_worker_crash(cluster, tmp_path, monkeypatch):
    from assocmem.ray_backend import RayBackend
    task, cfgs = expand_grid({"task": "lca", "base": SMALL, "grid": {"seed": [0, 1, 2], "task.L": [8, 12]}})
    local, remote = RunStore(tmp_path / "local"), RunStore(tmp_path / "ray")
    run_configs(task, cfgs, local, progress=False)
    backend = RayBackend(address=cluster)
    rep = run_configs(task, cfgs, remote, backend=backend, progress=False)
    assert rep.failed == 0
    assert ray.cluster_resources().get("CPU", 0) >= 2          # head + worker node
    assert local.run_ids() == remote.run_ids() == sorted(run_id(task, c) for c in cfgs)
    for rid in local.run_ids():
        assert local.load(rid)["metrics"]["accuracy"] == remote.load(rid)["metrics"]["accuracy"]

    # a worker dies mid-job (seed 1): Ray retries it, the grid completes, nothing duplicated
    monkeypatch.setitem(TASKS, "crashy", "crashy_task:SPEC")
    from crashy_task import SPEC as crashy
    cfgs_c = [c for c in cfgs]
    store = RunStore(tmp_path / "crash")
    rep = run_configs(crashy, cfgs_c, store, backend=backend, stack=False, progress=False)
    assert rep.failed == 0 and rep.ran == 6
    markers = list(Path(os.environ["ASSOCMEM_CRASH_MARKER"]).iterdir())
    assert markers, "the injected crash did not happen"
    ids = store.run_ids()
    assert len(ids) == 6 and all(store.load(r)["status"] == "ok" for r in ids)
    assert not [p for p in (tmp_path / "crash" / "runs").iterdir() if p.name.startswith(".")]
