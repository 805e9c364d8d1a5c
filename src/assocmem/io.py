"""Small file-system helpers shared by every store: atomic writes, published folders, the cache.

Nothing is ever half-written: a file is written to a temporary sibling and renamed over its target
(``os.replace`` is atomic on POSIX), a folder is built under a temporary name and renamed into place.
``tempfile`` creates files 0600 and folders 0700; outputs here get the modes an ordinary ``open`` or
``mkdir`` would (0666 / 0777 less the process umask), so results are readable by others under the
usual umask 022.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """The user cache folder: ``$ASSOCMEM_CACHE``, else ``~/.cache/assocmem``."""
    return Path(os.environ.get("ASSOCMEM_CACHE", Path.home() / ".cache" / "assocmem"))


def umask() -> int:
    """The process umask (read without changing it where the platform allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then rename it over ``path``.

    The temporary file is removed if ``write`` or the rename fails (a full disk, Ctrl-C)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **kw) -> Path:
    kw.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **kw))


def atomic_write_parquet(df, path: str | Path) -> Path:
    """Write a pandas DataFrame as parquet, atomically (no index column)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


@contextlib.contextmanager
def building_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder ``parent/.tmp-<pid>-<name>-<random>`` to fill; removed on any error.

    Publish it with :func:`publish_dir` inside the ``with`` block (after that nothing is left)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.getpid()}-{name}-"))
    os.chmod(tmp, dir_mode())
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path, replace: bool = False) -> bool:
    """Rename the finished folder ``tmp`` to ``final``; True when this call published it.

    Content-addressed folders need no lock: when ``final`` already exists (another writer of the
    same id finished first) and ``replace`` is False, ``tmp`` is discarded and False returned. With
    ``replace`` the old folder is first renamed to a unique ``.old-<pid>-<name>-<random>`` sibling,
    then removed; a concurrent writer that wins the race in between is simply replaced again."""
    for _ in range(100):
        try:
            os.rename(tmp, final)
            return True
        except OSError:       # final exists (ENOTEMPTY/EEXIST), or vanished/appeared under us
            if not final.exists():
                continue
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            old = final.parent / f".old-{os.getpid()}-{final.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, old)
            except FileNotFoundError:
                continue
            shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"could not publish {tmp} as {final}: other writers kept racing")


def leftover_pid(name: str) -> int | None:
    """The pid in a ``.tmp-<pid>-…`` / ``.old-<pid>-…`` leftover name, else None."""
    if not name.startswith((".tmp-", ".old-")):
        return None
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: str | Path) -> int:
    """Remove ``.tmp-*`` / ``.old-*`` entries in ``folder`` whose writing process is gone."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        pid = leftover_pid(p.name)
        if pid is None or (pid_alive(pid) and pid != os.getpid()):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys, no spaces), truncated to ``length``."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
