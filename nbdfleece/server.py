"""The trio edge: listeners, connections, and the bytes between them and the core.

Theory of operation
-------------------
``Server.serve`` runs one accept loop per listening socket and one task per
connection.  A connection first drives :class:`~nbdfleece.handshake.ServerHandshake`
under the handshake timeout, then enters transmission:

* a *reader* loop parses request headers (28 bytes, one ``unpack``),
  validates them with the pure core, reads WRITE payloads straight into a
  pooled buffer and starts one task per request, so many requests run at
  once and replies leave in completion order;
* request tasks call the export's block node and send their reply under the
  connection's send lock with one ``sendmsg`` (header and payload are never
  concatenated);
* a per-connection byte budget bounds the payload and reply bytes in
  flight: the reader stops reading requests while it is exhausted, so a
  client pipelining thousands of 32 MiB writes is throttled by TCP instead of
  exhausting memory.

A connection never raises into the server: every failure ends that
connection only (see ``Connection.run``).  Graceful shutdown stops the
accept loops, stops every reader, lets in-flight requests finish and reply
(bounded by a grace period), closes the connections, and flushes every node.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import itertools
import logging
import math
import os
import socket as _stdsocket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from nbdfleece.block.node import BlockNode, Segment
from nbdfleece.constants import MAX_BLOCK_SIZE, Cmd, CmdFlag, Errno
from nbdfleece.errors import ProtocolError, RequestError, error_message, nbd_errno
from nbdfleece.exports import Export, ExportRegistry
from nbdfleece.extents import shape
from nbdfleece.handshake import NEED_DATA, Closed, Negotiated, ServerHandshake
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
SPARSE_READ_MIN = 64 * 1024
"""Reads at least this long may answer holes with OFFSET_HOLE chunks."""
REQUEST_OVERHEAD = 64 * 1024
"""Budget charged per request on top of its bytes: bounds the task count too."""
IOV_MAX = 1024
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


class PeerClosed(Exception):
    """The client closed its side."""


class BufferPool:
    """Reusable request buffers by power-of-two size class.

    Allocating a fresh 32 MiB ``bytearray`` per request costs page faults and
    malloc trimming (perf-baseline observation 4); pooled buffers do not.
    """

    def __init__(self, max_cached: int = 256 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._cached = 0
        self._max_cached = max_cached

    @staticmethod
    def _size_class(n: int) -> int:
        return max(4096, 1 << (n - 1).bit_length())

    def get(self, n: int) -> bytearray:
        size = self._size_class(n)
        free = self._free.get(size)
        if free:
            self._cached -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        if self._cached + size <= self._max_cached:
            self._free.setdefault(size, []).append(buf)
            self._cached += size


class ByteBudget:
    """A counting limit on bytes in flight; one oversized request may still pass alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._lot.park()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._lot:
            self._lot.unpark_all()


class RecvBuffer:
    """Buffered reads from a trio socket, with payloads read in place."""

    def __init__(self, sock: trio.socket.SocketType, initial: bytes = b"") -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._buf = bytearray(max(RECV_BUFFER, len(initial)))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = len(initial)
        self._buf[: self._end] = initial

    @property
    def available(self) -> int:
        return self._end - self._start

    async def _recv(self, timeout: float) -> None:
        if self._end == len(self._buf):
            avail = self.available
            self._buf[:avail] = self._view[self._start : self._end]
            self._start, self._end = 0, avail
        n = await recv_into(self._fd, self._view[self._end :], timeout)
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
        """Fill ``dest``: buffered bytes first, then straight from the socket."""
        take = min(self.available, len(dest))
        dest[:take] = self._view[self._start : self._start + take]
        self._start += take
        pos = take
        while pos < len(dest):
            n = await recv_into(self._fd, dest[pos:], timeout)
            if n == 0:
                raise PeerClosed("peer closed the connection mid-payload")
            pos += n

    async def discard(self, n: int, timeout: float) -> None:
        while n:
            if not self.available:
                self._start = self._end = 0
                await self._recv(timeout)
            take = min(n, self.available)
            self._start += take
            n -= take


async def recv_into(fd: int, view: memoryview, timeout: float) -> int:
    """``readv`` straight into ``view``; waits (up to ``timeout``, 0: forever) only when empty.

    A read that finds data still passes a checkpoint, so a client that never
    lets the socket run dry cannot starve other connections or cancellation.
    """
    try:
        n = os.readv(fd, [view])
    except BlockingIOError:
        pass
    else:
        await trio.lowlevel.checkpoint()
        return n
    while True:
        if timeout > 0:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.wait_readable(fd)
        try:
            return os.readv(fd, [view])
        except BlockingIOError:
            continue


