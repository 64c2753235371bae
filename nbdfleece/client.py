"""nbdfleece's NBD client: the trio edge around ``client_protocol``.

Theory of operation
-------------------
:func:`open_client` connects (TCP or Unix socket), runs
:class:`~nbdfleece.client_protocol.ClientHandshake` (wrapping the stream in
``trio.SSLStream`` after ``NBD_OPT_STARTTLS`` when ``tls`` is given), then
yields an :class:`NbdClient` while one *reader* task decodes replies::

    caller tasks ──request()──> [in-flight slots + byte budget] ──send lock──> socket
                                                                               │
    caller tasks <──Event.set()── reader task <──want()/advance()── replies <──┘

* Requests are pipelined: any number of tasks may call the client at once;
  each registers its cookie with the core, sends its header (and WRITE
  payload, never concatenated) under the send lock, and sleeps until the
  reader wakes it.  Replies may arrive in any order.
* At most ``max_in_flight`` requests and :data:`MAX_IN_FLIGHT_BYTES` of
  payload are outstanding; more callers wait, so a caller issuing thousands
  of requests cannot exhaust memory.
* Without TLS the reader ``readv``\\ s straight into the buffer the core
  wants next (a reply header, or the caller's buffer for READ data), with
  the rest of the read going to a small spill buffer: READ data is never
  copied.  With TLS it decrypts into a buffer and the core copies.
* A dropped connection or a protocol violation fails every pending request
  (and every later one) with :class:`NbdConnectionError`; an error *reply*
  fails only its request, with :class:`NbdError`.
* Leaving the context sends ``NBD_CMD_DISC`` and closes the socket.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import math
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

import trio

from nbdfleece.buffers import BufferPool
from nbdfleece.client_protocol import (
    NEED_DATA,
    ClientHandshake,
    ClientTransmission,
    Closed,
    ExportDetails,
    ExportList,
    NbdError,
    Negotiated,
    NegotiationError,
    Reply,
    StartTLS,
)
from nbdfleece.constants import MAX_REQUEST_LENGTH, Cmd, CmdFlag, Errno, TransmissionFlag
from nbdfleece.errors import ProtocolError

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
DEFAULT_MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024
"""Payload bytes (READ buffers and WRITE data) outstanding per connection."""
READ_BUFFER_CACHE = 64 * 1024 * 1024
"""Bytes of pooled read buffers kept per connection."""
RECV_BUFFER = 256 * 1024
IOV_MAX = 1024
DISCONNECT_TIMEOUT = 5.0


class NbdConnectionError(OSError):
    """The handshake was refused or failed, or the connection dropped."""


class NbdAddress(NamedTuple):
    """A parsed NBD URI (see :func:`parse_uri`)."""

    tls: bool
    host: str | None
    """TCP host; None for a Unix socket."""
    port: int
    socket: str | None
    """Unix socket path; None for TCP."""
    export: str

    def describe(self) -> str:
        where = f"unix:{self.socket}" if self.socket is not None else f"{self.host}:{self.port}"
        return f"{where} export '{self.export}'"


def parse_uri(uri: str) -> NbdAddress:
    """Parse ``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH``.

    The export is the percent-decoded path without its leading slash; the
    host defaults to localhost and the port to 10809 (the NBD URI spec).
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"not a supported NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://): {uri!r}")
    tls = scheme.startswith("nbds")
    path = parts.path
    if path and not path.startswith("/"):
        raise ValueError(f"NBD URI path must start with '/': {uri!r}")
    export = urllib.parse.unquote(path[1:])
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ValueError(f"a Unix socket NBD URI has no host: {uri!r}")
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ValueError(f"a Unix socket NBD URI needs ?socket=PATH: {uri!r}")
        return NbdAddress(tls, None, 0, sockets[0], export)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in NBD URI {uri!r}") from None
    return NbdAddress(tls, parts.hostname or "localhost", port, None, export)


# ==========================================================================
# Transports
# ==========================================================================


