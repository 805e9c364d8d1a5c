"""Child processes that never outlive their parent.

A sweep's worker processes and the forked helpers inside a run hold hundreds of MB each; when the
driver dies -- Ctrl-C, SIGTERM, ``kill -9``, the OOM killer -- they must die too. :func:`die_with_parent`
asks Linux to SIGKILL the calling process when its parent ends (``prctl(PR_SET_PDEATHSIG)``) and, on
every platform, starts a watchdog thread that exits the process once its parent has changed
(``os.getppid()`` becomes the reaper's pid when the parent dies).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Linux: deliver ``sig`` to this process when the thread that created it ends. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, interval: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(interval)


def die_with_parent(parent: int, *, watchdog: bool = True, interval: float = 0.5) -> None:
    """Make this process end when process ``parent`` (its parent at creation) ends.

    Call it first thing in the child. The kernel signal covers ``kill -9`` of the parent at once;
    the watchdog thread (daemon, polls every ``interval`` s) covers platforms without prctl. If the
    parent is already gone when this is called, the process exits at once."""
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:          # the parent died before the signal was armed
        os._exit(1)
    if watchdog:
        threading.Thread(target=_watch, args=(parent, interval), daemon=True,
                         name="assocmem-parent-watchdog").start()
