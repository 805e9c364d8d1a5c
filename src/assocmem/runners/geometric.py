"""Runner for geometric factual recall: configs, stacked full-batch training, ``SPEC``.

A run: draw R bijections (``task`` stream), enumerate every query, initialise a one-layer transformer
(``init`` stream), train it full batch with AdamW on all facts until every fact is right (or the loss
is below ``optim.stop_loss``, or ``optim.max_steps``), and report accuracy, margins and curves.

Configs equal up to their seeds train as one :class:`StackedTransformer` (leading instance dim S). The
loss is the sum of per-instance mean losses, so gradients never mix; AdamW (``training.Optimizer``)
steps only the active instances, so an instance freezes the step it meets its stopping rule and
member i of a stack equals the single run with seed i (tested).

Defaults are [ours] (spec geometric.md, Training): d_model 32, m = 4*d, 1 head, no LayerNorm, untied
learned W_E and W_U, AdamW lr 3e-3, betas (0.9, 0.999), wd 0, at most 4000 full-batch steps, stop at
100% accuracy.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, Seeds, param
from ..models.geometric import WEIGHT_NAMES, StackedTransformer, unembed_cross_entropy
from ..registry import RunResult, TaskSpec
from ..training import STOP, OptimConfig, RunConfig, make_optimizer, resolve_device, run_split, train_loop
from ..tasks.geometric import GeoData, draw_bijections, information_bits, multi_hop, single_hop
from ..theory.geometric import recall_metrics


@dataclasses.dataclass(frozen=True)
class TaskCfg:
    N: int = param(1024, lo=2, hi=65536, help="number of subjects (= attributes per relation)")
    R: int = param(4, lo=1, hi=64, help="number of relations (bijections)")
    format: str = param("sr", choices=("sr", "rs", "noise", "slots"),
                        help="single hop [s, r] / [r, s] / noise tokens; slots = multi-hop slot format")
    k: int = param(1, lo=1, hi=8, help="hops per query (slots format)")
    K: int = param(0, lo=0, hi=8, help="relation slots (0 = k)")
    cot: bool = param(False, help="teacher-forced chain of thought (slots format)")
    T: int = param(8, lo=3, hi=64, help="sequence length of the noise format")
    n_noise: int = param(32, lo=1, hi=100000, help="noise vocabulary size (noise format)")
    disjoint: bool = param(False, help="each relation owns its own N answers (output head R*N)")

    @property
    def slots(self) -> int:
        return self.K or self.k

    def validate(self) -> None:
        if self.format != "slots" and (self.k != 1 or self.cot):
            raise ConfigError(f"task.format: {self.format!r} is single hop (allowed with k > 1 or cot: slots)")
        if self.K and self.K < self.k:
            raise ConfigError(f"task.K: {self.K} is not allowed (allowed: 0 or >= task.k={self.k})")
        if self.disjoint and self.format == "slots":
            raise ConfigError("task.disjoint: true is not allowed with format slots (allowed: false)")


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    d_model: int = param(32, lo=1, hi=4096)
    d_mlp: int = param(0, lo=0, hi=65536, help="MLP width m (0 = mlp_mult * d_model)")
    mlp_mult: float = param(4.0, lo=0.0, hi=64.0)
    n_heads: int = param(1, lo=1, hi=16)
    d_head: int = param(0, lo=0, hi=4096, help="head width (0 = ceil(d_model / n_heads))")
    layernorm: bool = param(False, help="pre-LN (no affine parameters)")
    freeze_embed: bool = param(False, help="frozen random W_E and W_pos (control i)")
    freeze_unembed: bool = param(False, help="frozen random W_U (controls i and ii)")
    emb_std: float = param(0.0, lo=0.0, hi=10.0, help="init std of W_E, W_pos, W_U (0 = 1/sqrt(d))")
    w2_scale: float = param(0.1, lo=0.0, hi=10.0)

    @property
    def m(self) -> int:
        return self.d_mlp or max(1, int(round(self.mlp_mult * self.d_model)))

    @property
    def head_dim(self) -> int:
        return self.d_head or math.ceil(self.d_model / self.n_heads)


@dataclasses.dataclass(frozen=True)
class OptimCfg:
    lr: float = param(3e-3, lo=0.0, hi=10.0)
    beta1: float = param(0.9, lo=0.0, hi=1.0)
    beta2: float = param(0.999, lo=0.0, hi=1.0)
    eps: float = param(1e-8, lo=0.0, hi=1.0)
    weight_decay: float = param(0.0, lo=0.0, hi=1.0)
    max_steps: int = param(4000, lo=0, hi=1_000_000)
    stop: str = param("acc", choices=("acc", "loss", "none"),
                      help="acc: stop at 100% accuracy; loss: stop once loss < stop_loss; none: run max_steps")
    stop_loss: float = param(1e-3, lo=0.0, hi=10.0)
    log_every: int = param(50, lo=1, hi=100000)
    check_every: int = param(5, lo=1, hi=10000, help="steps between checks of the stopping rule")
    patience: int = param(0, lo=0, hi=1_000_000,
                          help="stop an instance whose best accuracy has not improved for this many steps (0 = off)")


class GeoConfig(RunConfig):
    """One geometric-recall run (specs/geometric.md): facts, model, masked AdamW with its stopping rule."""
    task: TaskCfg = dataclasses.field(default_factory=TaskCfg)
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    optim: OptimCfg = dataclasses.field(default_factory=OptimCfg)


# ---- data -----------------------------------------------------------------------------------------
def make_data(cfg: GeoConfig, seeds: Seeds) -> GeoData:
    """The run's dataset from its ``task`` stream (bijections first, then noise positions)."""
    t = cfg.task
    gen = torch.Generator().manual_seed(seeds.task)
    bij = draw_bijections(t.N, t.R, gen)
    if t.format == "slots":
        return multi_hop(bij, t.k, t.slots, t.cot)
    return single_hop(bij, t.format, t.disjoint, t.n_noise, t.T, gen)


