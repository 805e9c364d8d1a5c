"""LCA runs: config, training and evaluation, as a pure function of the config.

Protocol (Jiang et al., authors' code): AdamW (0.9, 0.99), eps 1e-8, weight decay 0.01, constant
LR, batch 256, 500 steps, a fresh batch every step; cross-entropy at the last position only.
Evaluation: ``eval.n_eval`` (default 4096) fresh sequences from the evaluation seed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, param
from ..models.lca import LCAModel
from ..registry import RunResult, TaskSpec
from ..tasks.lca import LCATask, counts, task_for
from ..training import OptimConfig, RunConfig, finite_members, make_optimizer, resolve_device, run_split, train_loop


@dataclasses.dataclass(frozen=True)
class LCATaskConfig:
    m: int = param(6, lo=2, hi=10, help="latent bits; vocabulary 2^m + 1")
    L: int = param(64, lo=2, hi=8192, help="context length (the last position is the query)")
    beta: float = param(1.0, lo=1e-3, hi=1e3, help="temperature of p(z|t) ~ exp(-D_H/beta)")
    rho: float = param(0.5, lo=0.0, hi=1.0, help="probability that a context position is informative")
    cluster: int = param(0, lo=0, hi=9, help="c: 0 = standard; c > 0 keeps t's first c bits")

    def validate(self) -> None:
        if self.cluster >= self.m:
            raise ConfigError(f"task.cluster: {self.cluster} is not allowed (allowed: 0 <= c < task.m={self.m})")


@dataclasses.dataclass(frozen=True)
class LCAModelConfig:
    d_model: int = param(64, lo=1, hi=8192)
    W_V: str = param("trained", choices=("trained", "identity"))
    embeddings: str = param("trained", choices=("trained", "frozen"))
    attention: str = param("learned", choices=("learned", "uniform"))
    path: str = param("count", choices=("count", "plain"), help="exact count-based or plain forward")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    n_eval: int = param(4096, lo=1, hi=10_000_000)
    chunk: int = param(4096, lo=1, hi=1_000_000)


class LCAConfig(RunConfig):
    """One LCA run (specs/lca.md): the task (m, L, beta, rho, clusters), the one-layer model, AdamW, evaluation."""
    task: LCATaskConfig = dataclasses.field(default_factory=LCATaskConfig)
    model: LCAModelConfig = dataclasses.field(default_factory=LCAModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def make_task(cfg: LCAConfig) -> LCATask:
    t = cfg.task
    return task_for(t.m, t.L, t.beta, t.rho, t.cluster)


def init_model(cfg: LCAConfig, generators: list[torch.Generator]) -> LCAModel:
    return LCAModel.init(len(generators), 2 ** cfg.task.m + 1, cfg.model.d_model, generators,
                         identity_W_V=cfg.model.W_V == "identity",
                         train_embeddings=cfg.model.embeddings == "trained",
                         uniform_attention=cfg.model.attention == "uniform")


def model_from_weights(cfg: LCAConfig, weights: Sequence[dict[str, torch.Tensor]]) -> LCAModel:
    """Rebuild a stacked model from stored per-run weights (as saved by :func:`run_stack`)."""
    stack = lambda k: torch.stack([w[k] for w in weights])  # noqa: E731
    return LCAModel(stack("W_E"), stack("W_Q"), stack("W_K"),
                    stack("W_V") if "W_V" in weights[0] else None,
                    train_embeddings=False, uniform_attention=cfg.model.attention == "uniform")


def sample_stack(task: LCATask, batch: int, generators: list[torch.Generator],
                 device: torch.device | str = "cpu"):
    """One batch per instance from its own generator: x [S, B, L], t [S, B] (drawn on the CPU)."""
    words = torch.empty(len(generators), task.n_words(batch), dtype=torch.long)
    for w, g in zip(words, generators):
        task.draw(batch, g, out=w)
    x, t = task.decode(words, batch, generators)
    return x.to(device), t.to(device)


def sample_counts(task: LCATask, batch: int, generators: list[torch.Generator],
                  device: torch.device | str = "cpu"):
    """The same draws as :func:`sample_stack`, reduced to what the count path needs:
    float counts of the V real tokens [S, B, V], query ids [S, B], targets [S, B]."""
    x, t = sample_stack(task, batch, generators)
    return counts(x, task.V).to(device), x[..., -1].to(device), t.to(device)


DRAW_BLOCK = 2   # training steps drawn together: fewer ops per step; larger blocks fall out of cache


def count_batches(task: LCATask, batch: int, generators: list[torch.Generator], steps: int,
                  device: torch.device | str = "cpu"):
    """Training batches of the count path for ``steps`` steps: yields (counts, last, t) per step.
    Batches are drawn ``DRAW_BLOCK`` steps at a time (one draw of block x batch sequences per
    instance), so a run's data depend on the block size but never on the stack it trains in."""
    for start in range(0, steps, DRAW_BLOCK):
        n = min(DRAW_BLOCK, steps - start)
        c, last, t = sample_counts(task, n * batch, generators, device)
        for i in range(0, n * batch, batch):
            yield c[:, i:i + batch], last[:, i:i + batch], t[:, i:i + batch]


