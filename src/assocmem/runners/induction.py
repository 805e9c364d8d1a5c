"""Induction-head runs (Birth of a Transformer + Wang & Sato): config, training, probes, evaluation.

A run trains the simplified two-layer model (or the generic transformer) on bigram-with-triggers
sequences; configs equal up to their seeds train as one stacked model (leading instance dim S).

Protocol defaults (spec, Birth README): SGD momentum 0.9, weight decay 1e-4, lr 0.03, batch 512,
T = 256, 1000 steps, loss on in-context positions (outs >= 2), d = 256, frozen embeddings and
unembedding, no FFN, fresh batches every step, logging every 5 steps. Streams: ``init`` (weights),
``train`` (training batches), ``eval`` (the fixed test batch and the long/delayed test prompts).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, param
from ..training import RunConfig, resolve_device, step_done
from ..models.induction import FFN_KINDS, POS_KINDS, GenericTransformer, SimplifiedInduction
from ..registry import RunResult, TaskSpec
from ..tasks.induction import DEFAULT_DATA_PATH, TriggerBigram, delayed_batch, load_stats, resolve_data_path
from .induction_probes import LengthResult, batch_metrics, memory_probes
from .induction_step import chunked_step, stat_parts

PARAM_NAMES = ("W_K1", "W_K2", "W_O2", "W_F", "P", "b_rel")


@dataclasses.dataclass(frozen=True)
class InductionTaskConfig:
    data_path: str = param(DEFAULT_DATA_PATH, help="tiny Shakespeare input.txt (relative to the working dir)")
    T: int = param(256, lo=4, hi=8192, help="training sequence length")
    K: int = param(5, lo=1, hi=65, help="number of triggers")
    fixed_triggers: bool = param(False, help="K most frequent tokens (else random per sequence, prop. to pi_u)")
    skip_top: int = param(0, lo=0, hi=64, help="fixed triggers skip the most frequent skip_top tokens")
    outputs: str = param("uniform", choices=("uniform", "bigram", "ood"), help="output distribution")
    no_repeat: bool = param(False, help="uniform outputs exclude the trigger itself")


@dataclasses.dataclass(frozen=True)
class InductionModelConfig:
    kind: str = param("simplified", choices=("simplified", "generic"))
    d_model: int = param(256, lo=2, hi=4096)
    n_ctx: int = param(1024, lo=4, hi=8192, help="max length of the position table (>= task.T and eval lengths)")
    pos: str = param("ape", choices=POS_KINDS, help="ape (random frozen), ape_learned, ape_sinusoidal, rope, rel_bias")
    ffn: str = param("none", choices=FFN_KINDS, help="simplified model: none, linear W_F, or ReLU mlp")
    emb_scale: float = param(1.0, lo=0.0, hi=100.0, help="token embeddings N(0, emb_scale^2)")
    scale_scores: bool = param(True, help="attention scores divided by sqrt(d)")
    tie_unembed: bool = param(False, help="W_U = W_E / sqrt(d)")
    trainable: tuple[str, ...] = param(("W_K1", "W_K2", "W_O2"), help="simplified model's trained matrices")
    init_scale: float = param(1.0, lo=0.0, hi=10.0, help="simplified model: trained attention matrices start at "
                              "init_scale x PyTorch's Linear init (0 = zero init, Birth's top-down theory)")
    n_heads: int = param(1, lo=1, hi=64, help="generic model")
    n_layers: int = param(2, lo=1, hi=12, help="generic model")
    parallel_ffn: bool = param(False, help="generic model: FFN reads the block input's norm")


@dataclasses.dataclass(frozen=True)
class InductionOptimConfig:
    name: str = param("sgd", choices=("sgd", "adamw"))
    lr: float = param(0.03, lo=0.0, hi=100.0)
    momentum: float = param(0.9, lo=0.0, hi=1.0)
    betas: tuple[float, ...] = param((0.9, 0.99), lo=0.0, hi=1.0)
    weight_decay: float = param(1e-4, lo=0.0, hi=10.0)
    batch: int = param(512, lo=1, hi=65536)
    steps: int = param(1000, lo=0, hi=1_000_000)
    loss: str = param("icl", choices=("icl", "all"), help="icl: outs >= 2 positions only")
    freeze_until: tuple[str, ...] = param((), help="'NAME:STEP' keeps NAME frozen until STEP (e.g. W_K1:300)")
    log_every: int = param(5, lo=1, hi=1_000_000)
    bias_lr_mult: float = param(1.0, lo=0.0, hi=1e6, help="lr multiplier of the RPE bias b_rel (one scalar per offset)")
    micro_batch: int = param(32, lo=1, hi=65536, help="simplified model: most sequences per forward/backward chunk "
                             "(gradients summed over chunks; equal to one full-batch step up to float rounding)")

    def validate(self) -> None:
        for item in self.freeze_until:
            name, _, step = item.partition(":")
            if not step.isdigit():
                raise ConfigError(f"optim.freeze_until: {item!r} is not allowed (allowed: NAME:STEP, e.g. W_K1:300)")


@dataclasses.dataclass(frozen=True)
class InductionEvalConfig:
    batch: int = param(512, lo=1, hi=100_000, help="fixed test batch (eval stream)")
    every: int = param(50, lo=1, hi=1_000_000, help="test-batch evaluation interval (steps)")
    chunk: int = param(32, lo=1, hi=4096)
    T_test: tuple[int, ...] = param((), lo=4, hi=8192, help="lengths with pairs only beyond task.T")
    long_batch: int = param(64, lo=1, hi=100_000, help="sequences per long-test length")
    bucket: int = param(64, lo=1, hi=8192, help="position bucket width")


@dataclasses.dataclass(frozen=True)
class InductionConfig(RunConfig):
    task: InductionTaskConfig = dataclasses.field(default_factory=InductionTaskConfig)
    model: InductionModelConfig = dataclasses.field(default_factory=InductionModelConfig)
    optim: InductionOptimConfig = dataclasses.field(default_factory=InductionOptimConfig)
    eval: InductionEvalConfig = dataclasses.field(default_factory=InductionEvalConfig)

    def validate(self) -> None:
        try:
            resolve_data_path(self.task.data_path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        if self.task.T > self.model.n_ctx:
            raise ConfigError(f"model.n_ctx: {self.model.n_ctx} is not allowed (allowed: >= task.T={self.task.T})")
        for t in self.eval.T_test:
            if t > self.model.n_ctx and self.model.pos in ("ape", "ape_learned", "ape_sinusoidal", "rel_bias"):
                raise ConfigError(f"eval.T_test: {t} is not allowed (allowed: <= model.n_ctx={self.model.n_ctx})")
            if t < self.task.T:
                raise ConfigError(f"eval.T_test: {t} is not allowed (allowed: >= task.T={self.task.T})")
        bad = [n for n in self.model.trainable if n not in ("W_K1", "W_K2", "W_O2", "W_V1", "W_O1", "W_V2",
                                                            "W_E", "W_U")]
        if bad:
            raise ConfigError(f"model.trainable: {bad[0]!r} is not allowed (allowed: W_K1, W_K2, W_O2, W_V1, "
                              "W_O1, W_V2, W_E, W_U)")


# ---- building blocks --------------------------------------------------------------------------
def make_dataset(cfg: InductionConfig, split: str = "train") -> TriggerBigram:
    """The sampler for a config; ``outputs=ood`` uses the train split for training, test for eval."""
    st = load_stats(cfg.task.data_path)
    out = cfg.task.outputs
    if out == "ood":
        out = "ood_train" if split == "train" else "ood_test"
    return TriggerBigram(st, cfg.task.T, cfg.task.K, cfg.task.fixed_triggers, cfg.task.skip_top, out,
                         cfg.task.no_repeat)


def build_model(cfg: InductionConfig, generators: Sequence[torch.Generator], N: int = 65):
    m = cfg.model
    if m.kind == "generic":
        pos = m.pos if m.pos in ("ape_learned", "ape_sinusoidal") else "ape_learned"
        return GenericTransformer(generators, N, m.d_model, m.n_ctx, m.n_layers, m.n_heads, pos, m.parallel_ffn)
    return SimplifiedInduction(generators, N, m.d_model, m.n_ctx, pos=m.pos, ffn=m.ffn, emb_scale=m.emb_scale,
                               scale_scores=m.scale_scores, tie_unembed=m.tie_unembed, trainable=m.trainable,
                               init_scale=m.init_scale)


def load_model(cfg: InductionConfig, weights: dict[str, torch.Tensor]):
    """Rebuild a single-instance model from a stored run's weights."""
    model = build_model(cfg, [torch.Generator().manual_seed(0)])
    state = {k: v[None] for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    return model


def _stack_batches(ds: TriggerBigram, B: int, gens: Sequence[torch.Generator]):
    bs = [ds.sample(B, g) for g in gens]
    return (torch.stack([b.x for b in bs]), torch.stack([b.y for b in bs]), torch.stack([b.outs for b in bs]),
            torch.stack([b.triggers for b in bs]))


def _member_stats(logits, y, outs):
    """Per-member losses/accuracies on a training batch, logits at all positions: ([S] each, ce [S,B,T])."""
    ce = F.cross_entropy(logits.flatten(0, 2), y.flatten(), reduction="none").view(y.shape)
    hit = (logits.argmax(-1) == y).float()
    r = stat_parts(ce, hit, outs)
    return {k: (v * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1) for k, (v, w) in r.items()}, ce


def first_step(steps: list[int], values: list[float], level: float) -> float:
    """First logged step at which a curve reaches ``level`` (nan if never)."""
    for s, v in zip(steps, values):
        if v is not None and not math.isnan(v) and v >= level:
            return float(s)
    return float("nan")


def run_stack(configs: Sequence[InductionConfig]) -> list[RunResult]:
    """Train configs equal up to their seeds as one stacked model; one RunResult per config."""
    cfg = configs[0]
    S = len(configs)
    seeds = [c.seeds.resolve(c.seed) for c in configs]
    g_init = [torch.Generator().manual_seed(s.init) for s in seeds]
    g_train = [torch.Generator().manual_seed(s.train) for s in seeds]
    g_eval = [torch.Generator().manual_seed(s.eval) for s in seeds]
    ds = make_dataset(cfg, "train")
    ds_test = make_dataset(cfg, "test")
    st = ds.stats
    dev = resolve_device(cfg.device)
    model = build_model(cfg, g_init, st.N).to(dev)
    simplified = isinstance(model, SimplifiedInduction)
    o = cfg.optim
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if n != "b_rel"]}]
    if "b_rel" in params:
        groups.append({"params": [params["b_rel"]], "lr": o.lr * o.bias_lr_mult})
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas[:2]), eps=1e-8, weight_decay=o.weight_decay)
    freeze = {}
    for item in o.freeze_until:
        name, _, step = item.partition(":")
        if name not in params:
            raise ConfigError(f"optim.freeze_until: {name!r} is not a trained parameter (allowed: {', '.join(params)})")
        freeze[name] = int(step)
    # fixed test batch (eval stream); OOD split: test outputs from the held-out range
    xt, yt, ot = (t.to(dev) for t in _stack_batches(ds_test, cfg.eval.batch, g_eval)[:3])
    xi, yi, oi = (xt, yt, ot)
    if cfg.task.outputs == "ood":   # in-distribution outputs too
        xi, yi, oi = (t.to(dev) for t in _stack_batches(ds, cfg.eval.batch, g_eval)[:3])
    query_tokens = ds.fixed if cfg.task.fixed_triggers else None
    curves: dict[str, list] = {"step": []}
    ecurves: dict[str, list] = {"step": []}
    alive = torch.ones(S, dtype=torch.bool)

    def log_eval(step):
        model.eval()
        r = batch_metrics(model, xt, yt, ot, chunk=cfg.eval.chunk, bucket=cfg.eval.bucket)
        ecurves["step"].append(step)
        for k in ("acc_end", "loss_head", "loss_bigram", "prev_tok", "ind_attn"):
            ecurves.setdefault(k + "_test", []).append(r[k].tolist())
        if cfg.task.outputs == "ood":
            r2 = batch_metrics(model, xi, yi, oi, chunk=cfg.eval.chunk, bucket=cfg.eval.bucket)
            ecurves.setdefault("acc_end_in_dist", []).append(r2["acc_end"].tolist())
        model.train()
        return r

    # on the CPU, a step's chunks go to single-threaded forked parts, one per torch thread: the
    # parts use numpy's BLAS and run the element-wise work without thread syncs (benchmarks/induction_speed.py)
    parts = torch.get_num_threads() if simplified and dev.type == "cpu" else 1
    for step in range(o.steps + 1):
        log = step % o.log_every == 0 or step == o.steps
        if step % cfg.eval.every == 0 or step == o.steps:
            log_eval(step)
        if log and simplified:
            pr = memory_probes(model, cfg.task.T, st.pi_b, query_tokens,
                               ds.fixed if cfg.task.fixed_triggers else None)
            for k, v in pr.items():
                curves.setdefault(k, []).append(v.tolist())
        if step == o.steps:
            if log:
                curves["step"].append(step)
            break
        x, y, outs, _ = _stack_batches(ds, o.batch, g_train)
        opt.zero_grad(set_to_none=True)
        if simplified:
            stats = chunked_step(model, x.to(dev), y.to(dev), outs.to(dev), o.loss, o.micro_batch, parts)
            per = stats.pop("loss")
            alive &= torch.isfinite(per).cpu()
            for p in params.values():   # members are independent: zero the grads of diverged ones
                if p.grad is not None and not bool(alive.all()):
                    p.grad[~alive.to(dev)] = 0.0
        else:
            x, y, outs = x.to(dev), y.to(dev), outs.to(dev)
            logits = model(x)
            stats, ce = _member_stats(logits, y, outs)
            per = ce.mean((1, 2)) if o.loss == "all" else stats["loss_head"]
            alive &= torch.isfinite(per.detach()).cpu()
            total = per[alive.to(dev)].sum() if alive.any() else per.sum() * 0
            total.backward()
        for name, until in freeze.items():
            if step < until:
                params[name].grad = None
        if log:
            curves["step"].append(step)
            curves.setdefault("loss", []).append(per.detach().tolist())
            for k, v in stats.items():
                curves.setdefault(k, []).append(v.detach().tolist())
            for name, p in params.items():
                if p.grad is not None and name in PARAM_NAMES:
                    curves.setdefault(f"grad_{name}", []).append(p.grad.flatten(1).norm(dim=1).tolist())
        opt.step()
        step_done(step + 1, o.steps, loss=per)
    final = log_eval(o.steps)
    ecurves["step"].pop()
    for k in list(ecurves):
        if k != "step":
            ecurves[k].pop()   # the final evaluation is reported as scalars, not twice in the curve
    long = {}
    for Tt in cfg.eval.T_test:
        gl = [torch.Generator().manual_seed(s.eval + Tt) for s in seeds]
        bs = [delayed_batch(ds_test if cfg.task.outputs == "ood" else ds, cfg.eval.long_batch, Tt - cfg.task.T, g)
              for g in gl]
        xs, ys, os_ = (torch.stack([getattr(b, f) for b in bs]).to(dev) for f in ("x", "y", "outs"))
        model.eval()
        long[Tt] = batch_metrics(model, xs, ys, os_, chunk=max(1, cfg.eval.chunk * cfg.task.T // Tt), bucket=cfg.eval.bucket)
    results = []
    for i, c in enumerate(configs):
        pick = lambda v: v[i]  # noqa: E731
        met: dict = {}
        for k in ("acc_end", "loss_head", "loss_bigram", "acc_tot", "acc_start", "prev_tok", "ind_attn", "ind_mass"):
            met[k] = float(final[k][i])
        met["accuracy"] = met["acc_end"]
        if cfg.task.outputs == "ood":
            met["acc_end_in_dist"] = ecurves["acc_end_in_dist"][-1][i] if ecurves.get("acc_end_in_dist") else None
        if simplified:
            for k in ("wo1", "wk1", "wk0", "wk0_64", "ff1"):
                if k in curves:
                    met[k] = float(curves[k][-1][i])
            steps_ = curves["step"]
            for k in ("wo1", "wk1", "wk0", "wk0_64", "acc_end"):
                if k in curves:
                    vals = [pick(v) for v in curves[k][:len(steps_)]]
                    met[f"t50_{k}"] = first_step(steps_, vals, 0.5)
        for Tt, r in long.items():
            met.update(LengthResult(Tt, float(r["acc_end"][i]), float(r["prev_tok_all"][i]), float(r["ind_mass"][i]),
                                    r["bucket_acc"][i].tolist(), r["bucket_prev"][i].tolist()).flat())
        met["bucket_acc"] = final["bucket_acc"][i].tolist()
        met["curves"] = {k: ([pick(x) for x in v] if k != "step" else v) for k, v in curves.items()}
        met["eval_curves"] = {k: ([pick(x) for x in v] if k != "step" else v) for k, v in ecurves.items()}
        weights = {k: v[i].detach().cpu().clone() for k, v in model.state_dict().items()}
        bad = not bool(alive[i]) or not all(torch.isfinite(w).all() for w in weights.values())
        results.append(RunResult(met, weights, status="diverged" if bad else "ok"))
    return results


# Code-protocol version of this task: part of every run id (registry.run_id). Bump it with any change
# to this task's code (runner, model, task data, training) that alters results for the same config.
PROTOCOL = "induction-3"

SPEC = TaskSpec(
    name="induction",
    protocol=PROTOCOL,
    config_cls=InductionConfig,
    run_stack=run_stack,
    summary_keys=("task.K", "task.fixed_triggers", "model.pos", "optim.steps", "seed"),
    max_stack=16,
    description="Induction heads as associative memories (Birth of a Transformer; Wang & Sato)",
)