def build_model(cfg: GeoConfig, S: int, data: GeoData) -> StackedTransformer:
    mc = cfg.model
    L = data.tokens.shape[1]
    return StackedTransformer(S, data.vocab.size, L, mc.d_model, mc.n_heads, mc.head_dim, mc.m,
                              data.vocab.n_out, mc.layernorm)


# ---- optimisation -----------------------------------------------------------------------------------
def per_instance_loss(logits: Tensor, targets: Tensor, with_acc: bool = True) -> tuple[Tensor, Tensor | None]:
    """Mean cross-entropy and accuracy per instance over positions with a target.

    logits [S, B, P, n_out], targets [S, B, P] (IGNORE = -1) -> ([S], [S] or None).
    """
    S, n_out = logits.shape[0], logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, n_out), targets.reshape(-1).clamp_min(0), reduction="none")
    mask = (targets >= 0).reshape(S, -1).float()
    ce = ce.reshape(S, -1)
    cnt = mask.sum(1)
    if not with_acc:
        return (ce * mask).sum(1) / cnt, None
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).reshape(S, -1).float() * mask
    return (ce * mask).sum(1) / cnt, correct.sum(1) / cnt


def fused_instance_loss(model: StackedTransformer, tokens: Tensor, targets: Tensor, out_pos: tuple[int, int],
                        with_acc: bool = True) -> tuple[Tensor, Tensor | None]:
    """Same as ``per_instance_loss(model(tokens, out_pos), targets)`` via the fused unembedding
    cross-entropy (fewer passes over the [S, B, n_out] logits). targets [S, B, P] -> ([S], [S] or None)."""
    z = model.final_residual(tokens, out_pos)
    if model.layernorm:
        z = F.layer_norm(z, z.shape[-1:])
    S = z.shape[0]
    tg = targets.expand(S, *targets.shape[-2:]).reshape(S, -1)
    loss, correct = unembed_cross_entropy(z.reshape(S, -1, z.shape[-1]), model.W_U, tg, with_acc)
    cnt = (tg >= 0).sum(1)
    return loss.sum(1) / cnt, (None if correct is None else (correct & (tg >= 0)).sum(1) / cnt)


