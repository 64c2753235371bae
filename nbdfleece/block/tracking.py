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

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.node import BlockNode, Layer


class DirtyTracking(Layer):
    """Holds a node's named bitmaps and marks the recording ones."""

    def __init__(self, name: str, child: BlockNode) -> None:
        super().__init__(name, child)
        self.bitmaps: dict[str, DirtyBitmap] = {}

    def mark(self, offset: int, length: int) -> None:
        if not self.bitmaps:
            return
        for bitmap in self.bitmaps.values():
            if bitmap.recording:
                bitmap.mark(offset, length)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.mark(offset, len(data))
        await self.child.write(offset, data, fua=fua)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self.mark(offset, len(data))
        return self.child.write_nowait(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        self.mark(offset, length)
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.mark(offset, length)
        await self.child.trim(offset, length, fua=fua)
