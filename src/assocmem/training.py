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
import typing
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
    """The one optimiser of every runner: torch.optim's exact update rules (AdamW, Adam with L2 weight
    decay, SGD with momentum; tests/test_training.py proves them bit-equal) for stacked models.

    - ``params``: tensors, or a dict name -> tensor (names are needed for ``lr_mult``).
    - ``lr_mult``: name -> factor of the learning rate (a parameter group of torch.optim).
    - A parameter whose ``.grad`` is None is skipped, state and step count included, as torch.optim
      does (how a runner freezes a matrix for some steps).
    - ``step(active, masks)``: only members i with ``active[i]`` (leading dim S) change, parameter and
      moments alike, and only entries where ``masks[name]`` (0/1, broadcastable) is 1; the others keep
      their values bit for bit. Updates are elementwise, so members of a stack stay independent.

    Written here rather than taken from ``torch.optim`` because that imports TorchDynamo on first use,
    which costs more than a whole LCA run in every fresh process.
    """

    def __init__(self, params, cfg: OptimConfig, lr_mult: dict[str, float] | None = None):
        named = params.items() if isinstance(params, dict) else ((str(i), p) for i, p in enumerate(params))
        named = [(n, p) for n, p in named if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.cfg = cfg
        self.lr = [cfg.lr * (lr_mult or {}).get(n, 1.0) for n in self.names]
        self.t = [0] * len(self.params)                  # steps taken, per parameter (torch's state["step"])
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if cfg.name != "sgd" else []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None, masks: dict[str, torch.Tensor] | None = None) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in live:
            self.t[i] += 1
        keep = None
        if active is not None or masks:
            keep = {i: self._frozen_part(i, active, masks) for i in live}
            keep = {i: k for i, k in keep.items() if k is not None and bool(k.any())}   # copy only what stays
            old = {i: (self.params[i].clone(), self.m[i].clone(), self.v[i].clone() if self.v else None)
                   for i in keep}
        groups: dict[tuple[float, int], list[int]] = {}
        for i in live:                                   # one foreach call per (lr, step count)
            groups.setdefault((self.lr[i], self.t[i]), []).append(i)
        for (lr, t), idx in groups.items():
            self._update(idx, lr, t)
        for i, k in (keep or {}).items():                # members and rows that must not move
            for now, before in zip((self.params[i], self.m[i], self.v[i] if self.v else None), old[i]):
                if now is not None:
                    now.copy_(torch.where(k, before, now))

    def _frozen_part(self, i: int, active, masks) -> torch.Tensor | None:
        """Bool tensor broadcastable to parameter i: True where it must keep its value (None: nowhere)."""
        p = self.params[i]
        move = None if active is None else active.view(-1, *([1] * (p.dim() - 1)))
        if masks and self.names[i] in masks:
            row = masks[self.names[i]].bool()
            move = row if move is None else move & row
        return None if move is None else ~move

    def _update(self, idx: list[int], lr: float, t: int) -> None:
        cfg = self.cfg
        params = [self.params[i] for i in idx]
        grads = [self.params[i].grad for i in idx]
        m = [self.m[i] for i in idx]
        if cfg.name == "sgd":
            if cfg.weight_decay:
                grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
            if cfg.momentum:
                if t == 1:
                    torch._foreach_copy_(m, grads)
                else:
                    torch._foreach_mul_(m, cfg.momentum)
                    torch._foreach_add_(m, grads)
                grads = m
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        v = [self.v[i] for i in idx]
        b1, b2 = cfg.betas
        if cfg.name == "adamw":
            torch._foreach_mul_(params, 1.0 - lr * cfg.weight_decay)
        elif cfg.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
        step_size = lr / (1.0 - b1 ** t)
        bias2_sqrt = (1.0 - b2 ** t) ** 0.5
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, cfg.eps)
        torch._foreach_addcdiv_(params, m, denom, -step_size)


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


STOP = object()     # returned by a train_step to end training early


def train_loop(steps: int, train_step: Callable[[int], object],
               hooks: Sequence[tuple[int, Callable[[int], object]]] = ()) -> int:
    """The training skeleton of every runner.

    For step = 0, 1, ..., steps: first each hook ``(every, fn)`` due at this step runs ``fn(step)``
    (due: ``step % every == 0`` or the last step; ``every = 0``: the last step only); hooks read the
    model before that step's update (evaluation, probes, logging). Then, unless this is the last step,
    ``train_step(step)`` makes one update and returns the per-member loss [S] (None where the step
    did not compute it), or :data:`STOP` to end early (every member met its stopping rule); each
    update is reported to :func:`step_done`.
    Returns the number of updates made."""
    for step in range(steps + 1):
        for every, fn in hooks:
            if step == steps or (every and step % every == 0):
                fn(step)
        if step == steps:
            return step
        loss = train_step(step)
        if loss is STOP:
            return step
        step_done(step + 1, steps, loss=loss)
    return steps


def make_optimizer(params, cfg: OptimConfig, lr_mult: dict[str, float] | None = None) -> Optimizer:
    """The optimiser every runner uses (:class:`Optimizer`); ``params`` a dict name -> tensor or a list."""
    return Optimizer(params, cfg, lr_mult)


DEVICES = ("cpu", "cuda", "auto")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every task's run config holds besides its task/model/optim(/eval) parts: the seed, the
    random streams derived from it, and the device. Field order does not enter the run id (sorted JSON).

    A task's config subclasses it and declares its parts as fields; the subclass becomes a frozen
    dataclass without a decorator of its own (``__init_subclass__``; type checkers read it as one
    through ``dataclass_transform``)."""
    seed: int = param(0, lo=0)
    seeds: Seeds = dataclasses.field(default_factory=Seeds)
    device: str = param("cpu", choices=DEVICES, help="where the model trains; data are drawn on the CPU")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)


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