async def send_more(fd: int, data: Buffer) -> None:
    """Send ``data`` with MSG_MORE: more bytes follow at once."""
    view = memoryview(data)
    while view:
        try:
            view = view[_send_flags(fd, view, _stdsocket.MSG_MORE) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


def _send_flags(fd: int, data: memoryview, flags: int) -> int:
    with _stdsocket.socket(fileno=fd) as sock:
        try:
            return sock.send(data, flags)
        finally:
            sock.detach()


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
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        try:
            sent = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        while sent:
            head = views[0]
            if sent >= len(head):
                sent -= len(head)
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0


class Connection:
    """One client, from greeting to close."""

    def __init__(self, server: Server, sock: trio.socket.SocketType, conn_id: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.limits = server.limits
        self._send_lock = trio.Lock()
        self._budget = ByteBudget(self.limits.inflight_bytes)
        self._reader_scope = trio.CancelScope()
        self._handshake_scope: trio.CancelScope | None = None
        self._stopping = False
        self._inflight = 0

    def stop(self) -> None:
        """Stop reading requests; in-flight ones finish and reply."""
        self._stopping = True
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
            self.sock.close()
            log.debug("conn %d: closed", self.id)

    # -- handshake ----------------------------------------------------------
    async def _handshake(self) -> tuple[Negotiated | None, bytes]:
        hs = ServerHandshake(self.server.registry)
        with trio.move_on_after(self.limits.handshake_timeout or math.inf) as scope:
            self._handshake_scope = scope
            if self._stopping:
                return None, b""
            await send_all(self.fd, [hs.data_to_send()])
            while True:
                event = hs.next_event()
                out = hs.data_to_send()
                if out:
                    await send_all(self.fd, [out])
                if event is NEED_DATA:
                    data = await self.sock.recv(65536)
                    if not data:
                        raise PeerClosed("peer closed the connection during the handshake")
                    hs.receive_data(data)
                    continue
                if isinstance(event, Closed):
                    level = logging.WARNING if event.hard else logging.DEBUG
                    log.log(level, "conn %d: handshake ended: %s", self.id, event.reason)
                    return None, b""
                assert isinstance(event, Negotiated)
                self._handshake_scope = None
                return event, hs.trailing_data()
        if not self._stopping:
            log.info("conn %d: handshake timed out", self.id)
        return None, b""

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
        try:
            rbuf = RecvBuffer(self.sock, trailing)
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
        finally:
            self.server.detach(export)

    async def _read_loop(
        self, rbuf: RecvBuffer, state: ExportState, export: Export, requests: trio.Nursery
    ) -> None:
        limits = self.limits
        hsize = REQUEST_HEADER.size
        while True:
            if limits.idle_timeout and not rbuf.available and not await self._wait_not_idle(rbuf):
                log.info("conn %d: idle for %gs; disconnecting", self.id, limits.idle_timeout)
                return
            if rbuf.available < hsize:
                # Judge the magic as soon as it is here: a stray option after GO
                # is shorter than a request header and must not wait for 28 bytes.
                check_magic(await rbuf.peek(4, 0, limits.request_timeout))
            header = await rbuf.read_exact(hsize, 0, limits.request_timeout)
            req = parse_request(header)
            if req.type == Cmd.DISC:
                log.debug("conn %d: client disconnected", self.id)
                return
            try:
                validate(state, req)
            except RequestError as exc:
                if req.payload_length:
                    await rbuf.discard(req.payload_length, limits.request_timeout)
                await self._send([error_reply(state.structured, req.cookie, exc.errno, exc.message)])
                continue
            if req.type == Cmd.READ and await self._read_inline(req, state, export):
                continue
            cost = REQUEST_OVERHEAD + (req.length if req.type in (Cmd.READ, Cmd.WRITE) else 0)
            await self._budget.acquire(cost)
            payload: bytearray | None = None
            if req.type == Cmd.WRITE:
                if (
                    not req.flags & CmdFlag.FUA
                    and rbuf.available >= req.length
                    and export.node.write_nowait(req.offset, rbuf.buffered(req.length))
                ):
                    # Payload already received: written straight from the receive buffer.
                    rbuf.consume(req.length)
                    self._budget.release(cost)
                    await self._send([done_reply(state.structured, req.cookie)])
                    continue
                payload = self.server.pool.get(req.length)
                try:
                    view = memoryview(payload)[: req.length]
                    await rbuf.read_into(view, limits.request_timeout)
                    done = not req.flags & CmdFlag.FUA and export.node.write_nowait(req.offset, view)
                except BaseException:
                    self.server.pool.put(payload)
                    self._budget.release(cost)
                    raise
                if done:
                    self.server.pool.put(payload)
                    self._budget.release(cost)
                    await self._send([done_reply(state.structured, req.cookie)])
                    continue
            self._inflight += 1
            requests.start_soon(self._serve, req, state, export, payload, cost)

    async def _read_inline(self, req: Request, state: ExportState, export: Export) -> bool:
        """Serve a READ in the reader if the node can without waiting (no task spawned)."""
        sparse = self._sparse(req, state)
        if req.length >= SENDFILE_MIN and state.structured:
            mapped = export.node.sendfile_map(req.offset, req.length, sparse=sparse)
            if mapped is not None:
                await self._send_file_reply(req, *mapped)
                return True
        pool = self.server.pool
        buf = pool.get(req.length)
        try:
            view = memoryview(buf)[: req.length]
            segments: list[Segment] | None
            try:
                segments = export.node.read_nowait(req.offset, view, sparse=sparse)
            except OSError as exc:
                await self._send([error_reply(state.structured, req.cookie, nbd_errno(exc),
                                              error_message(exc))])
                return True
            if segments is None:
                return False
            await self._send(read_reply(
                state.structured, req.cookie, req.offset, view,
                [(g.start, g.length, g.zero) for g in segments] if sparse else None,
            ))
            return True
        finally:
            pool.put(buf)

    async def _send_file_reply(self, req: Request, file_fd: int, segments: list[Segment]) -> None:
        """Structured READ reply whose data goes file -> socket with ``sendfile``.

        Chunk headers are built exactly as ``read_reply`` builds them (for an
        empty view); the data of each OFFSET_DATA chunk follows its header.
        A failed ``sendfile`` after a header went out cannot be reported on
        the wire any more: the connection is closed (spec: hard disconnect).
        """
        triples = [(g.start, g.length, g.zero) for g in segments]
        headers = read_reply(True, req.cookie, req.offset, memoryview(b""), triples, headers_only=True)
        lock = self._send_lock
        async with lock:
            for header, (start, length, zero) in zip(headers, triples, strict=True):
                if zero:
                    await send_all(self.fd, [header])
                    continue
                # MSG_MORE queues the header with the data instead of pushing a
                # 28-byte segment through the TCP stack on its own.
                await send_more(self.fd, header)
                await sendfile_all(self.fd, file_fd, req.offset + start, length)

    @staticmethod
    def _sparse(req: Request, state: ExportState) -> bool:
        return state.structured and req.length >= SPARSE_READ_MIN and not req.flags & CmdFlag.DF

    async def _wait_not_idle(self, rbuf: RecvBuffer) -> bool:
        """Wait for the next request; False once idle_timeout passed with nothing in flight."""
        while True:
            with trio.move_on_after(self.limits.idle_timeout) as scope:
                await rbuf.receive_some()
            if not scope.cancelled_caught:
                return True
            if not self._inflight:
                return False

    async def _send(self, parts: Sequence[Buffer]) -> None:
        lock = self._send_lock
        if lock.locked():
            async with lock:
                await send_all(self.fd, parts)
            return
        lock.acquire_nowait()  # no checkpoint: the common, uncontended case
        try:
            await send_all(self.fd, parts)
        finally:
            lock.release()

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

    def __init__(self, registry: ExportRegistry, limits: Limits | None = None) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        self.pool = BufferPool()
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

    def add_listener(self, lsock: trio.socket.SocketType) -> Callable[[], None]:
        """Accept on ``lsock`` while serving; returns a function that stops it."""
        if self._accept_nursery is None or self._conn_nursery is None:
            raise RuntimeError("the server is not running")
        scope = trio.CancelScope()
        conn_nursery = self._conn_nursery

        async def accept() -> None:
            try:
                with scope:
                    await self._accept_loop(lsock, conn_nursery)
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

    async def _accept_loop(self, lsock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
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
            nursery.start_soon(self._handle, sock)

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        conn = Connection(self, sock, next(self._ids))
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "?"
        log.debug("conn %d: accepted from %s", conn.id, peer or "unix socket")
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


def describe_listener(sock: trio.socket.SocketType) -> str:
    name = sock.getsockname()
    if sock.family == _stdsocket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == _stdsocket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
