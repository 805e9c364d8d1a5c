"""Shared training pieces: the optimiser config and helpers for stacked (instance-batched) models."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import dataclasses
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from .config import ConfigError, Seeds, param
from .procs import die_with_parent


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings. Constant learning rate, no warm-up, no schedule (the papers' protocol)."""
    name: str = param("adamw", choices=("adamw", "adam", "sgd"))
    lr: float = param(1e-2, lo=1e-8, hi=10.0)
    betas: tuple[float, ...] = param((0.9, 0.99), lo=0.0, hi=0.999999)
    eps: float = param(1e-8, lo=0.0)
    momentum: float = param(0.9, lo=0.0, hi=1.0, help="sgd only")
    weight_decay: float = param(0.01, lo=0.0)
    batch_size: int = param(256, lo=1, hi=1_000_000)
    steps: int = param(500, lo=0, hi=10_000_000)

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: {list(self.betas)} is not allowed (allowed: two numbers in [0, 1))")


class Optimizer:
    """Minimal elementwise optimisers with torch.optim's exact update rules (AdamW, Adam with L2
    weight decay, SGD with momentum). Elementwise updates keep members of a stacked model
    independent. Written here because ``torch.optim`` imports TorchDynamo on first use, which costs
    more than a whole LCA run in every fresh process; tests/test_training.py proves the
    updates equal torch.optim's."""

    def __init__(self, params, cfg: OptimConfig):
        self.params = [p for p in params if p.requires_grad]
        self.cfg = cfg
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if cfg.name != "sgd" else []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        cfg, params = self.cfg, self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.t += 1
        if cfg.name == "sgd":
            if cfg.weight_decay:
                grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
            if cfg.momentum:
                if self.t == 1:
                    torch._foreach_copy_(self.m, grads)
                else:
                    torch._foreach_mul_(self.m, cfg.momentum)
                    torch._foreach_add_(self.m, grads)
                grads = self.m
            torch._foreach_add_(params, grads, alpha=-cfg.lr)
            return
        b1, b2 = cfg.betas
        if cfg.name == "adamw":
            torch._foreach_mul_(params, 1.0 - cfg.lr * cfg.weight_decay)
        elif cfg.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        torch._foreach_lerp_(self.m, grads, 1.0 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1.0 - b2)
        step_size = cfg.lr / (1.0 - b1 ** self.t)
        bias2_sqrt = (1.0 - b2 ** self.t) ** 0.5
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, cfg.eps)
        torch._foreach_addcdiv_(params, self.m, denom, -step_size)


_ON_STEP: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("assocmem_on_step", default=None)


@contextlib.contextmanager
def on_step(callback: Callable[[int, int, dict], None]):
    """While active, every training loop reports each finished step as ``callback(step, total,
    values)``: ``step`` counts from 1, ``total`` is the loop's step budget (a loop may stop earlier),
    ``values`` holds what the loop already has at hand (e.g. ``loss``: a tensor of per-member losses;
    the callback converts it). Forked parts of a run report nothing; their parent reports."""
    token = _ON_STEP.set(callback)
    try:
        yield
    finally:
        _ON_STEP.reset(token)


def step_done(step: int, total: int, **values) -> None:
    """Called by the training loops after each step; costs one context lookup when nothing listens."""
    callback = _ON_STEP.get()
    if callback is not None:
        callback(step, total, values)


def make_optimizer(params, cfg: OptimConfig) -> Optimizer:
    return Optimizer(params, cfg)


DEVICES = ("cpu", "cuda", "auto")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every task's run config holds besides its task/model/optim(/eval) parts: the seed, the
    random streams derived from it, and the device. Field order does not enter the run id (sorted JSON)."""
    seed: int = param(0, lo=0)
    seeds: Seeds = dataclasses.field(default_factory=Seeds)
    device: str = param("cpu", choices=DEVICES, help="where the model trains; data are drawn on the CPU")


def resolve_device(name: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (cuda when available). Random draws always happen on the CPU
    with the run's generators, so a run's data do not depend on the device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda is not available on this machine (allowed here: cpu, auto)")
    return torch.device(name)


def finite_members(*tensors: torch.Tensor) -> torch.Tensor:
    """[S] bool: True where every entry of every tensor (leading dim S) is finite."""
    ok = None
    for t in tensors:
        f = torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1)
        ok = f if ok is None else ok & f
    return ok


def run_split(run_stack: Callable[[Sequence], list], configs: Sequence, *, small: bool = False,
              min_size: int = 2) -> list:
    """Run a stack of same-shaped configs as contiguous parts in parallel, one part per torch
    thread, each part single-threaded inside torch; results in the order of ``configs``.

    Small stacked ops gain little from torch's intra-op threads (their sync costs about as much as the
    work, and on a busy machine a descheduled thread stalls every op), while independent parts of a
    stack keep every core busy. Parts run in forked child processes where the platform can fork
    (threads would serialise on the GIL: a step is ~100 small torch calls) and in threads elsewhere.
    Members are independent, so the results equal one stack's (and each single run's). A stack too
    small to split runs whole: with all torch threads, or with one if ``small`` (tiny models). A sweep
    worker process with one torch thread runs its stack whole.
    """
    threads = torch.get_num_threads()
    n = min(threads, len(configs) // min_size)
    if n < 2 and not small:
        return run_stack(configs)
    torch.set_num_threads(1)          # forked children and new threads start with one torch thread
    try:
        if n < 2:
            return run_stack(configs)
        bounds = [round(i * len(configs) / n) for i in range(n + 1)]
        parts = [configs[a:b] for a, b in zip(bounds, bounds[1:])]
        if not CAN_FORK:
            with cf.ThreadPoolExecutor(n) as pool:
                return [r for part in pool.map(run_stack, parts) for r in part]
        return [r for part in forked_map(run_stack, parts) for r in part]
    finally:
        torch.set_num_threads(threads)


def forked_map(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]`` with items[1:] each computed in a forked child process
    (:class:`ForkedCall`) while this process computes items[0]; the children are killed if that
    fails. Linux only (``CAN_FORK``); callers set torch to one thread first."""
    children = [ForkedCall(fn, item) for item in items[1:]]
    try:
        first = fn(items[0])
    except BaseException:
        for child in children:
            child.kill()
        raise
    return [first] + [child.result() for child in children]


CAN_FORK = sys.platform.startswith("linux")     # fork with torch loaded is safe on Linux; elsewhere threads


class ForkedCall:
    """``fn(arg)`` computed in a forked child process; :meth:`result` waits for it.

    The child inherits the parent's memory (no re-import, no pickled inputs) and sends back only the
    pickled result through a pipe; an exception in the child is raised again in the parent as a
    RuntimeError carrying the child's traceback. Used for CPU-bound torch work only, after
    ``torch.set_num_threads(1)``, as PyTorch's own DataLoader workers do.
    """

    def __init__(self, fn: Callable, arg):
        r, w = os.pipe()
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:                              # child: compute, write, exit without cleanup
            code = 1
            try:
                die_with_parent(parent, watchdog=False)    # killed with its parent, kill -9 included
                os.close(r)
                _ON_STEP.set(None)                         # the parent reports progress, not its parts
                try:
                    payload = pickle.dumps((True, fn(arg)), protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    payload = pickle.dumps((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                with os.fdopen(w, "wb") as f:
                    f.write(payload)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.fd = r

    def result(self):
        with os.fdopen(self.fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        if not data:
            raise RuntimeError(f"child process {self.pid} ended without a result (wait status {status})")
        ok, value = pickle.loads(data)
        if not ok:
            raise RuntimeError(f"in child process {self.pid}: {value}")
        return value

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
