"""``assocmem hijack leaderboard``: a hijackability summary across models over stored scores."""
from __future__ import annotations


def add_parser(sub) -> None:
    """Register ``hijack leaderboard`` on the ``hijack`` sub-parsers (filled in by the leaderboard work)."""
