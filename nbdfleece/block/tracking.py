"""The dirty-tracking layer: every write-like request marks the node's bitmaps.

Bitmaps are marked *before* the request goes down, in the same event-loop
step, so that:

* an acknowledged write is always covered (the reply is sent later);
* a write that fails half-way (it may have partly reached the disk) is
  still covered;
* a concurrent block-status read of the bitmap sees it either before or
  after the whole mark, never torn (the loop is single-threaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.node import BlockNode, Layer

InFlight = tuple[int, int, trio.Event]
"""(start, end, done) of a modifying request that is waiting for the layers below."""


class DirtyTracking(Layer):
    """Holds a node's named bitmaps and marks the recording ones.

    It also registers every modifying request that has to wait below it, so
    that a copy-before-write layer inserted later can wait for the requests
    that were already past the insertion point (see ``block/cbw.py``).
    """

    def __init__(self, name: str, child: BlockNode) -> None:
        super().__init__(name, child)
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self._inflight: dict[int, InFlight] = {}
        self._next_id = 0

    def in_flight(self) -> list[InFlight]:
        """The modifying requests now under way below this layer."""
        return list(self._inflight.values())

    @contextlib.contextmanager
    def _registered(self, offset: int, length: int) -> Iterator[None]:
        key = self._next_id
        self._next_id += 1
        done = trio.Event()
        self._inflight[key] = (offset, offset + length, done)
        try:
            yield
        finally:
            del self._inflight[key]
            done.set()

    def mark(self, offset: int, length: int) -> None:
        if not self.bitmaps:
            return
        for bitmap in self.bitmaps.values():
            if bitmap.recording:
                bitmap.mark(offset, length)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.mark(offset, len(data))
        with self._registered(offset, len(data)):
            await self.child.write(offset, data, fua=fua)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self.mark(offset, len(data))
        return self.child.write_nowait(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        self.mark(offset, length)
        with self._registered(offset, length):
            await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.mark(offset, length)
        with self._registered(offset, length):
            await self.child.trim(offset, length, fua=fua)
