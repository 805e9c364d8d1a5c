"""A results store for hijack scores, keyed by a content hash of everything that determines a score.

    root/scores/<id>/spec.json            what is scored (the key fields and the run's settings)
    root/scores/<id>/chunk-000000.parquet per-record rows of records [0, chunk), committed atomically
    root/scores/<id>/...
    root/scores/<id>/table.parquet        all chunks, in record order (written when the last one is in)
    root/scores/<id>/done.json            completion record: per-chunk records, rows and SHA-256
    root/scores/<id>/summary.json         the scoring command's summary (ES per k, model meta, ...)

``<id>`` = :func:`assocmem.io.content_hash` of the key fields (:data:`KEY_FIELDS`): model name,
revision and dtype, the data file's SHA-256 and the selected records' content hash, the scheme's
name and template text (and everything else that shapes its sentence), separator, k list,
paraphrase/neighbourhood flags, scorer method, too-long handling and the scorer version. Runs that
differ in any of them never share an entry; runs that agree on all of them reuse it.

A run scores the records in chunks (``chunk`` records each, fixed when the entry is created) and
commits each chunk with one rename; a killed or interrupted run resumes at the first missing
chunk, so no record is lost or counted twice. Leftovers of dead writers are removed on the next run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .. import io
from ..config import ConfigError
from . import evaluate
from .counterfact import Record
from .schemes import Scheme

CHUNK_DEFAULT = 25
KEY_FIELDS = ("model", "revision", "dtype", "scheme", "template", "scheme_def", "data_sha256", "records_sha256",
              "seed", "ks", "separator", "paraphrase", "neighborhood", "skip_too_long", "method", "scorer_version")
_META_KEY = b"assocmem"


def scorer_version() -> str:
    from ..llm.scoring import SCORER_VERSION
    return SCORER_VERSION


def records_sha256(records: Sequence[Record]) -> str:
    """Content hash (64 hex digits) of the selected records, in order."""
    return io.content_hash([dataclasses.asdict(r) for r in records], length=64)


def scheme_definition(scheme: Scheme, countries: Mapping[str, str]) -> dict[str, Any]:
    """Everything about a scheme that shapes its sentences (the country map only where it is used)."""
    texts = [scheme.template] if scheme.template is not None else list(scheme.relations.values())
    uses_country = any("{country}" in t for t in texts)
    return {"target": scheme.target, "no_target_word": sorted(scheme.no_target_word),
            "needs_other": evaluate.needs_other(scheme),
            "countries": dict(sorted(countries.items())) if uses_country else None}


def score_spec(lm, scheme: Scheme, countries: Mapping[str, str], records: Sequence[Record], ks: Sequence[int], *,
               data: str, separator: str, seed: int, paraphrase: bool = False, neighborhood: bool = False,
               method: str = "fast", skip_too_long: bool = False, relation: Sequence[str] | None = None,
               n: int | None = None, data_sha256: str | None = None) -> dict[str, Any]:
    """The spec of a scoring run: the key fields plus descriptive ones (model meta, data path, n)."""
    from ..llm.models import model_identity
    ident = model_identity(lm)
    return {**ident, "model_meta": lm.meta, "scheme": scheme.name,
            "template": scheme.template if scheme.template is not None else dict(scheme.relations),
            "scheme_def": scheme_definition(scheme, countries), "relation": list(relation) if relation else None,
            "data": str(data), "data_sha256": data_sha256 or io.sha256_file(data),
            "records_sha256": records_sha256(records), "n": len(records), "seed": int(seed),
            "ks": [int(k) for k in ks], "separator": separator, "paraphrase": bool(paraphrase),
            "neighborhood": bool(neighborhood), "skip_too_long": bool(skip_too_long), "method": method,
            "scorer_version": scorer_version()}


def entry_id(spec: Mapping[str, Any]) -> str:
    return io.content_hash({k: spec[k] for k in KEY_FIELDS})


def _commit(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` via ``write(tmp)`` in a ``.tmp-<pid>-…`` folder beside it, then rename it into
    place: complete or absent, and a dead writer's leftovers are recognisable by its pid."""
    with io.building_dir(path.parent, path.name) as tmp:
        f = io.atomic_write(tmp / path.name, write)
        os.replace(f, path)
    return path


