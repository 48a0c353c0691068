"""A worker process's start, out of the serving processes' way.

A worker process started while others serve (a standby worker, a replacement, an add) spends most
of its start importing torch: about 1.5 s of CPU, which on cores shared with the serving workers
slows every step while it lasts. The import runs here on a thread of its own at nice 19, so it
takes only the CPU that serving leaves; the thread ends with the import, and the threads that serve
are started later by threads at the usual priority (a thread inherits its creator's niceness, and an
unprivileged process cannot lower it again).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading

import numpy  # noqa: F401 - first, on the caller's thread: its BLAS threads start at import and would inherit nice 19

HEAVY = ("torch", "safetensors")


def import_quietly() -> None:
    """Import HEAVY on a nice-19 thread and wait for it (no-op once they are imported). An import
    error is left for the caller's own import to raise."""
    if all(name in sys.modules for name in HEAVY):
        return

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            for name in HEAVY:
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the caller's import says what is wrong
            pass

    thread = threading.Thread(target=run, name="expertmesh-imports")
    thread.start()
    thread.join()
