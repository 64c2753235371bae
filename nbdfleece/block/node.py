"""Block nodes: the storage graph that exports point at.

Theory of operation
-------------------
A *node* is anything that can serve the NBD data operations on a linear
range of bytes.  The bottom of every chain is a store (``FileStore``: a raw
file or block device).  Above it sit *layers*: nodes with one ``child`` that
see every request first and pass it down.  Dirty-bitmap tracking and
copy-before-write are layers, so they apply to every connection and every
export that reaches the node, while the protocol code only ever talks to
"the node of this export"::

    export "live" ──> [tracking layer] ──> [cbw layer] ──> FileStore(live.raw)

Every method is ``async`` because layers need to wait (cluster locks,
worker threads); a store must never block the event loop itself, see
``nbdfleece.block.file``.

Requests arrive already validated by the protocol core (in range, allowed on
this export), so nodes check only their own invariants.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from nbdfleece.constants import AllocationState


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a read: ``length`` bytes at ``start`` (relative to the read).

    ``zero`` segments were not read (they are holes that read as zeroes), so a
    structured reply can send them as ``NBD_REPLY_TYPE_OFFSET_HOLE``.
    """

    start: int
    length: int
    zero: bool


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes with ``base:allocation`` status ``flags``."""

    length: int
    flags: AllocationState


class BlockNode(abc.ABC):
    """What a node must provide; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes; fixed while the node is open."""

    @property
    @abc.abstractmethod
    def read_only(self) -> bool:
        """True when the node refuses every modification."""

    @property
    def can_fast_zero(self) -> bool:
        """Whether write_zeroes(fast=True) can ever succeed."""
        return True

    @abc.abstractmethod
    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        """Fill ``buf`` with the bytes at ``offset``.

        With ``sparse``, ranges known to read as zero may be reported as
        ``zero`` segments and left unread.  Segments cover ``buf`` in order.
        """

    @abc.abstractmethod
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is on stable storage on return."""

    @abc.abstractmethod
    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        """Make the range read as zeroes.

        ``may_trim`` allows deallocating; ``fast`` means fail with ENOTSUP
        rather than fall back to writing zero buffers.
        """

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advisory discard; afterwards the range's contents are unspecified."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint."""

    @abc.abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents from ``offset``, covering at most ``length``.

        Must return at least one extent; a range holding non-zero bytes is
        never reported with ``AllocationState.ZERO``.
        """

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        """Synchronous fast path: ``read`` if it needs no waiting, else None.

        None means "use ``read``" and leaves ``buf`` in an unspecified state.
        The server serves such requests inline, without a task per request.
        """
        return None

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        """Synchronous fast path for a non-FUA ``write``; False means "use ``write``"."""
        return False

    def sendfile_map(
        self, offset: int, length: int, *, sparse: bool = False
    ) -> tuple[int, list[Segment]] | None:
        """Zero-copy fast path: ``(fd, segments)`` when the range's bytes are
        exactly those of file ``fd`` at the same offsets and can be sent with
        ``sendfile`` without waiting for a disk; None otherwise."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default has none."""


class Layer(BlockNode):
    """A node that passes every request to ``child`` unless it overrides it.

    A layer that changes what reads return must override ``read``,
    ``read_nowait`` and ``sendfile_map`` together; one that must see every
    write overrides ``write`` and ``write_nowait``.
    """

    def __init__(self, name: str, child: BlockNode) -> None:
        super().__init__(name)
        self.child = child

    @property
    def size(self) -> int:
        return self.child.size

    @property
    def read_only(self) -> bool:
        return self.child.read_only

    @property
    def can_fast_zero(self) -> bool:
        return self.child.can_fast_zero

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        return await self.child.read(offset, buf, sparse=sparse)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self.child.write(offset, data, fua=fua)

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        return self.child.read_nowait(offset, buf, sparse=sparse)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        return self.child.write_nowait(offset, data)

    def sendfile_map(
        self, offset: int, length: int, *, sparse: bool = False
    ) -> tuple[int, list[Segment]] | None:
        return self.child.sendfile_map(offset, length, sparse=sparse)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self.child.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.child.block_status(offset, length)

    async def close(self) -> None:
        await self.child.close()