def _write_chunk(df: pd.DataFrame, meta: dict, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
    return _commit(path, lambda tmp: pq.write_table(table, tmp))


def _chunk_meta(path: Path) -> dict | None:
    """A committed chunk's metadata; None if the file is unreadable."""
    import pyarrow.parquet as pq
    try:
        return json.loads(pq.read_schema(path).metadata[_META_KEY])
    except Exception:  # noqa: BLE001 -- damaged or foreign file: score that chunk again
        return None


@dataclasses.dataclass
class Entry:
    id: str
    path: Path
    spec: dict

    @property
    def done(self) -> dict | None:
        p = self.path / "done.json"
        return json.loads(p.read_text()) if p.exists() else None

    @property
    def finished(self) -> bool:
        return (self.path / "done.json").exists() and (self.path / "table.parquet").exists()

    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "table.parquet")

    def summary(self) -> dict | None:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.exists() else None

    def chunk_files(self) -> list[Path]:
        return sorted(self.path.glob("chunk-*.parquet"))

    def stored_records(self) -> int:
        """Records in committed chunks (what an interrupted run has kept)."""
        return sum((_chunk_meta(p) or {}).get("records", 0) for p in self.chunk_files())

    def check(self) -> list[str]:
        """Problems of a finished entry (files missing or changed since done.json); [] when sound."""
        done = self.done
        if done is None:
            return ["not finished"]
        out = [f"{c['file']}: sha256 differs" for c in done["chunks"]
               if not (self.path / c["file"]).exists() or io.sha256_file(self.path / c["file"]) != c["sha256"]]
        if io.sha256_file(self.path / "table.parquet") != done["table_sha256"]:
            out.append("table.parquet: sha256 differs")
        return out


