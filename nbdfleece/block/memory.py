"""A store in a ``bytearray``: scratch space and a fast, exact node for tests."""

from __future__ import annotations

from nbdfleece.block.node import BlockNode, Extent, Segment
from nbdfleece.constants import AllocationState


class MemoryStore(BlockNode):
    """All bytes in memory; every range reports as allocated data."""

    def __init__(self, name: str, size: int, *, read_only: bool = False) -> None:
        super().__init__(name)
        self.data = bytearray(size)
        self._read_only = read_only
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        buf[:] = self.data[offset : offset + len(buf)]
        return [Segment(0, len(buf), False)]

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advisory: memory keeps the bytes."""

    async def flush(self) -> None:
        self.flushes += 1

    async def cache(self, offset: int, length: int) -> None:
        """Nothing to prefetch."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length, AllocationState(0))]
