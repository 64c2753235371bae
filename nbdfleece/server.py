"""The trio edge: listeners, connections, and the bytes between them and the core.

Theory of operation
-------------------
``Server.serve`` runs one accept loop per listening socket and one task per
connection.  A connection first drives :class:`~nbdfleece.handshake.ServerHandshake`
under the handshake timeout, then enters transmission:

* a *reader* loop parses request headers (28 bytes, one ``unpack``),
  validates them with the pure core, reads WRITE payloads straight into a
  pooled buffer (or writes them from the receive buffer), and serves right
  there what the node can do without waiting (``read_nowait``,
  ``write_nowait``: the page cache, tmpfs); everything else gets a task, so
  many requests run at once and replies leave in completion order;
* the reader queues its replies and sends the replies of the requests that
  arrived together with one ``writev`` (header and payload are never
  concatenated), before it looks for more input or waits
  (``Connection._reply``); request tasks send theirs at once.  Both go out
  under the connection's send lock, whole, so replies never interleave;
* the reader lets other tasks run after a bounded amount of work
  (``YIELD_CREDIT``), not after every read: one scheduler trip per request
  was a good part of a small request's cost;
* a per-connection byte budget bounds the payload and reply bytes in
  flight: the reader stops reading requests while it is exhausted, so a
  client pipelining thousands of 32 MiB writes is throttled by TCP instead of
  exhausting memory.

TLS is chosen once per connection, when ``NBD_OPT_STARTTLS`` succeeds: from
then on every byte goes through a ``trio.SSLStream`` (:class:`StreamRecvBuffer`
for reads, ``Connection._send_tls`` for replies), and the raw-socket fast
paths -- ``os.readv``/``os.writev`` on the fd, ``sendfile`` -- are used only by
plaintext connections, which pay nothing for TLS existing.

A connection never raises into the server: every failure ends that
connection only (see ``Connection.run``).  Graceful shutdown stops the
accept loops, stops every reader, lets in-flight requests finish and reply
(bounded by a grace period), closes the connections, and flushes every node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import ipaddress
import itertools
import logging
import math
import os
import socket as _stdsocket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from nbdfleece.block.node import BlockNode, Segment
from nbdfleece.buffers import BufferPool
from nbdfleece.constants import MAX_BLOCK_SIZE, Cmd, CmdFlag, Errno
from nbdfleece.errors import ConfigError, ProtocolError, RequestError, error_message, nbd_errno
from nbdfleece.exports import Export, ExportRegistry
from nbdfleece.extents import shape
from nbdfleece.handshake import NEED_DATA, Closed, Negotiated, ServerHandshake, StartTLS
from nbdfleece.tls import DistinguishedName, ServerTls, TlsMode, describe_failure, queued_alert
from nbdfleece.transmission import (
    Buffer,
    ExportState,
    Request,
    block_status_reply,
    check_magic,
    done_reply,
    error_reply,
    parse_request,
    read_reply,
    validate,
)
from nbdfleece.wire import REQUEST_HEADER

log = logging.getLogger(__name__)

RECV_BUFFER = 64 * 1024
"""Batches many small requests per ``readv``; large payloads bypass it (read in place)."""
SENDFILE_MIN = 64 * 1024
"""Reads at least this long are sent with sendfile where the node allows it."""
SENDFILE_TO_LOCAL_PEERS = False
"""Whether clients on this host (loopback TCP, unix sockets) get ``sendfile`` replies.

