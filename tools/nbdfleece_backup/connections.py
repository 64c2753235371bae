"""Several NBD connections to one export (nbdfleece's own client), reopened when one drops.

Reads, writes and zeroing of a given range are idempotent, so a request that
failed because its connection dropped is simply sent again on a new
connection, a few times with a growing pause; an error *reply* is not
retried (the server meant it).  Connections are opened by one task that owns
them (trio nurseries must be left by the task that entered them), at the
request of the worker that saw the drop.
"""

from __future__ import annotations

import contextlib
import errno
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from nbdfleece.client import NbdClient, NbdConnectionError, NbdError, open_client
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.progress import Progress

T = TypeVar("T")
RETRIES = 4
BACKOFF = (0.2, 0.5, 1.0, 2.0)


def export_uri(server: str, export: str) -> str:
    """``server`` (an NBD URI, any export) pointed at ``export``."""
    parts = urllib.parse.urlsplit(server)
    uri = f"{parts.scheme}://{parts.netloc}/{urllib.parse.quote(export, safe='')}"
    return f"{uri}?{parts.query}" if parts.query else uri


def unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The lone exception inside nested groups, else the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, NbdError):
        return f"{exc.message} ({errno.errorcode.get(exc.errno, exc.errno)})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class Connections:
    """``count`` clients of ``export``; :meth:`call` runs a request with retries.

    Each connection is held by its own task in the pool's nursery (an
    ``open_client`` context must be left by the task that entered it), so they
    open in parallel (a QEMU handshake takes a while) and a replacement can be
    opened at the request of any worker.
    """

    def __init__(self, server: str, export: str, *, contexts: Sequence[str] = (), count: int = 4,
                 progress: Progress | None = None) -> None:
        self.server = server
        self.export = export
        self.contexts = tuple(contexts)
        self.count = max(1, count)
        self.progress = progress
        self.clients: list[NbdClient] = []
        self._closing = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reopening: dict[int, trio.Lock] = {}

    @property
    def uri(self) -> str:
        return export_uri(self.server, self.export)

    @property
    def first(self) -> NbdClient:
        return self.clients[0]

    async def _hold(self, task_status: trio.TaskStatus[NbdClient] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_client(self.server, self.export, meta_contexts=self.contexts) as client:
                task_status.started(client)
                await self._closing.wait()
        except NbdConnectionError as exc:
            raise BackupError(f"cannot connect to NBD export '{self.export}' at {self.server}: "
                              f"{describe(exc)}") from None
        except ValueError as exc:
            raise BackupError(f"bad NBD address {self.server!r}: {exc}", 2) from None

    async def _open(self) -> NbdClient:
        assert self._nursery is not None
        client: NbdClient = await self._nursery.start(self._hold)
        return client

    async def _open_all(self) -> None:
        self.clients = [await self._open()]
        missing = [c for c in self.contexts if c not in self.first.contexts]
        if missing:
            raise BackupError(f"export '{self.export}' does not offer {', '.join(missing)}")
        count = self.count if self.first.can_multi_conn else 1
        more: list[NbdClient] = []

        async def one() -> None:
            more.append(await self._open())

        async with trio.open_nursery() as nursery:
            for _ in range(count - 1):
                nursery.start_soon(one)
        self.clients += more
        self._reopening = {i: trio.Lock() for i in range(len(self.clients))}

    async def call(self, slot: int, fn: Callable[[NbdClient], Awaitable[T]]) -> T:
        """``fn(client)`` on connection ``slot`` (modulo the count); reconnect and retry on drops."""
        slot %= len(self.clients)
        for attempt in range(RETRIES + 1):
            client = self.clients[slot]
            try:
                return await fn(client)
            except NbdConnectionError as exc:
                if attempt == RETRIES:
                    raise BackupError(f"the NBD connection to '{self.export}' dropped {RETRIES + 1} times; "
                                      f"giving up: {describe(exc)}") from None
                if self.progress is not None:
                    self.progress.note(f"NBD connection dropped ({describe(exc)}); reconnecting")
            await trio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            async with self._reopening[slot]:
                if self.clients[slot] is client:  # not reopened yet by another worker
                    with contextlib.suppress(BackupError):  # still down: the next attempt says so
                        self.clients[slot] = await self._open()
        raise AssertionError("unreachable")


@asynccontextmanager
async def open_connections(server: str, export: str, *, contexts: Sequence[str] = (), count: int = 4,
                           progress: Progress | None = None) -> AsyncIterator[Connections]:
    conns = Connections(server, export, contexts=contexts, count=count, progress=progress)
    try:
        async with trio.open_nursery() as nursery:
            conns._nursery = nursery
            try:
                await conns._open_all()
                yield conns
            finally:
                conns._closing.set()
    except BaseExceptionGroup as group:
        raise unwrap(group) from None
