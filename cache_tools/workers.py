"""Worker processes that leave Ctrl-C to the process that started them."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["start_workers"]

T = TypeVar("T")


def start_workers(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)``, with its worker processes born with SIGINT blocked: only this process sees Ctrl-C.

    A terminal sends Ctrl-C to the whole process group. A DataLoader worker, or the forkserver that
    forks them, caught while still importing ``site`` dies with "Fatal Python error" and a traceback
    on the shared stderr. Blocking the signal in this thread while they start means they inherit the
    block (fork and exec keep the mask); this process still receives the interrupt, on another thread
    at once or when the block ends, and closes its workers as it unwinds. multiprocessing's resource
    tracker is started first because starting it unblocks SIGINT in the calling thread.
    """
    shield = (
        getattr(loader, "num_workers", 0) > 0
        and hasattr(signal, "pthread_sigmask")
        and threading.current_thread() is threading.main_thread()
    )
    if not shield:
        return iter(loader)
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
