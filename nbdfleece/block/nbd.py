"""The ``nbd`` driver: a block node whose bytes live on a remote NBD server.

QMP ``blockdev-add {"driver": "nbd", "server": {...}, "export": NAME}``
makes one (QEMU's schema).  The node keeps one connection, made with
nbdfleece's own client (``nbdfleece.client``), open for its lifetime::

    push backup job ──> [tracking] ──> NbdNode ──pipelined requests──> remote NBD server
                                          │
                       holder task: ``async with open_client(...)``, until close()

The client is an async context manager with a reader task, so a *holder*
task (in the daemon's job nursery, else a trio system task) enters it and
waits until :meth:`NbdNode.close`; requests from any number of tasks are
pipelined on that connection.

Requests are split to the server's limits (maximum block size for data,
32-bit lengths otherwise).  What the server does not offer is emulated where
the meaning allows it: FUA becomes a write then a flush, WRITE_ZEROES becomes
writes of zero buffers (never for ``fast``), TRIM, FLUSH and CACHE become
no-ops, and without ``base:allocation`` every range reports as data.  An
error reply becomes an ``OSError`` with the server's errno (so the NBD
server above answers the same errno); a lost connection is not re-made: the
node then fails every request with EIO-mapped errors until it is deleted.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from nbdfleece.block.node import BlockNode, Extent, Segment
from nbdfleece.client import NbdAddress, NbdClient, NbdConnectionError, NbdError, open_client
from nbdfleece.constants import BASE_ALLOCATION, MAX_REQUEST_LENGTH, AllocationState, TransmissionFlag

log = logging.getLogger(__name__)

ZERO_CHUNK = 1 << 20
CONNECT_TIMEOUT = 30.0


@dataclass
class _Holder:
    ready: trio.Event
    closing: trio.Event
    closed: trio.Event
    client: NbdClient | None = None
    error: BaseException | None = None


_Send = Callable[[int, int, bool], Awaitable[None]]
"""Sends one piece: ``(offset, length, fua)``."""


def _os_error(exc: NbdError) -> OSError:
    return OSError(exc.errno, exc.message)


class NbdNode(BlockNode):
    """See the module docstring; create it with :meth:`connect`."""

    def __init__(self, name: str, address: NbdAddress, holder: _Holder) -> None:
        super().__init__(name)
        assert holder.client is not None
        self.address = address
        self.client = holder.client
        self._holder = holder
        self.read_only_option = False
        """``read-only`` of the QMP node (the remote export may be read-only too)."""
        self._align = max(self.client.block_size[0], 512)
        self._max_data = self.client.block_size[2]
        self._max_length = (MAX_REQUEST_LENGTH // self._align) * self._align

    @classmethod
    async def connect(
        cls,
        name: str,
        address: NbdAddress,
        *,
        nursery: trio.Nursery | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> NbdNode:
        """Connect and negotiate (``base:allocation`` is asked for).

        Raises:
            NbdConnectionError: no connection, or the server refused the export.
        """
        holder = _Holder(trio.Event(), trio.Event(), trio.Event())

        async def hold() -> None:
            try:
                async with open_client(address, meta_contexts=(BASE_ALLOCATION,),
                                       connect_timeout=connect_timeout) as client:
                    holder.client = client
                    holder.ready.set()
                    await holder.closing.wait()
            except Exception as exc:  # reported to connect(), or logged once connected
                if holder.client is None:
                    holder.error = exc
                else:
                    log.warning("nbd node %s: %s", address.describe(), exc)
            finally:
                holder.closed.set()
                holder.ready.set()

        if nursery is not None:
            nursery.start_soon(hold, name=f"nbd-node {address.describe()}")
        else:
            trio.lowlevel.spawn_system_task(hold, name=f"nbd-node {address.describe()}")
        try:
            await holder.ready.wait()
        except BaseException:
            holder.closing.set()  # the caller left: do not leave a connection behind
            raise
        if holder.client is None:
            error = holder.error or NbdConnectionError(_errno.ECONNABORTED, "connection abandoned")
            raise error
        node = cls(name, address, holder)
        log.info("nbd node '%s': %s, %d bytes, flags %#x", name, address.describe(),
                 node.client.size, int(node.client.flags))
        return node

    # -- properties ----------------------------------------------------------
    @property
    def size(self) -> int:
        return self.client.size

    @property
    def remote_read_only(self) -> bool:
        return self.client.read_only

    @property
    def read_only(self) -> bool:
        return self.read_only_option or self.client.read_only

    @property
    def can_fast_zero(self) -> bool:
        return self.client.can(TransmissionFlag.SEND_FAST_ZERO)

    def describe(self) -> str:
        """The node's address as an NBD URI (QEMU shows one as the node's filename)."""
        address = self.address
        scheme = "nbds" if address.tls else "nbd"
        if address.socket is not None:
            return f"{scheme}+unix:///{address.export}?socket={address.socket}"
        host = f"[{address.host}]" if address.host and ":" in address.host else address.host
        return f"{scheme}://{host}:{address.port}/{address.export}"

    # -- data ----------------------------------------------------------------
    async def _each_piece(self, offset: int, length: int, limit: int, send: _Send, *,
                          fua: bool = False) -> None:
        """``send(pos, n, fua)`` for each piece of at most ``limit`` bytes of the range, in
        order; an error reply becomes an ``OSError``, and FUA the server lacks becomes a
        flush after the last piece."""
        native_fua = fua and self.client.can(TransmissionFlag.SEND_FUA)
        try:
            for pos in range(offset, offset + length, limit):
                await send(pos, min(limit, offset + length - pos), native_fua)
        except NbdError as exc:
            raise _os_error(exc) from None
        if fua and not native_fua:
            await self.flush()

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        async def send(pos: int, n: int, fua: bool) -> None:
            await self.client.pread_into(pos, buf[pos - offset : pos - offset + n])

        await self._each_piece(offset, len(buf), self._max_data, send)
        return [Segment(0, len(buf), False)]

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        async def send(pos: int, n: int, fua: bool) -> None:
            await self.client.pwrite(pos, data[pos - offset : pos - offset + n], fua=fua)

        await self._each_piece(offset, len(data), self._max_data, send, fua=fua)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        if not self.client.can(TransmissionFlag.SEND_WRITE_ZEROES) or (fast and not self.can_fast_zero):
            if fast:
                raise OSError(_errno.EOPNOTSUPP, "the NBD server cannot zero fast")
            zeroes = memoryview(bytes(min(ZERO_CHUNK, length)))
            for pos in range(offset, offset + length, ZERO_CHUNK):
                await self.write(pos, zeroes[: min(ZERO_CHUNK, offset + length - pos)], fua=fua)
            return

        async def send(pos: int, n: int, fua: bool) -> None:
            await self.client.write_zeroes(pos, n, fua=fua, no_hole=not may_trim, fast=fast)

        await self._each_piece(offset, length, self._max_length, send, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.client.can(TransmissionFlag.SEND_TRIM):
            return  # advisory: doing nothing is a valid trim

        async def send(pos: int, n: int, fua: bool) -> None:
            await self.client.trim(pos, n, fua=fua)

        await self._each_piece(offset, length, self._max_length, send, fua=fua)

    async def flush(self) -> None:
        if not self.client.can(TransmissionFlag.SEND_FLUSH):
            return  # the server promises nothing more durable than its replies
        try:
            await self.client.flush()
        except NbdError as exc:
            raise _os_error(exc) from None

    async def cache(self, offset: int, length: int) -> None:
        if not self.client.can(TransmissionFlag.SEND_CACHE):
            return

        async def send(pos: int, n: int, fua: bool) -> None:
            await self.client.cache(pos, n)

        await self._each_piece(offset, length, self._max_length, send)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if BASE_ALLOCATION not in self.client.contexts:
            return [Extent(length, AllocationState(0))]
        try:
            found = await self.client.block_status(offset, min(length, self._max_length))
        except NbdError as exc:
            raise _os_error(exc) from None
        extents: list[Extent] = []
        left = length
        known = AllocationState.HOLE | AllocationState.ZERO
        for ext_length, flags in found[BASE_ALLOCATION]:
            take = min(ext_length, left)
            extents.append(Extent(take, AllocationState(flags & known)))
            left -= take
            if not left:
                break
        return extents

    async def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``) and wait for the connection to close."""
        self._holder.closing.set()
        await self._holder.closed.wait()