def train(model: StackedTransformer, tokens: Tensor, targets: Tensor, out_pos: tuple[int, int], o: OptimCfg,
          trainable: Sequence[str], masks: dict[str, Tensor] | None = None, fused: bool = True) -> dict[str, object]:
    """Full-batch masked AdamW on all queries; instance i stops the step it meets the stopping rule.

    ``fused`` computes the loss with :func:`fused_instance_loss` (tested equal to the plain
    ``model(...)`` + :func:`per_instance_loss` path; 1.3x less CPU per step at N = 4096, d = 16).

    tokens [S, B, T] (or [B, T]); targets [S, B, T]. Returns per-instance lists: steps, final loss and
    accuracy, diverged flags, and curves (loss/accuracy every ``o.log_every`` steps).
    """
    S = model.S
    device = model.W_E.device
    tg = targets[..., out_pos[0]:out_pos[1]]
    params = {n: getattr(model, n) for n in trainable}
    for n in WEIGHT_NAMES:
        getattr(model, n).requires_grad_(n in params)
    opt = make_optimizer(params, OptimConfig(name="adamw", lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                             weight_decay=o.weight_decay))
    active = torch.ones(S, dtype=torch.bool, device=device)
    steps = [o.max_steps] * S
    final_loss, final_acc = [math.nan] * S, [0.0] * S
    diverged = [False] * S
    curve_step: list[int] = []
    curve_loss: list[list[float]] = []
    curve_acc: list[list[float]] = []
    best = [-1.0] * S
    best_step = [0] * S

    def measure(step: int) -> Tensor:
        """The loss [S] at this step; logs it, and applies the stopping rule every ``check_every`` steps
        and at the last step (which stops every instance still active)."""
        check = step % o.check_every == 0 or step == o.max_steps
        log = step % o.log_every == 0 or step == o.max_steps
        if fused:
            loss, acc = fused_instance_loss(model, tokens, tg, out_pos, with_acc=check or log)
        else:
            loss, acc = per_instance_loss(model(tokens, out_pos), tg, with_acc=check or log)
        if check or log:
            lv, av = loss.detach().tolist(), acc.tolist()
        if log:
            curve_step.append(step)
            curve_loss.append(lv)
            curve_acc.append(av)
        if check:
            for i in range(S):
                if not active[i]:
                    continue
                final_loss[i], final_acc[i] = lv[i], av[i]
                if av[i] > best[i]:
                    best[i], best_step[i] = av[i], step
                done = (o.stop == "acc" and av[i] >= 1.0) or (o.stop == "loss" and lv[i] < o.stop_loss)
                done = done or (o.patience > 0 and step - best_step[i] >= o.patience)
                if not math.isfinite(lv[i]):
                    diverged[i], done = True, True
                if done or step == o.max_steps:
                    steps[i] = step
                    active[i] = False
        return loss

    def train_step(step: int) -> object:
        loss = measure(step)
        if not active.any():
            return STOP
        for p in params.values():
            p.grad = None
        (loss * active.float()).nan_to_num(0.0).sum().backward()
        opt.step(active, masks)
        return loss

    train_loop(o.max_steps, train_step, hooks=[(0, measure)])      # the last step only measures
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    for i in range(S):
        if not all(torch.isfinite(getattr(model, n)[i]).all() for n in WEIGHT_NAMES):
            diverged[i] = True
    return {"steps": steps, "loss": final_loss, "accuracy": final_acc, "diverged": diverged,
            "curve_step": curve_step, "curve_loss": curve_loss, "curve_acc": curve_acc}


def trainable_names(mc: ModelCfg) -> list[str]:
    out = [n for n in WEIGHT_NAMES if not (mc.freeze_embed and n in ("W_E", "W_pos"))
           and not (mc.freeze_unembed and n == "W_U")]
    return out


