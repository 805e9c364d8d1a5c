"""``assocmem hijack explain``: where and why a real model is hijacked (mechanism lab)."""
from __future__ import annotations


def add_parser(sub) -> None:
    """Register ``hijack explain`` on the ``hijack`` sub-parsers (filled in by the mechanism work)."""
