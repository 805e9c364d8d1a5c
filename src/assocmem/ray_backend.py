"""Ray backend for sweeps: each job (a stack of same-shaped runs) is a Ray task.

Results travel back to the driver, which alone writes the run store, so workers need no shared
filesystem and a crashed worker can never leave half a run behind; Ray retries a task whose worker
died (``max_retries``); when the driver stops early (Ctrl-C) the tasks still pending are cancelled.
Install with ``pip install 'assocmem[ray]'``; workers need assocmem installed.

    assocmem sweep grid.yaml --backend ray                  # local Ray, or the cluster in RAY_ADDRESS
    assocmem sweep grid.yaml --backend ray --address HOST:6379
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from .config import ConfigError
from .registry import RunResult
from .sweep import Job, execute_job


def _run_job(job: Job, threads: int) -> list[RunResult]:
    import torch
    torch.set_num_threads(max(1, threads))
    return execute_job(job)


class RayBackend:
    """Run jobs as Ray tasks with declared resources.

    address: a running cluster (``auto``, ``HOST:PORT``) or None for ``RAY_ADDRESS`` / a local
    instance. cpus_per_job: CPUs each task declares (and torch threads it uses). gpus_per_job:
    fractional GPUs (e.g. 0.25 lets four small models share one GPU; set device=cuda in the config).
    """

    def __init__(self, jobs: int | None = None, address: str | None = None, cpus_per_job: float = 1,
                 gpus_per_job: float = 0, max_retries: int = 3):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--backend: ray is not installed (install it with: pip install 'assocmem[ray]')") from None
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.local_cpus = jobs
        self.cpus_per_job, self.gpus_per_job, self.max_retries = cpus_per_job, gpus_per_job, max_retries

    def _connect(self) -> None:
        import ray
        if ray.is_initialized():
            return
        kwargs = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False}
        if self.address:
            ray.init(address=self.address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
        else:
            ray.init(num_cpus=self.local_cpus, **kwargs)

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, list[RunResult]]]:
        if not jobs:
            return
        import ray
        self._connect()
        task = ray.remote(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job,
                          max_retries=self.max_retries, retry_exceptions=False)(_run_job)
        pending = {task.remote(job, int(self.cpus_per_job) or 1): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    results = ray.get(done[0])
                except ray.exceptions.RayError as e:   # retries exhausted: record, keep going
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    results = [RunResult(metrics={}, status="error", error=msg) for _ in job.configs]
                yield job, results
        finally:                 # Ctrl-C or the driver stopped early: do not leave tasks computing
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort; finished or unknown refs
                    pass
