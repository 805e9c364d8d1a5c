"""Token tries for the fast scorer: every (context + target) sequence of one group is inserted into
one trie; tries are packed side by side into rows (block-diagonal attention, see
:mod:`assocmem.llm.scoring`)."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


class Trie:
    """Token trie; nodes are added parent-first, so node index order is a valid topological order."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self._child: list[dict[int, int]] = []
        self._roots: dict[int, int] = {}

    def insert(self, ids: Sequence[int]) -> list[int]:
        path, node = [], -1
        for tok in ids:
            kids = self._roots if node < 0 else self._child[node]
            nxt = kids.get(tok)
            if nxt is None:
                nxt = len(self.tokens)
                kids[tok] = nxt
                self.tokens.append(tok)
                self.parent.append(node)
                self.depth.append(0 if node < 0 else self.depth[node] + 1)
                self._child.append({})
            path.append(nxt)
            node = nxt
        return path

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> np.ndarray:
        """Boolean [n, n]: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = len(self.tokens)
        anc = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parent):
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        return anc


@dataclasses.dataclass
class Row:
    trie: Trie
    # per scored target: (request index, target index, mode, [(pred node, token), ...])
    items: list[tuple[int, int, str, list[tuple[int, int]]]]

    @functools.cached_property
    def reads(self) -> list[int]:
        """Sorted nodes whose next-token logits are read."""
        return sorted({p for *_, pairs in self.items for p, _ in pairs})


def pack(rows: list[Row], width: int) -> list[Row]:
    """First-fit-decreasing packing of small tries into rows of at most ``width`` tokens (or one
    larger trie). Tries in one row never see each other: the ancestor mask is block-diagonal."""
    bins: list[list[Row]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r.trie)):
        n = len(row.trie)
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(row)
                room[b] -= n
                break
        else:
            bins.append([row])
            room.append(width - n)
    return [merge(b) if len(b) > 1 else b[0] for b in bins]


def merge(rows: list[Row]) -> Row:
    trie, items, off = Trie(), [], 0
    for r in rows:
        trie.tokens += r.trie.tokens
        trie.depth += r.trie.depth
        trie.parent += [p + off if p >= 0 else -1 for p in r.trie.parent]
        items += [(ri, ti, mode, [(node + off, tok) for node, tok in pairs]) for ri, ti, mode, pairs in r.items]
        off += len(r.trie)
    return Row(trie, items)