def logits_and_targets(model: LCAModel, task: LCATask, batch: int, generators: list[torch.Generator],
                       path: str):
    """Draw a batch per instance and run the model on it: (logits [S, B, V+1], targets [S, B])."""
    device = model.W_E.device
    if path == "plain":
        x, t = sample_stack(task, batch, generators, device)
        return model.forward_plain(x), t
    c, last, t = sample_counts(task, batch, generators, device)
    return model.forward_counts(c, last), t


@torch.no_grad()
def accuracy_and_loss(model: LCAModel, task: LCATask, generators: list[torch.Generator], n: int,
             chunk: int = 4096, path: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance accuracy and mean cross-entropy on n fresh sequences: ([S], [S])."""
    device = model.W_E.device
    hits = torch.zeros(model.S, device=device)
    loss = torch.zeros(model.S, dtype=torch.float64, device=device)
    done = 0
    while done < n:
        b = min(chunk, n - done)
        logits, t = logits_and_targets(model, task, b, generators, path)
        hits += (logits.argmax(-1) == t).sum(1)
        loss += F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none").view(model.S, b).double().sum(1)
        done += b
    return (hits / n).cpu(), (loss / n).float().cpu()


def run_stack(configs: Sequence[LCAConfig]) -> list[RunResult]:
    """Train S same-shaped configs (differing only in seeds) as one stacked model; on the CPU with
    several torch threads, as parallel parts, and tiny models single-threaded
    (:func:`~assocmem.training.run_split`)."""
    cfg = configs[0]
    if resolve_device(cfg.device).type == "cpu":
        V1 = 2 ** cfg.task.m + 1          # per-member multiply-adds of one step's largest product
        small = cfg.optim.batch_size * V1 * max(V1, cfg.model.d_model) < 2 ** 24
        return run_split(_run_stack, configs, small=small)
    return _run_stack(configs)


def _run_stack(configs: Sequence[LCAConfig]) -> list[RunResult]:
    cfg = configs[0]
    seeds = [c.seeds.resolve(c.seed) for c in configs]
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    task = make_task(cfg)
    device = resolve_device(cfg.device)
    model = init_model(cfg, [gen(s.init) for s in seeds]).to(device)
    train_g = [gen(s.train) for s in seeds]
    opt = make_optimizer(model.parameters(), cfg.optim) if cfg.optim.steps else None
    S, B = len(configs), cfg.optim.batch_size
    recent = torch.zeros(S, device=device)
    batches = count_batches(task, B, train_g, cfg.optim.steps, device) if cfg.model.path == "count" else None

    def train_step(step: int) -> torch.Tensor:
        opt.zero_grad()
        tail = step >= cfg.optim.steps - 20              # the reported train loss averages these steps
        if batches is not None:              # hand-written gradients, equal to autograd's (tested)
            loss = model.count_loss_backward(*next(batches), need_loss=tail)
        else:
            x, t = sample_stack(task, B, train_g, device)
            loss = F.cross_entropy(model.forward_plain(x).flatten(0, 1), t.flatten(), reduction="none")
            loss = loss.view(S, B).mean(1)
            loss.sum().backward()
        opt.step()
        if tail:
            recent.add_(loss.detach() / min(20, cfg.optim.steps))
        return loss                          # the count path computes it only in the tail

    train_loop(cfg.optim.steps, train_step)
    ok = finite_members(recent[:, None], *(p for p in model.parameters()))
    acc, eval_loss = accuracy_and_loss(model, task, [gen(s.eval) for s in seeds], cfg.eval.n_eval, cfg.eval.chunk,
                              cfg.model.path)
    results = []
    for i in range(S):
        weights = {name: p[i].detach().cpu().clone() for name, p in model.named_parameters()}
        metrics = {"accuracy": float(acc[i]), "eval_loss": float(eval_loss[i]),
                   "train_loss": float(recent[i]), "n_eval": cfg.eval.n_eval, "steps": cfg.optim.steps}
        status = "ok" if bool(ok[i]) else "diverged"
        results.append(RunResult(metrics, weights, status, None if status == "ok" else "non-finite loss or weights"))
    return results


# Code-protocol version of this task: part of every run id (registry.run_id). Bump it with any change
# to this task's code (runner, model, task data, training) that alters results for the same config.
PROTOCOL = "lca-1"

SPEC = TaskSpec(
    name="lca",
    protocol=PROTOCOL,
    config_cls=LCAConfig,
    run_stack=run_stack,
    summary_keys=("task.m", "task.L", "task.cluster", "model.d_model", "model.W_V", "model.embeddings",
                  "optim.lr", "seed"),
    description="latent concept association, one-layer attention-only model (Jiang et al. 2024)",
)
