"""CounterFact records (ROME's format): loading, validation, relation filtering, seeded subsampling.

Sources: a local ``.json`` / ``.json.gz`` file, ``"original"`` (ROME's file, downloaded once into the
cache and checked against the size and SHA-256 recorded at download), or ``None`` for the default
(``$ASSOCMEM_COUNTERFACT``, else the project's rebuilt file in ``../shared/data/counterfact/``,
else the original).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError

ORIGINAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
ORIGINAL_RECORDS = 21919
SHARED_RELPATH = Path("shared") / "data" / "counterfact" / "counterfact.json.gz"


@dataclasses.dataclass(frozen=True)
class Record:
    case_id: int
    prompt: str              # template with "{}" for the subject
    subject: str
    target_true: str
    target_new: str          # the paper's target_false
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The rewrite prompt, ``prompt.format(subject)``."""
        return self.prompt.replace("{}", self.subject)


class RecordError(ConfigError):
    pass


def _bad(cid: Any, field: str, why: str) -> RecordError:
    return RecordError(f"counterfact record case_id={cid}: field {field}: {why}")


def _string(rec: dict, path: str, cid: Any, optional: bool = False) -> str | None:
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            if optional:
                return None
            raise _bad(cid, path, "missing (expected a non-empty string)")
        node = node[part]
    if not isinstance(node, str) or not node.strip():
        if optional:
            return None
        raise _bad(cid, path, f"{node!r} (expected a non-empty string)")
    return node


def _strings(rec: dict, key: str, cid: Any) -> tuple[str, ...]:
    val = rec.get(key)
    if val is None:
        return ()
    if not isinstance(val, list) or not all(isinstance(s, str) for s in val):
        raise _bad(cid, key, "expected a list of strings")
    return tuple(s for s in val if s.strip())


def parse_record(rec: Any, index: int = -1) -> Record:
    """Validate one raw record; raise :class:`RecordError` naming the case_id and the field."""
    if not isinstance(rec, dict):
        raise _bad(f"? (item {index})", "<record>", f"expected an object, got {type(rec).__name__}")
    cid = rec.get("case_id", f"? (item {index})")
    if not isinstance(rec.get("case_id"), int) or isinstance(rec.get("case_id"), bool):
        raise _bad(cid, "case_id", "missing or not an integer")
    if not isinstance(rec.get("requested_rewrite"), dict):
        raise _bad(cid, "requested_rewrite", "missing (expected an object)")
    prompt = _string(rec, "requested_rewrite.prompt", cid)
    if "{}" not in prompt:
        raise _bad(cid, "requested_rewrite.prompt", f"{prompt!r} has no '{{}}' placeholder for the subject")
    rel = rec["requested_rewrite"].get("relation_id")
    if rel is not None and not isinstance(rel, str):
        raise _bad(cid, "requested_rewrite.relation_id", f"{rel!r} (expected a string or null)")
    return Record(case_id=rec["case_id"], prompt=prompt,
                  subject=_string(rec, "requested_rewrite.subject", cid),
                  target_true=_string(rec, "requested_rewrite.target_true.str", cid),
                  target_new=_string(rec, "requested_rewrite.target_new.str", cid),
                  relation_id=rel or None,
                  paraphrase_prompts=_strings(rec, "paraphrase_prompts", cid),
                  neighborhood_prompts=_strings(rec, "neighborhood_prompts", cid))


@dataclasses.dataclass
class Dataset:
    records: list[Record]
    source: str
    skipped: list[str] = dataclasses.field(default_factory=list)   # one error line per skipped record

    def __len__(self) -> int:
        return len(self.records)


def parse_records(raw: Iterable[Any], skip_invalid: bool = False, source: str = "") -> Dataset:
    records, skipped, seen = [], [], set()
    for i, rec in enumerate(raw):
        try:
            r = parse_record(rec, i)
            if r.case_id in seen:
                raise _bad(r.case_id, "case_id", "duplicate")
        except RecordError as e:
            if not skip_invalid:
                raise RecordError(f"{e} (in {source or 'data'}; pass --skip-invalid to skip such records)") from None
            skipped.append(str(e))
            continue
        seen.add(r.case_id)
        records.append(r)
    return Dataset(records, source, skipped)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data: {path} does not exist (allowed: a CounterFact .json or .json.gz file, "
                          "or 'original')")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError, a damaged one in zlib.error
        raise ConfigError(f"data: {path} is not valid JSON or gzip ({type(e).__name__}: {e})") from e
    if not isinstance(data, list):
        raise ConfigError(f"data: {path} holds a {type(data).__name__}, expected a JSON list of records")
    return data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_original(cache: Path | None = None, url: str = ORIGINAL_URL) -> Path:
    """ROME's counterfact.json in the cache: downloaded once, then verified against the size and
    SHA-256 recorded at download (``counterfact.json.meta.json`` beside it)."""
    from ..io import cache_dir
    folder = Path(cache) if cache else cache_dir() / "counterfact"
    path, meta_path = folder / "counterfact.json", folder / "counterfact.json.meta.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if path.stat().st_size == meta["bytes"] and _sha256(path) == meta["sha256"]:
            return path
        raise ConfigError(f"data: cached {path} does not match its recorded size/SHA-256; delete "
                          f"{folder} to download it again")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".counterfact.", suffix=".json")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise ConfigError(f"data: could not download {url} ({e}); pass --data FILE with a local "
                              "copy of CounterFact") from e
        ds = parse_records(read_json(tmp), source=url)
        if len(ds) != ORIGINAL_RECORDS:
            raise ConfigError(f"data: {url} parsed into {len(ds)} records, expected {ORIGINAL_RECORDS}")
        meta = {"url": url, "bytes": os.path.getsize(tmp), "sha256": _sha256(Path(tmp)), "records": len(ds)}
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    from ..io import atomic_write_text
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return path


def default_data_path() -> str:
    env = os.environ.get("ASSOCMEM_COUNTERFACT")
    if env:
        return env
    shared = os.environ.get("ASSOCMEM_SHARED_DATA")
    candidates = [Path(shared) / "counterfact" / "counterfact.json.gz"] if shared else []
    here = Path(__file__).resolve()
    candidates += [Path.cwd().parent / SHARED_RELPATH] + [p.parent / SHARED_RELPATH for p in here.parents]
    for c in candidates:
        if c.exists():
            return str(c)
    return "original"


def load_counterfact(data: str | Path | None = None, skip_invalid: bool = False) -> Dataset:
    """Load and validate CounterFact from a path, ``"original"`` or the default (see module doc)."""
    src = str(data) if data else default_data_path()
    path = fetch_original() if src == "original" else Path(src).expanduser()
    return parse_records(read_json(path), skip_invalid=skip_invalid, source=str(path))


def select(records: Sequence[Record], relation: str | Sequence[str] | None = None, n: int | None = None,
           seed: int = 0) -> list[Record]:
    """Filter by relation id(s), then take ``n`` records: sort by case_id, apply a permutation drawn
    from ``seed`` and keep the first ``n`` (so a larger n extends a smaller one)."""
    rels = {relation} if isinstance(relation, str) else set(relation or ())
    pool = sorted((r for r in records if not rels or r.relation_id in rels), key=lambda r: r.case_id)
    if rels and not pool:
        raise ConfigError(f"relation: no records with relation_id in {sorted(rels)}")
    if n is None or n >= len(pool):
        n = len(pool)
    if n < 0:
        raise ConfigError(f"n: {n} (allowed: a positive number of records)")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]
