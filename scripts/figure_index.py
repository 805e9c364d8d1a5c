"""Print the figure index (figure file -> plotting function), or with --write replace it in docs/DEVELOPING.md.

    python scripts/figure_index.py [--write]
"""
import argparse
import sys
from pathlib import Path

from assocmem.report import INDEX_END, INDEX_START, figure_index

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEVELOPING.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"update {DOC.name} in place")
    args = p.parse_args()
    table = figure_index()
    if not args.write:
        print(table)
        return 0
    text = DOC.read_text()
    if INDEX_START not in text or INDEX_END not in text:
        print(f"{DOC}: markers {INDEX_START} / {INDEX_END} not found", file=sys.stderr)
        return 2
    head, rest = text.split(INDEX_START, 1)
    _, tail = rest.split(INDEX_END, 1)
    DOC.write_text(f"{head}{INDEX_START}\n{table}\n{INDEX_END}{tail}")
    print(f"wrote the figure index ({table.count(chr(10)) - 1} figures) into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