class ScoreStore:
    """Score entries under ``root/scores/<id>/`` (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "scores"

    def entry(self, eid: str) -> Entry | None:
        p = self.dir / eid / "spec.json"
        return Entry(eid, p.parent, json.loads(p.read_text())) if p.exists() else None

    def entries(self) -> list[Entry]:
        """Finished entries, sorted by id."""
        if not self.dir.is_dir():
            return []
        found = (self.entry(p.name) for p in sorted(self.dir.iterdir()) if p.is_dir() and not p.name.startswith("."))
        return [e for e in found if e is not None and e.finished]

    def find(self, spec: Mapping[str, Any]) -> Entry | None:
        """The finished entry for ``spec``, if any."""
        e = self.entry(entry_id(spec))
        return e if e is not None and e.finished else None

    def cleanup(self) -> int:
        """Remove leftovers of dead writers (``.tmp-<pid>-…``/``.old-<pid>-…``) here and in every entry."""
        if not self.dir.is_dir():
            return 0
        return io.clean_leftovers(self.dir) + sum(io.clean_leftovers(p) for p in self.dir.iterdir() if p.is_dir())

    def remove(self, eid: str) -> None:
        path = self.dir / eid
        if path.exists():
            old = self.dir / f".old-{os.getpid()}-{eid}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)

    def open(self, spec: Mapping[str, Any], chunk: int = CHUNK_DEFAULT) -> Entry:
        """The entry for ``spec``, created (spec.json with the chunk size) if new."""
        if chunk < 1:
            raise ConfigError(f"chunk: {chunk} (allowed: records per chunk >= 1)")
        eid = entry_id(spec)
        path = self.dir / eid
        path.mkdir(parents=True, exist_ok=True)
        self.cleanup()
        e = self.entry(eid)
        if e is None:
            full = {**spec, "id": eid, "chunk": int(chunk), "key_fields": list(KEY_FIELDS),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _commit(path / "spec.json", lambda tmp: tmp.write_text(json.dumps(full, indent=1, default=str)))
            e = Entry(eid, path, json.loads((path / "spec.json").read_text()))
        elif entry_id(e.spec) != eid:
            raise ConfigError(f"store: {path}/spec.json does not match its id {eid} (allowed: remove that folder)")
        return e

    def run(self, spec: Mapping[str, Any], records: Sequence[Record],
            score_chunk: Callable[[Sequence[Record]], tuple[pd.DataFrame, dict]], chunk: int = CHUNK_DEFAULT,
            progress: bool = True, force: bool = False, desc: str = "scoring") -> tuple[Entry, bool]:
        """Score ``records`` into the entry for ``spec``, resuming where a previous run stopped.

        ``score_chunk(records) -> (rows, {"skipped": {reason: count}, "too_long": pairs})``. Returns the
        finished entry and whether this call scored anything. Ctrl-C keeps the committed chunks and
        raises KeyboardInterrupt stating how many records are stored."""
        if force:
            self.remove(entry_id(spec))
        e = self.open(spec, chunk)
        if e.finished:
            return e, False
        size = int(e.spec["chunk"])
        starts = range(0, len(records), size)
        name = "chunk-{:06d}.parquet".format
        committed = {}
        for i, start in enumerate(starts):
            meta = _chunk_meta(e.path / name(i)) if (e.path / name(i)).exists() else None
            recs = records[start:start + size]
            if meta is not None and (meta["records"], meta["first_case_id"], meta["last_case_id"]) == (
                    len(recs), recs[0].case_id, recs[-1].case_id):
                committed[i] = meta           # anything else (damaged, foreign) is scored again
        from tqdm.auto import tqdm
        bar = tqdm(total=len(records), initial=sum(m["records"] for m in committed.values()), unit="rec",
                   desc=desc, disable=not progress, smoothing=0.1)
        try:
            for i, start in enumerate(starts):
                if i in committed:
                    continue
                recs = records[start:start + size]
                df, info = score_chunk(recs)
                meta = {"records": len(recs), "first_case_id": recs[0].case_id, "last_case_id": recs[-1].case_id,
                        "skipped": info.get("skipped", {}), "too_long": int(info.get("too_long", 0))}
                _write_chunk(df, meta, e.path / name(i))
                bar.update(len(recs))
            bar.close()
            self._finish(e, len(starts), name)
        except KeyboardInterrupt:
            bar.close()
            raise KeyboardInterrupt(f"interrupted: {e.stored_records()} of {len(records)} records stored in "
                                    f"{e.path}; run the same command again to resume") from None
        return e, True

    def _finish(self, e: Entry, n_chunks: int, name: Callable[[int], str]) -> None:
        chunks, frames, skipped, too_long = [], [], {}, 0
        for i in range(n_chunks):
            p = e.path / name(i)
            meta = _chunk_meta(p)
            df = pd.read_parquet(p)
            chunks.append({"file": p.name, "records": meta["records"], "rows": len(df), "sha256": io.sha256_file(p)})
            if len(df):
                frames.append(df)
            for reason, c in meta["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + c
            too_long += meta["too_long"]
        cols = list(evaluate.COLUMNS)
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
        _commit(e.path / "table.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        done = {"records": sum(c["records"] for c in chunks), "rows": len(table), "chunks": chunks,
                "skipped": skipped, "too_long": too_long, "table_sha256": io.sha256_file(e.path / "table.parquet"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _commit(e.path / "done.json", lambda tmp: tmp.write_text(json.dumps(done, indent=1)))


def score_to_store(store: ScoreStore, lm, records: Sequence[Record], scheme: Scheme, ks: Sequence[int],
                   countries: Mapping[str, str], *, data: str, separator: str = " ", seed: int = 0,
                   paraphrase: bool = False, neighborhood: bool = False, method: str = "fast",
                   skip_too_long: bool = False, batch_tokens: int | None = None, chunk: int = CHUNK_DEFAULT,
                   relation: Sequence[str] | None = None, progress: bool = True, force: bool = False,
                   data_sha256: str | None = None) -> tuple[Entry, bool]:
    """Check prompt lengths, then score ``records`` under ``scheme`` into ``store`` (resumable).

    Returns (entry, scored_now). Raises ConfigError naming a record and k whose prompt exceeds the
    model's context unless ``skip_too_long`` (then such (record, k) pairs are skipped and counted)."""
    from . import schemes
    from ..llm.models import context_limit
    from .lengths import check_lengths
    spec = score_spec(lm, scheme, countries, records, ks, data=data, separator=separator, seed=seed,
                      paraphrase=paraphrase, neighborhood=neighborhood, method=method,
                      skip_too_long=skip_too_long, relation=relation, data_sha256=data_sha256)
    if not force and store.find(spec) is not None:
        return store.find(spec), False
    others = schemes.control_others(records, seed) if evaluate.needs_other(scheme) else None
    sentences = {}
    for r in records:
        s, _ = evaluate.sentence(scheme, r, countries, others)
        if s is not None:
            sentences[r.case_id] = s
    skip = check_lengths(lm.tokenizer, records, sentences, ks, context_limit(lm.model), separator, paraphrase,
                         neighborhood, skip=skip_too_long, model=spec["model"])

    def score_chunk(recs: Sequence[Record]) -> tuple[pd.DataFrame, dict]:
        df, skipped = evaluate.score_records(lm.model, lm.tokenizer, recs, scheme, ks, countries, sep=separator,
                                             paraphrase=paraphrase, method=method, progress=False,
                                             batch_tokens=batch_tokens, neighborhood=neighborhood,
                                             others=others, skip=skip)
        ids = {r.case_id for r in recs}
        return df, {"skipped": skipped.counts, "too_long": sum(1 for cid, _ in skip if cid in ids)}

    return store.run(spec, records, score_chunk, chunk=chunk, progress=progress, force=force,
                     desc=f"{spec['model']} {scheme.name}")