@torch.no_grad()
def greedy_chain_accuracy(model: StackedTransformer, tokens: Tensor, targets: Tensor, K: int, k: int) -> Tensor:
    """CoT: fraction of queries whose k answers are all right when each step feeds back the argmax [S]."""
    tok = tokens.clone()
    ok = torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)
    for t in range(k):
        pred = model(tok, (K + t, K + t + 1))[:, :, 0].argmax(-1)        # [S, B]
        ok &= pred == targets[..., K + t]
        if t + 1 < k:
            tok[..., K + t + 1] = pred
    return ok.float().mean(-1)


# ---- the run ----------------------------------------------------------------------------------------
def run_stack(configs: Sequence[GeoConfig]) -> list[RunResult]:
    """Train configs that differ only in their seeds as one stacked model; one result per config.
    On the CPU with several torch threads the members train as parallel single-threaded parts, down
    to one member each (:func:`~assocmem.training.run_split`): the members are independent, and two
    one-thread parts of E6's costliest cell took 148 s against 188 s for the two-thread stack, with
    the same weights to the bit."""
    if resolve_device(configs[0].device).type == "cpu":
        return run_split(_run_stack, configs, min_size=1)
    return _run_stack(configs)


def _run_stack(configs: Sequence[GeoConfig]) -> list[RunResult]:
    c0 = configs[0]
    S = len(configs)
    seeds = [c.seeds.resolve(c.seed) for c in configs]
    datas = [make_data(c, s) for c, s in zip(configs, seeds)]
    d0 = datas[0]
    device = resolve_device(c0.device)
    tokens = torch.stack([d.tokens for d in datas]).to(device)
    targets = torch.stack([d.targets for d in datas]).to(device)
    model = build_model(c0, S, d0)
    emb_std = c0.model.emb_std or None
    for i, s in enumerate(seeds):   # drawn on the CPU, so a run does not depend on the device
        model.init_instance(i, torch.Generator().manual_seed(s.init), emb_std, c0.model.w2_scale)
    model.to(device)
    tr = train(model, tokens, targets, d0.out_pos, c0.optim, trainable_names(c0.model))
    ev = recall_metrics(model, GeoData(tokens, targets, d0.subj, d0.chain, d0.out_pos, d0.vocab, d0.bij))
    t = c0.task
    chain_acc = None
    if t.format == "slots" and t.cot:
        chain_acc = greedy_chain_accuracy(model, tokens, targets, t.slots, t.k).tolist()
    n_params = sum(getattr(model, n)[0].numel() for n in WEIGHT_NAMES)
    results = []
    for i in range(S):
        acc = float(ev["accuracy"][i])
        m = {"accuracy": acc, "success": float(acc >= 1.0), "success99": float(acc >= 0.99),
             "min_margin": float(ev["min_margin"][i]), "mean_margin": float(ev["mean_margin"][i]),
             "loss": tr["loss"][i], "steps": tr["steps"][i], "n_queries": d0.n_queries,
             "n_facts": t.N * t.R, "info_bits": information_bits(t.N, t.R), "n_params": n_params,
             "m": c0.model.m, "curve_step": tr["curve_step"], "curve_loss": [c[i] for c in tr["curve_loss"]],
             "curve_acc": [c[i] for c in tr["curve_acc"]]}
        if chain_acc is not None:
            m["chain_accuracy"] = chain_acc[i]
            m["success"] = float(chain_acc[i] >= 1.0)
        w = {n: v.cpu() for n, v in model.instance_weights(i).items()}
        w["bij"] = datas[i].bij.clone()
        status = "diverged" if tr["diverged"][i] else "ok"
        results.append(RunResult(metrics=m, weights=w, status=status))
    return results


# Code-protocol version of this task: part of every run id (registry.run_id). Bump it with any change
# to this task's code (runner, model, task data, training) that alters results for the same config.
PROTOCOL = "geometric-3"

SPEC = TaskSpec(
    name="geometric",
    protocol=PROTOCOL,
    config_cls=GeoConfig,
    run_stack=run_stack,
    summary_keys=("task.N", "task.R", "task.k", "task.cot", "model.d_model", "model.d_mlp", "seed"),
    max_stack=16,
    description="Geometric factual recall: R random bijections on N entities, one-layer transformer.",
)