class _Transport:
    """Bytes in and out during transmission; see the two subclasses."""

    async def send(self, parts: Sequence[bytes | memoryview]) -> None:
        raise NotImplementedError

    async def receive_into(self, core: ClientTransmission) -> bool:
        """Feed the core at least one byte; False at EOF."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class _SocketTransport(_Transport):
    """A plain socket: ``readv`` into the core's buffer, ``writev`` from the caller's."""

    def __init__(self, stream: trio.SocketStream, initial: bytes) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._spill = bytearray(RECV_BUFFER)
        self._spill_view = memoryview(self._spill)
        self._initial = initial

    async def send(self, parts: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            try:
                sent = os.writev(self._fd, views[:IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
                continue
            while sent:
                head = views[0]
                if sent >= len(head):
                    sent -= len(head)
                    views.pop(0)
                else:
                    views[0] = head[sent:]
                    sent = 0

    async def receive_into(self, core: ClientTransmission) -> bool:
        if self._initial:
            data, self._initial = self._initial, b""
            core.receive_data(data)
            return True
        while True:
            # want() right before the syscall, no await in between: a caller
            # that gives up (abandon) cannot have its buffer written later.
            want = core.want()
            try:
                n = os.readv(self._fd, [want, self._spill_view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            break
        if n == 0:
            return False
        take = min(n, len(want))
        core.advance(take)
        if n > take:
            core.receive_data(self._spill_view[: n - take])
        await trio.lowlevel.checkpoint()
        return True

    async def aclose(self) -> None:
        await self._stream.aclose()


class _StreamTransport(_Transport):
    """Any trio stream (TLS): decrypted bytes are copied into the core's buffers."""

    def __init__(self, stream: trio.abc.Stream, initial: bytes) -> None:
        self._stream = stream
        self._initial = initial

    async def send(self, parts: Sequence[bytes | memoryview]) -> None:
        await self._stream.send_all(b"".join(parts))

    async def receive_into(self, core: ClientTransmission) -> bool:
        data: bytes | bytearray
        if self._initial:
            data, self._initial = self._initial, b""
        else:
            data = await self._stream.receive_some(RECV_BUFFER)
        if not data:
            return False
        core.receive_data(data)
        return True

    async def aclose(self) -> None:
        with trio.move_on_after(DISCONNECT_TIMEOUT) as scope:
            scope.shield = True
            await self._stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)


# ==========================================================================
# Connecting and negotiating
# ==========================================================================


async def _open_stream(address: NbdAddress) -> trio.SocketStream:
    try:
        if address.socket is not None:
            return await trio.open_unix_socket(address.socket)
        assert address.host is not None
        return await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise NbdConnectionError(
            exc.errno or _errno.ECONNREFUSED,
            f"cannot connect to {address.describe()}: {exc.strerror or exc}",
        ) from None


async def _negotiate(
    stream: trio.SocketStream,
    address: NbdAddress,
    handshake: ClientHandshake,
    tls: ssl.SSLContext | None,
) -> tuple[trio.abc.Stream, Negotiated | ExportList]:
    """Run ``handshake`` to its first final event; returns the (maybe TLS) stream."""
    current: trio.abc.Stream = stream
    try:
        while True:
            event = handshake.next_event()
            out = handshake.data_to_send()
            if out:
                await current.send_all(out)
            if event is NEED_DATA:
                data = await current.receive_some(65536)
                if not data:
                    raise NbdConnectionError(_errno.ECONNRESET, handshake.eof_message())
                handshake.receive_data(data)
            elif isinstance(event, StartTLS):
                assert tls is not None
                hostname = address.host if address.socket is None else None
                if hostname is None and tls.check_hostname:
                    raise NbdConnectionError(
                        "TLS over a Unix socket has no host name to check: use an SSLContext "
                        "with check_hostname=False")
                current = trio.SSLStream(stream, tls, server_hostname=hostname)
                try:
                    await current.do_handshake()
                except (ssl.SSLError, trio.BrokenResourceError) as exc:
                    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
                    raise NbdConnectionError(f"TLS handshake with {address.describe()} failed: "
                                             f"{cause or exc}") from None
                handshake.tls_established()
            elif isinstance(event, (Negotiated, ExportList)):
                return current, event
            else:
                raise ProtocolError(f"unexpected negotiation event {event!r}")
    except NegotiationError as exc:
        with trio.move_on_after(1) as scope, contextlib.suppress(trio.BrokenResourceError,
                                                                 trio.ClosedResourceError):
            scope.shield = True  # best effort: the queued NBD_OPT_ABORT
            out = handshake.data_to_send()
            if out:
                await current.send_all(out)
        raise NbdConnectionError(f"{address.describe()}: {exc}") from None
    except ProtocolError as exc:
        raise NbdConnectionError(f"{address.describe()}: protocol error during negotiation: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise NbdConnectionError(_errno.ECONNRESET, f"{address.describe()}: connection lost during "
                                 f"negotiation: {exc.__cause__ or exc}") from None


