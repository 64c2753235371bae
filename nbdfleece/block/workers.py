"""A small pool of I/O threads, cheaper per call than ``trio.to_thread``.

Measured on a 2-core VM, ``trio.to_thread.run_sync`` costs about 200 µs of
CPU per call (capacity limiter, context copy, thread hand-off), more than the
4 KiB ``pread`` it carries.  Here a call is one ``SimpleQueue.put`` and one
``run_sync_soon`` back into trio, and the waiting task is rescheduled
directly.  Blocking calls are never cancelled half-way: a cancelled task
waits for its call to finish, so a write is either done or not started.

``sys.setswitchinterval`` is lowered so that a worker whose syscall returned
gets the GIL back quickly while the event loop is busy: with the default 5
ms a finished read waits milliseconds for its reply to be sent.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
SWITCH_INTERVAL = 0.0005


class WorkerPool:
    """``await pool.run(fn, *args)`` runs ``fn`` in one of ``size`` threads."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            trio.lowlevel.TrioToken, trio.lowlevel.Task] | None]
        self._jobs = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _ensure_threads(self) -> None:
        with self._lock:
            if self._threads:
                return
            if sys.getswitchinterval() > SWITCH_INTERVAL:
                sys.setswitchinterval(SWITCH_INTERVAL)
            for i in range(self._size):
                thread = threading.Thread(target=self._work, name=f"nbdfleece-io-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            with contextlib.suppress(trio.RunFinishedError):  # the loop is gone; nobody waits
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._threads:
            self._ensure_threads()
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), task))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # blocking I/O runs to completion

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result


_default: WorkerPool | None = None


def default_pool() -> WorkerPool:
    """The process-wide pool every store shares."""
    global _default
    if _default is None:
        _default = WorkerPool()
    return _default


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call off the event loop."""
    return await default_pool().run(fn, *args)
