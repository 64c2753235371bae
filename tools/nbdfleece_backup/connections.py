"""Several NBD connections to one export (nbdfleece's own client), reopened when one drops.

Reads, writes and zeroing of a given range are idempotent, so a request that
failed because its connection dropped is simply sent again on a new
connection, a few times with a growing pause; an error *reply* is not
retried (the server meant it).  Connections are opened by one task that owns
them (trio nurseries must be left by the task that entered them), at the
request of the worker that saw the drop.

TLS: ``nbds://`` and ``nbds+unix://`` URIs, with the credentials in a folder
of the layout libnbd (``tls-certificates``) and QEMU (``tls-creds-x509``)
share: ``ca-cert.pem``, and ``client-cert.pem`` + ``client-key.pem`` for a
server that checks client certificates (:func:`tls_for`).  A failed connection
is explained in terms of what to change (:func:`connect_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from nbdfleece.client import NbdClient, NbdConnectionError, NbdError, open_client, parse_uri
from nbdfleece.errors import ConfigError
from nbdfleece.tls import CA_CERT, CLIENT_CERT, client_context, describe_failure
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.progress import Progress

T = TypeVar("T")
RETRIES = 4
BACKOFF = (0.2, 0.5, 1.0, 2.0)


TLS_QUERY = "tls-certificates"
"""libnbd's URI parameter naming the certificates folder."""


@dataclass(frozen=True)
class Tls:
    """The client side of TLS: the context, and the folder it came from (for messages)."""

    context: ssl.SSLContext
    folder: Path


def tls_for(server: str, certificates: Path | None) -> Tls | None:
    """The TLS credentials for ``server``: None for ``nbd://``; ``nbds://`` needs a folder,
    from ``--tls-certificates`` or the URI's ``tls-certificates=`` (as libnbd takes it)."""
    try:
        address = parse_uri(server)
    except ValueError as exc:
        raise BackupError(f"bad NBD address {server!r}: {exc}", 2) from None
    if certificates is None:
        given = urllib.parse.parse_qs(urllib.parse.urlsplit(server).query).get(TLS_QUERY)
        certificates = Path(given[0]) if given and given[0] else None
    if not address.tls:
        if certificates is not None:
            raise BackupError(f"{server} is a plaintext NBD address: TLS certificates need an nbds:// "
                              "or nbds+unix:// address", 2)
        return None
    if certificates is None:
        raise BackupError(f"{server} asks for TLS: --tls-certificates DIR must name the folder holding "
                          f"{CA_CERT} (and {CLIENT_CERT} and client-key.pem if the server checks "
                          "client certificates)", 2)
    try:
        # Over a Unix socket there is no host name to check; the CA still vouches for the server.
        context = client_context(os.fspath(certificates), check_hostname=address.socket is None)
    except ConfigError as exc:
        raise BackupError(f"--tls-certificates {certificates}: {exc}", 2) from None
    return Tls(context, certificates)


def export_uri(server: str, export: str, tls: Tls | None = None) -> str:
    """``server`` (an NBD URI, any export) pointed at ``export``; with ``tls``, a URI libnbd
    tools (nbdcopy, nbdinfo) can use as it is: ``tls-certificates=`` names the folder."""
    parts = urllib.parse.urlsplit(server)
    uri = f"{parts.scheme}://{parts.netloc}/{urllib.parse.quote(export, safe='')}"
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if not (tls is not None and k == TLS_QUERY)]
    if tls is not None:
        query.append((TLS_QUERY, os.fspath(tls.folder.absolute())))
    return f"{uri}?{urllib.parse.urlencode(query, safe='/')}" if query else uri


def connect_failure(exc: NbdConnectionError, tls: Tls | None) -> str:
    """Why a connection failed, with what to change when the cause is TLS."""
    text = describe(exc)
    if "the server requires TLS" in text:
        return ("the server requires TLS: use an nbds:// (or nbds+unix://) server address and "
                "--tls-certificates DIR")
    if tls is None:
        return text
    if "certificate verify failed" in text:
        return (f"the server's TLS certificate was refused ({describe_failure(exc)}): it must be signed "
                f"by the CA in {tls.folder / CA_CERT} and name the host of the address")
    # The server closes (cleanly, or with a reset when the client's next option is in flight)
    # after refusing the certificate; a server that sends the TLS alert shows up as an "alert".
    closed = (("closed the connection during negotiation" in text and "(starttls)" not in text)
              or "connection lost during negotiation" in text)
    if closed or "alert" in text.lower():
        cert = tls.folder / CLIENT_CERT
        mine = (f"{cert} is not signed by a CA the server trusts, or is revoked" if cert.exists()
                else f"{tls.folder} has no {CLIENT_CERT}, and the server requires one")
        return (f"the server closed the connection right after the TLS handshake: it probably refused "
                f"the client certificate ({mine}); its log says why")
    return text


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
                 progress: Progress | None = None, tls: Tls | None = None) -> None:
        self.server = server
        self.export = export
        self.tls = tls
        self.contexts = tuple(contexts)
        self.count = max(1, count)
        self.progress = progress
        self.clients: list[NbdClient] = []
        self._closing = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reopening: dict[int, trio.Lock] = {}

    @property
    def uri(self) -> str:
        return export_uri(self.server, self.export, self.tls)

    @property
    def first(self) -> NbdClient:
        return self.clients[0]

    async def _hold(self, task_status: trio.TaskStatus[NbdClient] = trio.TASK_STATUS_IGNORED) -> None:
        tls = self.tls.context if self.tls is not None else None
        try:
            async with open_client(self.server, self.export, meta_contexts=self.contexts, tls=tls) as client:
                task_status.started(client)
                await self._closing.wait()
        except NbdConnectionError as exc:
            raise BackupError(f"cannot connect to NBD export '{self.export}' at {self.server}: "
                              f"{connect_failure(exc, self.tls)}") from None
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
                           progress: Progress | None = None, tls: Tls | None = None
                           ) -> AsyncIterator[Connections]:
    conns = Connections(server, export, contexts=contexts, count=count, progress=progress, tls=tls)
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