def _address(uri: str | NbdAddress, tls: ssl.SSLContext | None) -> NbdAddress:
    address = uri if isinstance(uri, NbdAddress) else parse_uri(uri)
    if address.tls and tls is None:
        raise ValueError("an nbds:// address needs tls= (an ssl.SSLContext)")
    return address


# ==========================================================================
# The client
# ==========================================================================


class _Budget:
    """Counting limit on bytes; a request larger than the limit takes all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.available = limit
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        while self.available < n:
            await self._lot.park()
        self.available -= n
        return n

    def release(self, n: int) -> None:
        self.available += n
        self._lot.unpark_all()


@dataclass(eq=False)
class _Waiter:
    done: trio.Event
    nbytes: int
    registered: bool = False
    reply: Reply | None = None
    failure: NbdConnectionError | None = None


class NbdClient:
    """One negotiated connection; create it with :func:`open_client`."""

    def __init__(
        self,
        transport: _Transport,
        details: ExportDetails,
        address: NbdAddress,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._transport = transport
        self._core = ClientTransmission(details)
        self._details = details
        self._address = address
        self._slots = trio.Semaphore(max_in_flight)
        self._budget = _Budget(MAX_IN_FLIGHT_BYTES)
        self._pool = BufferPool(READ_BUFFER_CACHE)
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._failure: NbdConnectionError | None = None
        self._disconnected = False

    # -- what was negotiated ----------------------------------------------
    @property
    def export_name(self) -> str:
        return self._details.name

    @property
    def description(self) -> str:
        return self._details.description

    @property
    def size(self) -> int:
        return self._details.size

    @property
    def flags(self) -> TransmissionFlag:
        return self._details.flags

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    @property
    def structured(self) -> bool:
        return self._details.structured

    @property
    def block_size(self) -> tuple[int, int, int]:
        return self._details.block_size

    @property
    def contexts(self) -> dict[str, int]:
        return dict(self._details.contexts)

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def broken(self) -> NbdConnectionError | None:
        """Why the connection is unusable, or None while it works."""
        return self._failure

    # -- data operations ----------------------------------------------------
    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes; holes read as zeroes.

        The data lands in a pooled buffer and is copied once into the result:
        a fresh multi-MiB buffer per read costs more in page faults than the
        copy (``pread_into`` avoids both).
        """
        self._check_length(length, payload=True)
        async with self._admission(length) as waiter:  # before the buffer exists
            buf = self._pool.get(length)
            try:
                view = memoryview(buf)[:length]
                await self._submit(waiter, Cmd.READ, offset, length, 0, buf=view)
                return bytes(view)
            finally:
                self._pool.put(buf)  # an abandoned read never writes here (core.abandon)

    async def pread_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf`` (no copy)."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("pread_into needs a writable buffer")
        self._check_length(len(view), payload=True)
        await self._request(Cmd.READ, offset, len(view), 0, buf=view, nbytes=len(view))

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check_length(len(view), payload=True)
        await self._request(Cmd.WRITE, offset, len(view), self._fua(fua), payload=view, nbytes=len(view))

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False, no_hole: bool = False,
                           fast: bool = False) -> None:
        self._command_allowed(TransmissionFlag.SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")
        self._check_length(length)
        flags = (int(CmdFlag.NO_HOLE) if no_hole else 0) | self._fua(fua)
        if fast:
            flags |= self._flag(CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO, "FAST_ZERO")
        await self._request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._command_allowed(TransmissionFlag.SEND_TRIM, "NBD_CMD_TRIM")
        self._check_length(length)
        await self._request(Cmd.TRIM, offset, length, self._fua(fua))

    async def flush(self) -> None:
        self._command_allowed(TransmissionFlag.SEND_FLUSH, "NBD_CMD_FLUSH", modifies=False)
        await self._request(Cmd.FLUSH, 0, 0, 0)

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint (NBD_CMD_CACHE)."""
        self._command_allowed(TransmissionFlag.SEND_CACHE, "NBD_CMD_CACHE", modifies=False)
        self._check_length(length)
        await self._request(Cmd.CACHE, offset, length, 0)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, list[tuple[int, int]]]:
        """Extents of every negotiated context, as the server sent them.

        Each list is contiguous from ``offset``; the server may cover less
        than ``length`` and (without ``req_one``) its last extent may run past it.
        """
        if not self._details.contexts:
            raise NbdError(Errno.EINVAL, "no meta context was negotiated on this connection")
        self._check_length(length)
        flags = int(CmdFlag.REQ_ONE) if req_one else 0
        reply = await self._request(Cmd.BLOCK_STATUS, offset, length, flags)
        return reply.extents or {}

    async def extents(
        self, context: str, offset: int = 0, length: int | None = None, chunk: int | None = None
    ) -> AsyncIterator[tuple[int, int, int]]:
        """``(offset, length, flags)`` of ``context`` over a range, any size.

        Repeats BLOCK_STATUS as needed; extents are clipped to the range and
        neighbours with equal flags are merged.
        """
        if context not in self._details.contexts:
            raise NbdError(Errno.EINVAL, f"meta context '{context}' was not negotiated "
                                         f"(have: {', '.join(self._details.contexts) or 'none'})")
        end = self.size if length is None else offset + length
        align = max(self.block_size[0], 512)
        step = chunk if chunk is not None else (MAX_REQUEST_LENGTH // align) * align
        if step <= 0:
            raise ValueError("chunk must be positive")
        step = min(step, MAX_REQUEST_LENGTH)
        run_start, run_length, run_flags = offset, 0, -1
        pos = offset
        while pos < end:
            found = (await self.block_status(pos, min(step, end - pos)))[context]
            for ext_length, ext_flags in found:
                ext_length = min(ext_length, end - pos)
                if ext_length <= 0:
                    break
                if ext_flags == run_flags:
                    run_length += ext_length
                else:
                    if run_length:
                        yield run_start, run_length, run_flags
                    run_start, run_length, run_flags = pos, ext_length, ext_flags
                pos += ext_length
        if run_length:
            yield run_start, run_length, run_flags

    # -- requests -------------------------------------------------------------
    def _check_length(self, length: int, *, payload: bool = False) -> None:
        limit = self.block_size[2] if payload else MAX_REQUEST_LENGTH
        if length > limit:
            what = "the maximum block size" if payload else "the largest NBD request"
            raise NbdError(Errno.EINVAL, f"length {length} exceeds {what} ({limit})")

    def _flag(self, flag: CmdFlag, needs: TransmissionFlag, name: str) -> int:
        if not self.flags & needs:
            raise NbdError(Errno.ENOTSUP, f"the server does not support {name} on this export")
        return int(flag)

    def _fua(self, fua: bool) -> int:
        """The FUA command flag when asked for (ENOTSUP where the export lacks it)."""
        return self._flag(CmdFlag.FUA, TransmissionFlag.SEND_FUA, "FUA") if fua else 0

    def _command_allowed(self, needs: TransmissionFlag, name: str, *, modifies: bool = True) -> None:
        if self.flags & needs:
            return
        if modifies and self.read_only:
            raise NbdError(Errno.EPERM, f"{name}: export '{self.export_name}' is read-only")
        raise NbdError(Errno.ENOTSUP, f"the server does not support {name} on this export")

    @asynccontextmanager
    async def _admission(self, nbytes: int) -> AsyncIterator[_Waiter]:
        """An in-flight slot and ``nbytes`` of the byte budget, taken before any
        buffer is allocated; the waiter that will carry the reply."""
        if self._failure is not None:
            raise self._failure
        if self._disconnected:
            raise NbdConnectionError(_errno.ENOTCONN, "the client was closed")
        async with self._slots:
            waiter = _Waiter(trio.Event(), await self._budget.acquire(nbytes))
            try:
                yield waiter
            finally:
                if not waiter.registered:
                    self._budget.release(waiter.nbytes)

    async def _request(
        self,
        cmd: Cmd,
        offset: int,
        length: int,
        flags: int,
        *,
        buf: memoryview | None = None,
        payload: memoryview | None = None,
        nbytes: int = 0,
    ) -> Reply:
        async with self._admission(nbytes) as waiter:
            return await self._submit(waiter, cmd, offset, length, flags, buf=buf, payload=payload)

    async def _submit(
        self,
        waiter: _Waiter,
        cmd: Cmd,
        offset: int,
        length: int,
        flags: int,
        *,
        buf: memoryview | None = None,
        payload: memoryview | None = None,
    ) -> Reply:
        """Send one admitted request and wait for its reply."""
        async with self._send_lock:
            if self._failure is not None:
                raise self._failure
            cookie, header = self._core.request(cmd, offset, length, flags, buf=buf)
            self._waiters[cookie] = waiter
            waiter.registered = True  # from now on the reader (or _fail) releases the budget
            # Once the first byte is out the request must go out whole.
            with trio.CancelScope(shield=True):
                try:
                    await self._transport.send([header] if payload is None else [header, payload])
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail(NbdConnectionError(
                        _errno.EPIPE, f"connection to {self._address.describe()} lost: {exc}"))
        try:
            await waiter.done.wait()
        except BaseException:
            # The caller left: its buffer must not be written after this.
            self._core.abandon(cookie)
            raise
        if waiter.failure is not None:
            raise waiter.failure
        assert waiter.reply is not None
        if waiter.reply.error is not None:
            raise waiter.reply.error
        return waiter.reply

    # -- the reader task ---------------------------------------------------------
    def _complete(self, reply: Reply) -> None:
        waiter = self._waiters.pop(reply.cookie, None)
        if waiter is None:  # pragma: no cover - the core knows every cookie
            return
        waiter.reply = reply
        self._budget.release(waiter.nbytes)
        waiter.done.set()

    def _fail(self, failure: NbdConnectionError) -> None:
        if self._failure is None:
            self._failure = failure
            log.debug("NBD connection %s failed: %s", self._address.describe(), failure)
        for waiter in self._waiters.values():
            waiter.failure = self._failure
            self._budget.release(waiter.nbytes)
            waiter.done.set()
        self._waiters.clear()

    async def _read_loop(self) -> None:
        core = self._core
        where = self._address.describe()
        try:
            while True:
                event = core.next_event()
                if isinstance(event, Reply):
                    self._complete(event)
                    continue
                if not await self._transport.receive_into(core):
                    if self._disconnected and not self._waiters:
                        return
                    truncated = " in the middle of a reply" if core.mid_reply() else ""
                    raise NbdConnectionError(_errno.ECONNRESET,
                                             f"the server closed the connection{truncated} ({where})")
        except ProtocolError as exc:
            self._fail(NbdConnectionError(_errno.EPROTO, f"protocol error from the server ({where}): {exc}"))
        except NbdConnectionError as exc:
            self._fail(exc)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            self._fail(NbdConnectionError(_errno.ECONNRESET, f"connection to {where} lost: {exc}"))
        finally:
            if self._failure is None and self._waiters:
                self._fail(NbdConnectionError(_errno.ECONNABORTED, f"the client was closed ({where})"))

    async def _disconnect(self) -> None:
        """Send NBD_CMD_DISC (spec: soft disconnect) unless the connection is broken."""
        if self._disconnected:
            return
        self._disconnected = True
        if self._failure is not None:
            return
        with trio.move_on_after(DISCONNECT_TIMEOUT) as scope:
            scope.shield = True
            async with self._send_lock:
                _, header = self._core.request(Cmd.DISC)
                # Already gone: nothing to say goodbye to.
                with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._transport.send([header])


@asynccontextmanager
async def open_client(
    uri: str | NbdAddress,
    export: str | None = None,
    *,
    meta_contexts: Sequence[str] = (),
    tls: ssl.SSLContext | None = None,
    connect_timeout: float = 30.0,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> AsyncIterator[NbdClient]:
    """Connect, negotiate and yield an :class:`NbdClient`; see the module docstring.

    Raises:
        NbdConnectionError: the connection or the handshake failed.
        ValueError: a malformed address, or nbds:// without ``tls``.
    """
    address = _address(uri, tls)
    if export is not None:
        address = address._replace(export=export)
    handshake = ClientHandshake(address.export, meta_contexts=meta_contexts, tls=tls is not None)
    with trio.move_on_after(connect_timeout if connect_timeout > 0 else math.inf) as scope:
        stream = await _open_stream(address)
        try:
            current, event = await _negotiate(stream, address, handshake, tls)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    if scope.cancelled_caught:
        raise NbdConnectionError(_errno.ETIMEDOUT,
                                 f"{address.describe()}: no connection within {connect_timeout} s")
    assert isinstance(event, Negotiated)
    trailing = handshake.trailing_data()
    transport: _Transport = (_SocketTransport(stream, trailing) if current is stream
                             else _StreamTransport(current, trailing))
    client = NbdClient(transport, event.export, address, max_in_flight=max_in_flight)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop, name=f"nbd-reader {address.describe()}")
            try:
                yield client
            finally:
                await client._disconnect()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader never raises, so a lone exception came from the caller's
        # body: give it back unwrapped (``pytest.raises(NbdError)`` must work).
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
    finally:
        client._fail(NbdConnectionError(_errno.ENOTCONN, "the client was closed"))
        await transport.aclose()


async def list_exports(
    uri: str | NbdAddress, tls: ssl.SSLContext | None = None, *, connect_timeout: float = 30.0
) -> list[tuple[str, str]]:
    """``(name, description)`` of every export the server lists (NBD_OPT_LIST)."""
    address = _address(uri, tls)
    handshake = ClientHandshake(tls=tls is not None, list_exports=True)
    with trio.move_on_after(connect_timeout if connect_timeout > 0 else math.inf) as scope:
        stream = await _open_stream(address)
        current: trio.abc.Stream = stream
        try:
            current, event = await _negotiate(stream, address, handshake, tls)
            assert isinstance(event, ExportList)
            # NBD_OPT_ABORT is queued: send it and wait (briefly) for its ACK.
            with trio.move_on_after(2):
                await current.send_all(handshake.data_to_send())
                while not isinstance(handshake.next_event(), Closed):
                    data = await current.receive_some(65536)
                    if not data:
                        break
                    handshake.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, RuntimeError):
            pass  # the list is complete; how the server says goodbye does not matter
        finally:
            await trio.aclose_forcefully(current)
    if scope.cancelled_caught:
        raise NbdConnectionError(_errno.ETIMEDOUT,
                                 f"{address.describe()}: no answer within {connect_timeout} s")
    assert isinstance(event, ExportList)
    return event.exports


__all__ = [
    "NbdAddress",
    "NbdClient",
    "NbdConnectionError",
    "NbdError",
    "list_exports",
    "open_client",
    "parse_uri",
]
