"""Knowledge-hijack prompt families (Wang & Sato; construction reconstructed) and their evaluation.

A prompt is  filler(lead) + [q, o_1] + filler(gap) + [q, o_2] + filler(gap) + ... + filler(tail) + [q]
where filler is a global-bigram chain that never emits q (per-step resampling). All prompts of a
family have the same length L (``lead`` absorbs the slack). Families:
  single    one in-context successor o, n_o copies, pi_b(o|q) from high to ~0
  conflict  two successors o1 != o2 with counts (n1, n2), pairs in random order
  unseen    q never occurs before the end (global knowledge only)
  distance  n_o copies of one successor placed at a chosen start position (distance to the end)
Outcome at the last position: the model's top-1 token, compared with the closed-form rule
(theory.induction.closed_form_logits) -- in-context successor vs global favourite b = argmax pi_b(.|q).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..theory.induction import closed_form_logits, context_counts


def filler(pi_b: Tensor, pi_u: Tensor, L: int, avoid: int, g: torch.Generator, start: int | None = None) -> list[int]:
    """A global-bigram chain of length L avoiding token ``avoid`` (continuing after ``start``)."""
    out: list[int] = []
    prev = start
    allowed = torch.ones(pi_b.shape[0])
    allowed[avoid] = 0.0
    for _ in range(L):
        w = (pi_u if prev is None else pi_b[prev]).float() * allowed
        if w.sum() <= 0:
            w = allowed
        prev = int(torch.multinomial(w, 1, generator=g))
        out.append(prev)
    return out


def build_prompt(pi_b: Tensor, pi_u: Tensor, q: int, successors: list[int], L: int, g: torch.Generator,
                 gap: int = 20, tail: int = 20, start: int | None = None) -> list[int]:
    """One prompt of length L ending with q; pairs (q, o) separated by ``gap`` filler tokens.
    ``start``: position of the first pair (None: as late as the tail allows)."""
    body: list[int] = []
    for o in successors:
        body += [q, o] + filler(pi_b, pi_u, gap, q, g, start=o)
    n_body = len(body)
    if start is None:
        lead = L - 1 - n_body - tail
    else:
        lead = start
    tail_len = L - 1 - lead - n_body
    if lead < 0 or tail_len < 0:
        raise ValueError(f"prompt of length {L} cannot hold {len(successors)} pairs at start={start}")
    lead_tok = filler(pi_b, pi_u, lead, q, g)
    last = body[-1] if body else (lead_tok[-1] if lead_tok else None)
    tail_tok = filler(pi_b, pi_u, tail_len, q, g, start=last)
    return lead_tok + body + tail_tok + [q]


@dataclasses.dataclass
class PromptFamily:
    """Prompts [B, L] of one family plus per-prompt annotations (o, b, counts, labels)."""
    name: str
    z: Tensor
    o: Tensor            # in-context successor of interest (o1 for conflict; -1 if none)
    o2: Tensor           # second successor (conflict) or -1
    label: list[str]     # a cell label per prompt (e.g. "n=2", "(3,1)", "start=300")
    x: Tensor            # a numeric coordinate per prompt (n_o/|S|, log pi(o|q), distance...)


def make_families(pi_b: Tensor, pi_u: Tensor, q: int, L: int, g: torch.Generator, per_cell: int = 10,
                  gap: int = 20, n_outputs: int = 6, counts=(1, 2, 4), conflicts=((3, 1), (2, 2), (1, 3), (4, 0)),
                  distance_L: int | None = None, starts=()) -> dict[str, PromptFamily]:
    """The four families for query q. Outputs of ``single`` span pi_b(o|q) from the top to ~0."""
    N = pi_b.shape[0]
    order = torch.argsort(pi_b[q], descending=True)
    order = order[order != q]
    b = int(order[0])
    pick = torch.linspace(1, len(order) - 1, n_outputs).round().long()   # skip b itself
    outs = [int(order[i]) for i in pick]
    fams: dict[str, PromptFamily] = {}

    def pack(name, rows):
        z = torch.tensor([r[0] for r in rows])
        fams[name] = PromptFamily(name, z, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]),
                            [r[3] for r in rows], torch.tensor([r[4] for r in rows], dtype=torch.float))

    rows = []
    for o in outs:
        for n in counts:
            for _ in range(per_cell):
                rows.append((build_prompt(pi_b, pi_u, q, [o] * n, L, g, gap, gap), o, -1, f"n={n}",
                             float(torch.log(pi_b[q, o]))))
    pack("single", rows)
    rows = []
    for n1, n2 in conflicts:
        for _ in range(per_cell):
            o1, o2 = _two_distinct(N, (q, b), g)
            seq = [o1] * n1 + [o2] * n2
            perm = torch.randperm(len(seq), generator=g).tolist()
            rows.append((build_prompt(pi_b, pi_u, q, [seq[i] for i in perm], L, g, gap, gap), o1, o2,
                         f"({n1},{n2})", n1 / max(n1 + n2, 1)))
    pack("conflict", rows)
    rows = [(build_prompt(pi_b, pi_u, q, [], L, g, gap, gap), -1, -1, "unseen", 0.0) for _ in range(per_cell * 2)]
    pack("unseen", rows)
    if distance_L and starts:
        rows = []
        for s in starts:
            for _ in range(per_cell):
                o = _two_distinct(N, (q, b), g)[0]
                z = build_prompt(pi_b, pi_u, q, [o, o], distance_L, g, gap, gap, start=s)
                rows.append((z, o, -1, f"start={s}", float(distance_L - s)))
        pack("distance", rows)
    return fams


def _two_distinct(N: int, exclude: tuple[int, ...], g: torch.Generator) -> tuple[int, int]:
    perm = [t for t in torch.randperm(N, generator=g).tolist() if t not in exclude]
    return perm[0], perm[1]


@torch.no_grad()
def last_logits(model, z: Tensor, chunk: int = 32) -> Tensor:
    """Logits [B, N] at the last position of prompts z [B, L] for a single-instance model."""
    out = []
    for i in range(0, z.shape[0], chunk):
        zz = z[i:i + chunk][None]
        qpos = torch.full((1, zz.shape[1], 1), zz.shape[-1] - 1, dtype=torch.long)
        try:
            lg = model(zz, qpos)
        except TypeError:
            lg = model(zz)[:, :, -1:]
        out.append(lg[0, :, -1])
    return torch.cat(out)


def outcome_table(fam: PromptFamily, logits: Tensor, log_pi: Tensor, lam: float, mu: float, pi_b: Tensor,
                  empty: str = "global", rule: Tensor | None = None):
    """Per-prompt rows: model winner, rule winner, agreement (the model's top-1 is one of the rule's
    maximisers, ties within 1e-6 included), and the o-vs-b comparison. ``rule``: the rule's logits
    [B, N] when not the closed form with (lam, mu)."""
    import pandas as pd
    z = fam.z
    q = z[:, -1]
    rule = closed_form_logits(z, lam, mu, log_pi, empty) if rule is None else rule
    n, size = context_counts(z, log_pi.shape[0])
    b = pi_b[q].argmax(1)
    win_m, win_r = logits.argmax(1), rule.argmax(1)
    o = fam.o.clamp(min=0)
    rows = pd.DataFrame({
        "family": fam.name, "cell": fam.label, "x": fam.x.numpy(),
        "n_o": n.gather(1, o[:, None])[:, 0].numpy(), "S": size.numpy(),
        "frac_o": (n.gather(1, o[:, None])[:, 0] / size.clamp(min=1)).numpy(),
        "log_pi_o": torch.log(pi_b[q, o]).numpy(),
        "model_winner": win_m.numpy(), "rule_winner": win_r.numpy(),
        "agree": (rule.gather(1, win_m[:, None])[:, 0] >= rule.max(1).values - 1e-6).numpy(),
        "tie": ((rule >= rule.max(1, keepdim=True).values - 1e-6).sum(1) > 1).numpy(),
        "model_o_wins": ((win_m == fam.o) & (fam.o >= 0)).numpy(),
        "rule_o_wins": ((win_r == fam.o) & (fam.o >= 0)).numpy(),
        "model_o2_wins": ((win_m == fam.o2) & (fam.o2 >= 0)).numpy(),
        "model_b_wins": (win_m == b).numpy(), "rule_b_wins": (win_r == b).numpy(),
        "gap_model": (logits.gather(1, o[:, None])[:, 0] - logits.gather(1, b[:, None])[:, 0]).numpy(),
        "gap_rule": (rule.gather(1, o[:, None])[:, 0] - rule.gather(1, b[:, None])[:, 0]).numpy(),
    })
    return rows


def fit_ratio_by_winners(logits: Tensor, z: Tensor, log_pi: Tensor, grid: Tensor | None = None) -> tuple[float, float]:
    """(lambda_hat, mu_hat) = (rho, 1) with the ratio rho = lambda/mu chosen on calibration prompts to
    maximise the share of prompts whose model top-1 is a maximiser of the rule (the rule's winner
    depends on lambda and mu only through lambda/mu when mu > 0). logits [B, N] at the last position
    of prompts z [B, T]; grid of candidate ratios (default: 0.01..1000, log-spaced); ties -> the
    median of the best ratios."""
    grid = torch.logspace(-2, 3, 201) if grid is None else grid
    win = logits.argmax(1)
    scores = []
    for rho in grid.tolist():
        rule = closed_form_logits(z, rho, 1.0, log_pi, "global")
        ok = rule.gather(1, win[:, None])[:, 0] >= rule.max(1).values - 1e-6
        scores.append(float(ok.float().mean()))
    top = max(scores)
    best = [r for r, s in zip(grid.tolist(), scores) if s >= top - 1e-9]
    return float(best[len(best) // 2]), 1.0