They do not: measured on loopback (bench/README.md), a reply copied through a
pooled buffer costs the server no more CPU than ``sendfile`` of a tmpfs file,
and the client spends 30-45 % less receiving it (cache-warm socket pages
instead of the file's page-cache pages), so sequential reads ran 9-39 %
faster.  A remote client does not share our CPUs; there ``sendfile`` saves the
server that copy."""
SPARSE_READ_MIN = 64 * 1024
"""Reads at least this long may answer holes with OFFSET_HOLE chunks."""
REQUEST_OVERHEAD = 64 * 1024
"""Budget charged per request on top of its bytes: bounds the task count too."""
IOV_MAX = 1024
YIELD_CREDIT = 128
"""How much the reader serves back to back before it lets other tasks run: a
request costs 1 plus 1 per 64 KiB it moves (128 small reads, 25 of 256 KiB:
a few ms at most).  Yielding twice as often made nbdcopy writes (4 connections)
3-8 % slower here; half as often was no faster."""
REPLY_BATCH_BYTES = 256 * 1024
REPLY_BATCH_COUNT = 16
"""Replies of requests that arrived together are queued and sent with one
``writev``: always before the reader waits for input, and as soon as the queue
holds this many bytes or replies (a client waits for replies to send more)."""
TLS_COALESCE_MAX = 16 * 1024
"""Reply parts shorter than this share one TLS record with their neighbours."""
TLS_CLOSE_TIMEOUT = 1.0
"""How long closing a TLS connection may spend sending close_notify."""
_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)
"""Plain ints for the per-request flag tests: ``int & IntFlag`` costs a Flag object."""
_CREATED_SOCKET_PATHS: set[str] = set()
ACCEPT_CAPACITY_ERRNOS = {_errno.EMFILE, _errno.ENFILE, _errno.ENOMEM, _errno.ENOBUFS}


@dataclass(frozen=True)
class Limits:
    """Timeouts and bounds that protect the server from its clients."""

    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    """A request whose header or payload stalls this long ends the connection."""
    idle_timeout: float = 0.0
    """Close connections idle this long with nothing in flight (0: never)."""
    inflight_bytes: int = 2 * MAX_BLOCK_SIZE + 4 * REQUEST_OVERHEAD
    shutdown_grace: float = 30.0

    def __post_init__(self) -> None:
        # NaN passes every "< 0" test and then breaks trio's timeouts, client by client.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{f.name.replace('_', '-')} must be a finite number, not negative "
                                  f"(got {value!r})")


class PeerClosed(Exception):
    """The client closed its side."""


class ByteBudget:
    """A counting limit on bytes in flight; one oversized request may still pass alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    def would_wait(self, n: int) -> bool:
        return bool(self.used) and self.used + n > self.limit

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._lot.park()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._lot:
            self._lot.unpark_all()


class RecvBuffer:
    """Buffered reads from a trio socket, with payloads read in place.

    ``before_wait`` runs whenever a read is about to wait for the peer: the
    connection sends its queued replies then, since the client may be waiting
    for them before it sends more.
    """

    def __init__(self, sock: trio.socket.SocketType, initial: bytes = b"",
                 before_wait: Callable[[], Awaitable[None]] | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.before_wait = before_wait
        self._buf = bytearray(max(RECV_BUFFER, len(initial)))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = len(initial)
        self._buf[: self._end] = initial

    @property
    def available(self) -> int:
        return self._end - self._start

    async def _recv(self, timeout: float) -> None:
        if self._start == self._end:
            self._start = self._end = 0  # empty: read into the whole buffer
        elif self._end == len(self._buf):
            avail = self.available
            self._buf[:avail] = self._view[self._start : self._end]
            self._start, self._end = 0, avail
        n = await recv_into(self._fd, [self._view[self._end :]], timeout, self.before_wait)
        if n == 0:
            raise PeerClosed("peer closed the connection")
        self._end += n

    async def read_exact(self, n: int, first_timeout: float, timeout: float) -> memoryview:
        """``n`` buffered bytes; valid until the next call.

        ``first_timeout`` applies while nothing of the message has arrived,
        ``timeout`` once it has started (0 means none).
        """
        while self.available < n:
            if len(self._buf) - self._start < n:
                avail = self.available
                self._buf[:avail] = self._view[self._start : self._end]
                self._start, self._end = 0, avail
            await self._recv(first_timeout if self.available == 0 else timeout)
        view = self._view[self._start : self._start + n]
        self._start += n
        return view

    def buffered(self, n: int) -> memoryview:
        """The next ``n`` buffered bytes (``n <= available``), left in place."""
        return self._view[self._start : self._start + n]

    def take(self, n: int) -> memoryview:
        """The next ``n`` buffered bytes (``n <= available``), consumed; valid
        until the next read."""
        start = self._start
        self._start = start + n
        return self._view[start : start + n]

    def consume(self, n: int) -> None:
        self._start += n

    async def receive_some(self) -> None:
        """Wait until at least one more byte is buffered."""
        await self._recv(0)

    async def peek(self, n: int, first_timeout: float, timeout: float) -> memoryview:
        """Like ``read_exact`` but leaves the bytes buffered."""
        view = await self.read_exact(n, first_timeout, timeout)
        self._start -= n
        return view

    async def read_into(self, dest: memoryview, timeout: float) -> None:
        """Fill ``dest``: buffered bytes first, then straight from the socket.

        The socket reads go to ``dest`` and on into the (then empty) buffer,
        so the next request header usually comes with the payload's last read.
        """
        take = min(self.available, len(dest))
        dest[:take] = self._view[self._start : self._start + take]
        self._start += take
        pos = take
        while pos < len(dest):
            self._start = self._end = 0
            n = await recv_into(self._fd, [dest[pos:], self._view], timeout, self.before_wait)
            if n == 0:
                raise PeerClosed("peer closed the connection mid-payload")
            pos += n
            self._end = max(0, pos - len(dest))  # what went past ``dest`` into the buffer

    async def discard(self, n: int, timeout: float) -> None:
        while n:
            if not self.available:
                self._start = self._end = 0
                await self._recv(timeout)
            take = min(n, self.available)
            self._start += take
            n -= take


class StreamRecvBuffer(RecvBuffer):
    """:class:`RecvBuffer` over a trio stream (TLS): the same buffering, no raw-fd reads."""

    def __init__(self, sock: trio.socket.SocketType, stream: trio.abc.ReceiveStream,
                 initial: bytes = b"",
                 before_wait: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(sock, initial, before_wait)
        self._stream = stream

    async def _recv(self, timeout: float) -> None:
        if self._end == len(self._buf):
            avail = self.available
            self._buf[:avail] = self._view[self._start : self._end]
            self._start, self._end = 0, avail
        if self.before_wait is not None:  # a TLS receive may always wait
            await self.before_wait()
        data = await receive_stream(self._stream, len(self._buf) - self._end, timeout)
        self._buf[self._end : self._end + len(data)] = data
        self._end += len(data)

    async def read_into(self, dest: memoryview, timeout: float) -> None:
        take = min(self.available, len(dest))
        dest[:take] = self._view[self._start : self._start + take]
        self._start += take
        pos = take
        while pos < len(dest):
            if self.before_wait is not None:
                await self.before_wait()
            data = await receive_stream(self._stream, len(dest) - pos, timeout)
            dest[pos : pos + len(data)] = data
            pos += len(data)


async def receive_stream(stream: trio.abc.ReceiveStream, max_bytes: int, timeout: float) -> bytes:
    """Up to ``max_bytes`` from ``stream`` (waiting at most ``timeout``, 0: forever)."""
    try:
        if timeout > 0:
            with trio.fail_after(timeout):
                data = await stream.receive_some(max_bytes)
        else:
            data = await stream.receive_some(max_bytes)
    except trio.BrokenResourceError as exc:  # e.g. TCP closed without TLS close_notify
        raise PeerClosed(f"peer closed the connection: {describe_failure(exc)}") from None
    if not data:
        raise PeerClosed("peer closed the connection")
    return bytes(data)


async def send_stream(stream: trio.abc.SendStream, data: Buffer) -> None:
    """``stream.send_all``, failing as a socket would (OSError), so callers treat both alike."""
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError as exc:
        raise ConnectionResetError(_errno.ECONNRESET, describe_failure(exc)) from None


class ReplayedStream(trio.abc.Stream):
    """``stream``, whose first received bytes are ``head``.

    Bytes that arrived right after ``NBD_OPT_STARTTLS`` (a client that did not
    wait for the ACK) are the start of its TLS handshake: they are fed to TLS,
    never parsed as options.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._head:
            await trio.lowlevel.checkpoint()
            n = len(self._head) if max_bytes is None else max_bytes
            data, self._head = self._head[:n], self._head[n:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def recv_into(fd: int, views: list[memoryview], timeout: float,
                    before_wait: Callable[[], Awaitable[None]] | None = None) -> int:
    """``readv`` straight into ``views``; waits (up to ``timeout``, 0: forever) only when empty.

    A read that finds data returns without a checkpoint: the request reader
    yields after every ``YIELD_CREDIT`` worth of requests instead
    (``Connection._read_loop``), so a client that never lets the socket run dry
    still cannot starve other connections or cancellation, and the common path
    pays no scheduler trip.
    """
    try:
        return os.readv(fd, views)
    except BlockingIOError:
        pass
    if before_wait is not None:
        await before_wait()
    while True:
        if timeout > 0:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.wait_readable(fd)
        try:
            return os.readv(fd, views)
        except BlockingIOError:
            continue


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``views``."""
    while sent:
        head = views[0]
        if sent >= len(head):
            sent -= len(head)
            del views[0]
        else:
            views[0] = head[sent:]
            sent = 0


async def send_more(sock: _stdsocket.socket, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` with MSG_MORE (more bytes follow at once) in as few ``sendmsg`` as possible.

    ``sock`` is the connection's stdlib view of its socket, made once per
    connection (``Connection._raw``): building one per call costs three syscalls.
    """
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        try:
            sent = sock.sendmsg(views[:IOV_MAX], (), _stdsocket.MSG_MORE)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        _advance(views, sent)


async def sendfile_all(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """``sendfile`` a file range completely (short counts and EAGAIN retried)."""
    while count:
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, count)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock_fd)
            continue
        if sent == 0:
            raise OSError(_errno.EIO, "file shorter than the export (was it truncated?)")
        offset += sent
        count -= sent


async def send_all(fd: int, parts: Sequence[Buffer]) -> None:
    """Send every buffer in order with as few ``writev`` calls as possible."""
    sent = 0
    if len(parts) <= IOV_MAX:  # the common case: one writev, no views to build
        with contextlib.suppress(BlockingIOError):
            sent = os.writev(fd, parts)
        if sent == sum(map(len, parts)):
            return
    views = [memoryview(p) for p in parts if len(p)]
    _advance(views, sent)
    while views:
        try:
            sent = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        _advance(views, sent)


class Connection:
    """One client, from greeting to close."""

    def __init__(self, server: Server, sock: trio.socket.SocketType, conn_id: int,
                 tls: ServerTls | None = None, peer: str = "?") -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.peer = peer
        self.tls_config = tls
        self.tls: trio.SSLStream[trio.abc.Stream] | None = None
        """Set once TLS is up; from then on every byte goes through it."""
        self.limits = server.limits
        self._send_lock = trio.Lock()
        self._budget = ByteBudget(self.limits.inflight_bytes)
        self._reader_scope = trio.CancelScope()
        self._handshake_scope: trio.CancelScope | None = None
        self._stopping = False
        self._inflight = 0
        self._raw: _stdsocket.socket | None = None
        """Set while replies may use ``sendfile``: a stdlib socket on ``fd`` (for
        ``sendmsg`` with flags); plaintext connections only."""
        self._queued: list[Buffer] = []
        """Whole replies of the reader's, not sent yet (see ``_reply``)."""
        self._queued_bytes = 0
        self._queued_replies = 0
        self._queued_bufs: list[bytearray] = []
        self._reader_sending = False
        self._replies_cut = False

    def stop(self) -> None:
        """Stop reading requests; in-flight ones finish and reply.

        A reader that is sending replies is cancelled only once that send is
        done (``_reader_done_sending``): a reply is never cut by a stop.
        """
        self._stopping = True
        if not self._reader_sending:
            self._reader_scope.cancel()
        if self._handshake_scope is not None:
            self._handshake_scope.cancel()

    async def run(self) -> None:
        try:
            negotiated, trailing = await self._handshake()
            if negotiated is not None:
                await self._transmission(negotiated, trailing)
        except PeerClosed as exc:
            log.debug("conn %d: %s", self.id, exc)
        except trio.TooSlowError:
            log.info("conn %d: timed out", self.id)
        except ProtocolError as exc:
            log.warning("conn %d: protocol error: %s", self.id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("conn %d: transport closed: %s", self.id, exc)
        except Exception:
            log.exception("conn %d: internal error; closing this connection", self.id)
        finally:
            if self.tls is not None:
                await self._close_tls(self.tls)
            self.sock.close()
            log.debug("conn %d: closed", self.id)

    # -- handshake ----------------------------------------------------------
    async def _handshake(self) -> tuple[Negotiated | None, bytes]:
        tls = self.tls_config
        hs = ServerHandshake(self.server.registry, tls.policy if tls is not None else None)
        with trio.move_on_after(self.limits.handshake_timeout or math.inf) as scope:
            self._handshake_scope = scope
            if self._stopping:
                return None, b""
            await self._handshake_send(hs.data_to_send())
            while True:
                event = hs.next_event()
                for denial in hs.take_denials():
                    log.warning("conn %d: %s refused: %s", self.id, self.peer, denial)
                out = hs.data_to_send()
                if out:
                    await self._handshake_send(out)
                if event is NEED_DATA:
                    hs.receive_data(await self._handshake_recv())
                    continue
                if isinstance(event, StartTLS):
                    if not await self._start_tls(hs, event.pending):
                        return None, b""
                    continue
                if isinstance(event, Closed):
                    level = logging.WARNING if event.hard else logging.DEBUG
                    log.log(level, "conn %d: handshake ended: %s", self.id, event.reason)
                    return None, b""
                assert isinstance(event, Negotiated)
                self._handshake_scope = None
                return event, hs.trailing_data()
        if not self._stopping:
            log.info("conn %d: handshake with %s timed out", self.id, self.peer)
        return None, b""

    async def _handshake_send(self, data: bytes) -> None:
        if self.tls is None:
            await send_all(self.fd, [data])
        else:
            await send_stream(self.tls, data)

    async def _handshake_recv(self) -> bytes:
        if self.tls is None:
            data = await self.sock.recv(65536)
            if not data:
                raise PeerClosed("peer closed the connection during the handshake")
            return data
        return await receive_stream(self.tls, 65536, 0)

    # -- TLS ----------------------------------------------------------------
    async def _start_tls(self, hs: ServerHandshake, pending: bytes) -> bool:
        """The TLS handshake after STARTTLS's ACK; False (logged) if it fails.

        Runs under the handshake timeout.  A client whose certificate is
        missing or not signed by the CA fails here, before any option is read
        inside TLS.
        """
        config = self.tls_config
        assert config is not None
        transport: trio.abc.Stream = trio.SocketStream(self.sock)
        if pending:
            log.debug("conn %d: %d bytes sent before STARTTLS's reply go to TLS", self.id, len(pending))
            transport = ReplayedStream(transport, pending)
        stream = trio.SSLStream(transport, config.context, server_side=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("conn %d: TLS handshake with %s failed: %s; refused",
                        self.id, self.peer, describe_failure(exc))
            if alert := queued_alert(stream):  # the client learns why (trio does not send it)
                with trio.move_on_after(TLS_CLOSE_TIMEOUT) as scope:
                    scope.shield = True
                    with contextlib.suppress(OSError):
                        await send_all(self.fd, [alert])
            return False
        peer = DistinguishedName.from_peercert(stream.getpeercert())
        self.tls = stream
        # Chosen once: replies go through TLS from now on (the plaintext
        # ``_send`` stays the raw-fd fast path, untouched).
        self._send = self._send_tls  # type: ignore[method-assign]
        hs.tls_established(peer)
        cipher = stream.cipher()
        log.info("conn %d: %s with %s (%s), client certificate: %s", self.id, stream.version(),
                 self.peer, cipher[0] if cipher else "?", peer if peer is not None else "none")
        return True

    async def _send_tls(self, parts: Sequence[Buffer]) -> None:
        """``_send`` once TLS is up: small parts coalesced, large ones encrypted as they are."""
        stream = self.tls
        assert stream is not None
        async with self._send_lock:
            small = bytearray()
            for part in parts:
                if len(part) < TLS_COALESCE_MAX:
                    small += part
                    continue
                if small:
                    await send_stream(stream, small)
                    small = bytearray()
                await send_stream(stream, part)
            if small:
                await send_stream(stream, small)

    async def _close_tls(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        """Send close_notify (spec: SHOULD shut TLS down first), bounded and shielded."""
        with trio.move_on_after(TLS_CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()

    # -- transmission -------------------------------------------------------
    async def _transmission(self, negotiated: Negotiated, trailing: bytes) -> None:
        export = self.server.registry.get(negotiated.export.name)
        if export is None:  # removed between GO and now
            return
        info = negotiated.export
        state = ExportState(info.size, info.read_only, negotiated.structured, negotiated.contexts)
        log.info(
            "conn %d: export '%s' (%s, structured=%s, contexts=%s)",
            self.id, info.name, "ro" if info.read_only else "rw",
            negotiated.structured, sorted(negotiated.contexts.values()),
        )
        self.server.attach(export)
        if self.tls is None and (SENDFILE_TO_LOCAL_PEERS or not is_local_peer(self.sock)):
            # A stdlib view of our own fd, for sendmsg(MSG_MORE) before sendfile.
            # self.sock owns the fd: this one is detached below, never closed.
            self._raw = _stdsocket.socket(self.sock.family, self.sock.type, self.sock.proto,
                                          fileno=self.fd)
        try:
            rbuf = (RecvBuffer(self.sock, trailing, self._flush) if self.tls is None
                    else StreamRecvBuffer(self.sock, self.tls, trailing, self._flush))
            async with trio.open_nursery() as requests:
                with self._reader_scope:
                    try:
                        await self._read_loop(rbuf, state, export, requests)
                    except PeerClosed as exc:
                        log.debug("conn %d: %s", self.id, exc)
                    except trio.TooSlowError:
                        log.info("conn %d: request stalled; disconnecting", self.id)
                    except ProtocolError as exc:
                        log.warning("conn %d: protocol error: %s", self.id, exc)
                    except OSError as exc:  # reset / broken pipe: in-flight requests still finish
                        log.debug("conn %d: transport error: %s", self.id, exc)
                await self._flush_last()
        finally:
            self.server.detach(export)
            if self._raw is not None:
                self._raw.detach()
                self._raw = None

    async def _read_loop(
        self, rbuf: RecvBuffer, state: ExportState, export: Export, requests: trio.Nursery
    ) -> None:
        """Parse, validate and dispatch requests until the client leaves.

        What the node can do without waiting is done right here, without a
        task; those replies are queued (``_reply``) and leave together, with
        one ``writev``, once the requests that had already arrived are served.
        """
        limits = self.limits
        hsize = REQUEST_HEADER.size
        credit = YIELD_CREDIT
        while True:
            if credit <= 0:  # let other connections and tasks run (see YIELD_CREDIT)
                credit = YIELD_CREDIT
                if self._queued:
                    await self._flush()
                await trio.lowlevel.checkpoint()
            if rbuf.available >= hsize:
                header = rbuf.take(hsize)
            elif not rbuf.available:
                # Everything that arrived is served: reply before looking for more.
                # (Reading first would find nothing from a client that waits for
                # these, and put the reply after a failed read and the wait setup.)
                if self._queued:
                    await self._flush()
                if not limits.idle_timeout:
                    await rbuf.receive_some()
                elif not await self._wait_not_idle(rbuf):
                    log.info("conn %d: idle for %gs; disconnecting", self.id, limits.idle_timeout)
                    return
                continue
            else:
                # Judge the magic as soon as it is here: a stray option after GO
                # is shorter than a request header and must not wait for 28 bytes.
                check_magic(await rbuf.peek(4, limits.request_timeout, limits.request_timeout))
                header = await rbuf.read_exact(hsize, limits.request_timeout, limits.request_timeout)
            req = parse_request(header)
            credit -= 1 + (req.length >> 16)
            if req.type == Cmd.DISC:
                log.debug("conn %d: client disconnected", self.id)
                return
            try:
                validate(state, req)
            except RequestError as exc:
                if req.payload_length:
                    await rbuf.discard(req.payload_length, limits.request_timeout)
                await self._reply([error_reply(state.structured, req.cookie, exc.errno, exc.message)])
                continue
            if req.type == Cmd.READ:
                if await self._read_inline(req, state, export):
                    continue
            elif req.type == Cmd.WRITE and await self._write_buffered(req, state, export, rbuf):
                continue
            cost = REQUEST_OVERHEAD + (req.length if req.type in (Cmd.READ, Cmd.WRITE) else 0)
            if self._budget.would_wait(cost):
                await self._flush()
            await self._budget.acquire(cost)
            payload: bytearray | None = None
            if req.type == Cmd.WRITE:
                payload = await self._receive_payload(req, state, export, rbuf, cost)
                if payload is None:
                    continue
            self._inflight += 1
            requests.start_soon(self._serve, req, state, export, payload, cost)

    async def _read_inline(self, req: Request, state: ExportState, export: Export) -> bool:
        """Serve a READ in the reader if the node can without waiting (no task spawned)."""
        sparse = self._sparse(req, state)
        if req.length >= SENDFILE_MIN and state.structured and self._raw is not None:
            mapped = export.node.sendfile_map(req.offset, req.length, sparse=sparse)
            if mapped is not None:
                await self._send_file_reply(req, *mapped)
                return True
        pool = self.server.pool
        buf = pool.get(req.length)
        view = memoryview(buf)[: req.length]
        try:
            segments = export.node.read_nowait(req.offset, view, sparse=sparse)
        except OSError as exc:
            pool.put(buf)
            await self._reply([error_reply(state.structured, req.cookie, nbd_errno(exc),
                                           error_message(exc))])
            return True
        except BaseException:
            pool.put(buf)
            raise
        if segments is None:
            pool.put(buf)
            return False
        whole = len(segments) == 1 and not segments[0].zero  # one data chunk: the default
        await self._reply(read_reply(
            state.structured, req.cookie, req.offset, view,
            None if whole or not sparse else [(g.start, g.length, g.zero) for g in segments],
        ), buf)
        return True

    async def _write_buffered(self, req: Request, state: ExportState, export: Export,
                              rbuf: RecvBuffer) -> bool:
        """Write a payload that is already in the receive buffer straight from it,
        if the node can without waiting (no copy, no task, no budget)."""
        if (
            req.flags & _FUA
            or rbuf.available < req.length
            or not export.node.write_nowait(req.offset, rbuf.buffered(req.length))
        ):
            return False
        rbuf.consume(req.length)
        await self._reply([done_reply(state.structured, req.cookie)])
        return True

    async def _receive_payload(self, req: Request, state: ExportState, export: Export,
                               rbuf: RecvBuffer, cost: int) -> bytearray | None:
        """Read a WRITE's payload into a pooled buffer (``cost`` is charged already).

        None when the node took it at once: then the reply is queued and the
        buffer and budget are released; otherwise the buffer, for a task.
        """
        pool = self.server.pool
        payload = pool.get(req.length)
        try:
            view = memoryview(payload)[: req.length]
            await rbuf.read_into(view, self.limits.request_timeout)
            done = not req.flags & _FUA and export.node.write_nowait(req.offset, view)
        except BaseException:
            pool.put(payload)
            self._budget.release(cost)
            raise
        if not done:
            return payload
        pool.put(payload)
        self._budget.release(cost)
        await self._reply([done_reply(state.structured, req.cookie)])
        return None

    async def _send_file_reply(self, req: Request, file_fd: int, segments: list[Segment]) -> None:
        """Structured READ reply whose data goes file -> socket with ``sendfile``.

        Chunk headers are built exactly as ``read_reply`` builds them (for an
        empty view); the data of each OFFSET_DATA chunk follows its header.
        Replies still queued go out first, in the same ``sendmsg`` as the
        header.  A failed ``sendfile`` after a header went out cannot be
        reported on the wire any more: the connection is cut (spec: hard
        disconnect), see ``_cut_replies``.
        """
        raw = self._raw
        assert raw is not None
        triples = [(g.start, g.length, g.zero) for g in segments]
        headers = read_reply(True, req.cookie, req.offset, memoryview(b""), triples, headers_only=True)
        self._reader_sending = True
        try:
            await self._lock_send()
            try:
                parts = self._queued
                for header, (start, length, zero) in zip(headers, triples, strict=True):
                    parts.append(header)
                    if zero:
                        continue
                    # MSG_MORE queues the header with the data instead of pushing
                    # a 32-byte segment through the TCP stack on its own.
                    await send_more(raw, parts)
                    parts.clear()  # sent: drop them now (the queue is this list)
                    await sendfile_all(self.fd, file_fd, req.offset + start, length)
                if parts:
                    await send_all(self.fd, parts)
            except BaseException:
                self._cut_replies()
                raise
            finally:
                self._send_lock.release()
            self._sent_queued()
        finally:
            self._reader_done_sending()

    @staticmethod
    def _sparse(req: Request, state: ExportState) -> bool:
        return state.structured and req.length >= SPARSE_READ_MIN and not req.flags & _DF

    async def _wait_not_idle(self, rbuf: RecvBuffer) -> bool:
        """Wait for the next request; False once idle_timeout passed with nothing in flight."""
        await self._flush()  # not under the idle timeout, which must not cut a reply
        while True:
            with trio.move_on_after(self.limits.idle_timeout) as scope:
                await rbuf.receive_some()
            if not scope.cancelled_caught:
                return True
            if not self._inflight:
                return False

    # -- replies --------------------------------------------------------------
    async def _reply(self, parts: Sequence[Buffer], buf: bytearray | None = None) -> None:
        """Queue one whole reply of the reader's; ``buf`` (a pooled buffer the
        parts point into) goes back to the pool once it is sent."""
        queued = self._queued
        for part in parts:
            queued.append(part)
            self._queued_bytes += len(part)
        if buf is not None:
            self._queued_bufs.append(buf)
        self._queued_replies += 1
        if self._queued_bytes >= REPLY_BATCH_BYTES or self._queued_replies >= REPLY_BATCH_COUNT:
            await self._flush()

    async def _flush(self) -> None:
        """Send the queued replies.

        The queue is emptied only once they are sent, so a stop (which may
        only cancel the reader while it waits for input, see ``stop``) never
        loses a reply the client is owed.
        """
        if not self._queued:
            return
        self._reader_sending = True
        try:
            await self._send(self._queued)
        finally:
            self._reader_done_sending()
        self._sent_queued()

    def _sent_queued(self) -> None:
        self._queued.clear()
        self._queued_bytes = self._queued_replies = 0
        if self._queued_bufs:
            pool = self.server.pool
            for buf in self._queued_bufs:
                pool.put(buf)
            self._queued_bufs = []

    async def _flush_last(self) -> None:
        """After the reader stopped: send what it queued if the connection still
        works (in-flight requests go on replying), else drop it."""
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("conn %d: queued replies not delivered: %s", self.id, exc)
        finally:
            self._sent_queued()

    def _reader_done_sending(self) -> None:
        self._reader_sending = False
        if self._stopping:
            self._reader_scope.cancel()  # the stop that waited for this send

    async def _lock_send(self) -> None:
        """Take the send lock, without a checkpoint when it is free (the common case).

        Refuses once ``_cut_replies`` ran: the stream may hold part of a reply.
        """
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        if self._replies_cut:
            lock.release()
            raise BrokenPipeError(_errno.EPIPE, "an earlier reply was cut short")

    def _cut_replies(self) -> None:
        """A plaintext send failed or was cancelled, maybe part-way through a
        reply: nothing may follow it on the wire, so the write side is shut."""
        self._replies_cut = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(_stdsocket.SHUT_WR)

    async def _send(self, parts: Sequence[Buffer]) -> None:
        """Send whole replies on a plaintext connection (``_send_tls`` replaces it under TLS)."""
        if self._send_lock.locked() or self._replies_cut:
            await self._lock_send()
        else:
            self._send_lock.acquire_nowait()  # the common case, without a coroutine
        try:
            await send_all(self.fd, parts)
        except BaseException:
            self._cut_replies()
            raise
        finally:
            self._send_lock.release()

    async def _serve(
        self,
        req: Request,
        state: ExportState,
        export: Export,
        payload: bytearray | None,
        cost: int,
    ) -> None:
        pool = self.server.pool
        buf = payload
        try:
            try:
                if req.type == Cmd.READ:
                    buf = pool.get(req.length)
                parts = await self._execute(req, state, export, buf)
            except Exception as exc:
                if not isinstance(exc, RequestError | OSError):
                    log.exception("conn %d: request %s failed unexpectedly", self.id, req)
                errno = nbd_errno(exc)
                log.debug("conn %d: %s -> %s", self.id, req, errno.name)
                parts = [error_reply(state.structured, req.cookie, errno, error_message(exc))]
            try:
                await self._send(parts)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("conn %d: reply not delivered: %s", self.id, exc)
                self._reader_scope.cancel()
        finally:
            if buf is not None:
                pool.put(buf)
            self._budget.release(cost)
            self._inflight -= 1

    async def _execute(
        self, req: Request, state: ExportState, export: Export, buf: bytearray | None
    ) -> list[Buffer]:
        node = export.node
        fua = bool(req.flags & CmdFlag.FUA)
        structured = state.structured
        kind = req.type
        if kind == Cmd.READ:
            assert buf is not None
            view = memoryview(buf)[: req.length]
            if not req.length:
                return read_reply(structured, req.cookie, req.offset, view)
            sparse = self._sparse(req, state)
            segments = await node.read(req.offset, view, sparse=sparse)
            return read_reply(
                structured,
                req.cookie,
                req.offset,
                view,
                [(s.start, s.length, s.zero) for s in segments] if sparse else None,
            )
        if kind == Cmd.WRITE:
            assert buf is not None
            if req.length:
                await node.write(req.offset, memoryview(buf)[: req.length], fua=fua)
        elif kind == Cmd.WRITE_ZEROES:
            if req.length:
                await node.write_zeroes(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & CmdFlag.NO_HOLE,
                    fua=fua,
                    fast=bool(req.flags & CmdFlag.FAST_ZERO),
                )
        elif kind == Cmd.TRIM:
            if req.length:
                await node.trim(req.offset, req.length, fua=fua)
        elif kind == Cmd.FLUSH:
            await node.flush()
        elif kind == Cmd.CACHE:
            if req.length:
                await node.cache(req.offset, req.length)
        elif kind == Cmd.BLOCK_STATUS:
            return await self._block_status(req, state, export)
        else:  # validate() lets only known commands through
            raise RequestError(Errno.EINVAL, f"unknown command {kind}")
        return [done_reply(structured, req.cookie)]

    async def _block_status(self, req: Request, state: ExportState, export: Export) -> list[Buffer]:
        if not req.length:
            raise RequestError(Errno.EINVAL, "block status of 0 bytes")
        req_one = bool(req.flags & CmdFlag.REQ_ONE)
        chunks: list[Buffer] = []
        items = sorted(state.contexts.items())
        for i, (context_id, context) in enumerate(items):
            raw = await export.extents(context, req.offset, req.length)
            extents = shape(raw, req.length, req_one=req_one)
            chunks.append(block_status_reply(req.cookie, context_id, extents, i == len(items) - 1))
        return chunks


class Server:
    """Accepts connections on any number of sockets and serves the registry."""

    def __init__(
        self,
        registry: ExportRegistry,
        limits: Limits | None = None,
        *,
        tls: ServerTls | None = None,
        allow_plaintext_network: bool = False,
    ) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        self.tls = tls
        """Every listener's TLS unless ``add_listener`` is given its own (QMP tls-creds)."""
        self.allow_plaintext_network = allow_plaintext_network
        self.pool = BufferPool(256 * 1024 * 1024)
        self._connections: set[Connection] = set()
        self._ids = itertools.count(1)
        self._accept_scope: trio.CancelScope | None = None
        self._accept_nursery: trio.Nursery | None = None
        self._conn_nursery: trio.Nursery | None = None
        self._nodes_in_use: dict[BlockNode, int] = {}
        self._shutdown_requested = False

    def attach(self, export: Export) -> None:
        self._nodes_in_use[export.node] = self._nodes_in_use.get(export.node, 0) + 1

    def detach(self, export: Export) -> None:
        left = self._nodes_in_use.get(export.node, 1) - 1
        if left:
            self._nodes_in_use[export.node] = left
        else:
            self._nodes_in_use.pop(export.node, None)

    def shutdown(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._shutdown_requested = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def serve(
        self,
        listeners: Sequence[trio.socket.SocketType],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as conn_nursery:
            async with trio.open_nursery() as accept_nursery:
                self._accept_scope = accept_nursery.cancel_scope
                self._accept_nursery, self._conn_nursery = accept_nursery, conn_nursery
                if self._shutdown_requested:
                    accept_nursery.cancel_scope.cancel()
                for lsock in listeners:
                    self.add_listener(lsock)
                # Listeners may come and go (QMP nbd-server-start/stop), and
                # connections may arrive without one: run until shutdown().
                accept_nursery.start_soon(trio.sleep_forever)
                task_status.started()
            log.info("stopping: %d connection(s) finishing", len(self._connections))
            for conn in list(self._connections):
                conn.stop()
            conn_nursery.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace
        await self.flush_all()

    def check_listener(self, lsock: trio.socket.SocketType, tls: ServerTls | None = None) -> str | None:
        """Refuse plaintext NBD on a TCP address other hosts can reach; return a warning to log.

        ``ValueError`` unless the address is loopback, TLS is on, or
        ``allow_plaintext_network`` was given (then the warning says what that means).
        """
        tls = tls or self.tls
        if lsock.family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
            return None
        if ipaddress.ip_address(lsock.getsockname()[0].partition("%")[0]).is_loopback:
            return None
        where = describe_listener(lsock)
        if tls is None:
            if not self.allow_plaintext_network:
                raise ValueError(
                    f"refusing to serve NBD without TLS on {where}, which other hosts can reach: "
                    "use --tls (or listen on a loopback address or a unix: socket); "
                    "--allow-plaintext-network accepts that disk contents cross the network "
                    "unencrypted and that anyone who can connect may read and write the exports"
                )
            return (f"serving NBD without TLS on {where} (--allow-plaintext-network): anyone who "
                    "can reach it may read and write the exports, and data crosses the network "
                    "unencrypted")
        if tls.policy.mode is TlsMode.OPTIONAL:
            return (f"--tls optional on {where}: exports not marked tls-only are also served to "
                    "plaintext clients")
        return None

    def add_listener(self, lsock: trio.socket.SocketType, tls: ServerTls | None = None
                     ) -> Callable[[], None]:
        """Accept on ``lsock`` while serving; returns a function that stops it.

        ``tls`` (default: the server's) applies to every connection accepted here.
        """
        if self._accept_nursery is None or self._conn_nursery is None:
            raise RuntimeError("the server is not running")
        tls = tls or self.tls
        warning = self.check_listener(lsock, tls)
        if warning is not None:
            log.warning("%s", warning)
        scope = trio.CancelScope()
        conn_nursery = self._conn_nursery

        async def accept() -> None:
            try:
                with scope:
                    await self._accept_loop(lsock, conn_nursery, tls)
            finally:
                close_listener(lsock)

        self._accept_nursery.start_soon(accept)
        return scope.cancel

    async def flush_all(self) -> None:
        for export in self.registry:
            if export.read_only or export.node.read_only:
                continue
            try:
                await export.node.flush()
            except OSError as exc:
                log.error("flush of export '%s' failed: %s", export.name, exc)

    async def _accept_loop(self, lsock: trio.socket.SocketType, nursery: trio.Nursery,
                           tls: ServerTls | None = None) -> None:
        while True:
            try:
                sock, _addr = await lsock.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept: %s; retrying shortly", exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (_errno.ECONNABORTED, _errno.EPROTO, _errno.EINTR):
                    continue
                raise
            if sock.family in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            nursery.start_soon(self._handle, sock, tls)

    async def _handle(self, sock: trio.socket.SocketType, tls: ServerTls | None = None) -> None:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "?"
        peer_text = describe_peer(sock.family, peer)
        conn = Connection(self, sock, next(self._ids), tls, peer_text)
        log.debug("conn %d: accepted from %s", conn.id, peer_text)
        self._connections.add(conn)
        try:
            if self._shutdown_requested:
                conn.stop()
            await conn.run()
        finally:
            self._connections.discard(conn)


# -- listening sockets -------------------------------------------------------


def open_listener(spec: str) -> trio.socket.SocketType:
    """A listening socket for ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
    if spec.startswith("unix:"):
        path = spec[5:]
        try:
            if _stdsocket.socket(_stdsocket.AF_UNIX).connect_ex(path) != 0 and os.path.exists(path):
                os.unlink(path)  # a stale socket left by a crash
        except OSError:
            pass
        sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        sock.bind(path)
        _CREATED_SOCKET_PATHS.add(path)
    else:
        host, port = parse_host_port(spec)
        infos = _stdsocket.getaddrinfo(
            host, port, type=_stdsocket.SOCK_STREAM, flags=_stdsocket.AI_PASSIVE
        )
        family, type_, proto, _, addr = infos[0]
        sock = _stdsocket.socket(family, type_, proto)
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if family == _stdsocket.AF_INET6:
            sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    sock.listen(128)
    sock.setblocking(False)
    return trio.socket.from_stdlib_socket(sock)


def close_listener(sock: trio.socket.SocketType) -> None:
    """Close a listening socket and remove its Unix socket file, if any."""
    path = sock.getsockname() if sock.family == _stdsocket.AF_UNIX else None
    sock.close()
    if path in _CREATED_SOCKET_PATHS:  # never a path systemd handed us
        _CREATED_SOCKET_PATHS.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)


def parse_host_port(spec: str) -> tuple[str, int]:
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
    else:
        host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address must be HOST:PORT or unix:PATH, not {spec!r}")
    return host or "127.0.0.1", int(port)


def systemd_listeners() -> list[trio.socket.SocketType]:
    """Sockets passed by systemd-style activation (LISTEN_PID/LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(3, 3 + count):
        os.set_inheritable(fd, False)
        sock = _stdsocket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(trio.socket.from_stdlib_socket(sock))
    return socks


def is_local_peer(sock: trio.socket.SocketType) -> bool:
    """True for a unix socket or a loopback TCP peer: a client sharing our CPUs."""
    if sock.family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
        return True
    try:
        address = ipaddress.ip_address(sock.getpeername()[0].partition("%")[0])
    except (OSError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def describe_peer(family: int, address: object) -> str:
    """``1.2.3.4:5678``, ``[::1]:5678`` or ``unix socket``, for the logs."""
    if family == _stdsocket.AF_INET6 and isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}"
    if family == _stdsocket.AF_INET and isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return "unix socket" if family == _stdsocket.AF_UNIX else str(address)


def describe_listener(sock: trio.socket.SocketType) -> str:
    name = sock.getsockname()
    if sock.family == _stdsocket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == _stdsocket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
