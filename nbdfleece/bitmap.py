"""Dirty bitmaps: one bool per granule, numpy only, no Python loop over granules.

A write of ``[offset, offset+length)`` dirties every granule it touches, so a
1-byte write dirties its whole granule::

    granule   |   0   |   1   |   2   |   3   |
    write           [=====)
    dirty           ^^^^^^^^^^^^^^^^              granules 0 and 1

Extents for ``qemu:dirty-bitmap:NAME`` block status are runs of equal bits,
found with ``np.flatnonzero(bits[1:] != bits[:-1])`` and clipped to the
request: the first extent starts at the request offset, lengths are
multiples of the granularity except where the request or the export ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from nbdfleece.constants import MAX_EXTENTS

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
DEFAULT_GRANULARITY = 64 * 1024
DIRTY = 1


def valid_granularity(granularity: int) -> bool:
    return (
        MIN_GRANULARITY <= granularity <= MAX_GRANULARITY
        and granularity & (granularity - 1) == 0
    )


@dataclass(eq=False)
class DirtyBitmap:
    """A named bitmap over ``size`` bytes; ``recording`` ones track writes."""

    name: str
    size: int
    granularity: int = DEFAULT_GRANULARITY
    recording: bool = True
    persistent: bool = False
    inconsistent: bool = False
    busy: int = 0
    """Users (exports, jobs) that forbid changing it; 0 when free."""

    def __post_init__(self) -> None:
        if not valid_granularity(self.granularity):
            raise ValueError("Granularity must be power of 2 and at least 512")
        self.bits: npt.NDArray[np.bool_] = np.zeros(self.granules, dtype=bool)

    @property
    def granules(self) -> int:
        return -(-self.size // self.granularity)

    # -- changes --------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        """Dirty every granule touching the range (no-op for length 0)."""
        if length <= 0:
            return
        first = offset // self.granularity
        last = (min(offset + length, self.size) - 1) // self.granularity
        if first == last:
            self.bits[first] = True  # the common small write: a scalar store
        else:
            self.bits[first : last + 1] = True

    def clear(self) -> None:
        self.bits[:] = False

    def merge_from(self, other: DirtyBitmap) -> None:
        """OR ``other`` into this bitmap, whatever the two granularities."""
        if other.size != self.size:
            raise ValueError("bitmaps of different sizes cannot be merged")
        if other.granularity == self.granularity:
            self.bits |= other.bits
            return
        dirty = np.flatnonzero(other.bits).astype(np.int64)
        if not dirty.size:
            return
        starts = dirty * other.granularity
        ends = np.minimum(starts + other.granularity, self.size) - 1
        first = starts // self.granularity
        last = ends // self.granularity
        # Mark [first, last] for every dirty source granule with a difference array.
        delta = np.zeros(self.granules + 1, dtype=np.int64)
        np.add.at(delta, first, 1)
        np.add.at(delta, last + 1, -1)
        self.bits |= np.cumsum(delta[:-1]) > 0

    def copy_from(self, other: DirtyBitmap) -> None:
        """Replace the contents (same geometry) with ``other``'s."""
        self.clear()
        self.merge_from(other)

    # -- queries --------------------------------------------------------------
    def count(self) -> int:
        """Dirty bytes, the last granule clipped to the size (QEMU's ``count``)."""
        n = int(np.count_nonzero(self.bits))
        if n and self.bits[-1]:
            return n * self.granularity - (self.granules * self.granularity - self.size)
        return n * self.granularity

    def extents(self, offset: int, length: int, *, max_extents: int = MAX_EXTENTS) -> list[tuple[int, int]]:
        """``(length, flags)`` runs from ``offset``, covering at most ``length`` bytes."""
        array = self.extent_array(offset, length, max_extents=max_extents)
        return list(zip(array[:, 0].tolist(), array[:, 1].tolist(), strict=True))

    def extent_array(
        self, offset: int, length: int, *, max_extents: int = MAX_EXTENTS
    ) -> npt.NDArray[np.int64]:
        """:meth:`extents` as an ``(n, 2)`` array, for block status without Python loops."""
        lo, hi, flags = self._runs(offset, length)
        n = min(len(lo), max_extents)
        out = np.empty((n, 2), dtype=np.int64)
        out[:, 0] = hi[:n] - lo[:n]
        out[:, 1] = flags[:n]
        return out

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every dirty run (for tools and tests)."""
        lo, hi, flags = self._runs(0, self.size)
        mask = flags.astype(bool)
        return list(zip(lo[mask].tolist(), (hi[mask] - lo[mask]).tolist(), strict=True))

    def _runs(
        self, offset: int, length: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Byte bounds [lo, hi) and flags of the runs of equal bits in the range."""
        end = min(offset + length, self.size)
        if offset >= end:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        g = self.granularity
        first, last = offset // g, (end - 1) // g
        window = self.bits[first : last + 1]
        edges = np.flatnonzero(window[1:] != window[:-1]) + 1
        starts = np.concatenate(([0], edges)).astype(np.int64)
        ends = np.concatenate((edges, [window.size])).astype(np.int64)
        lo = np.maximum((starts + first) * g, offset)
        hi = np.minimum((ends + first) * g, end)
        flags = window[starts].astype(np.int64) * DIRTY
        return lo, hi, flags

    def sha256(self) -> str:
        """SHA-256 of the packed bits (little-endian bit order), for verification."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    # -- serialisation ----------------------------------------------------------
    def to_bytes(self) -> bytes:
        return np.packbits(self.bits, bitorder="little").tobytes()

    def load_bytes(self, data: bytes) -> None:
        expected = -(-self.granules // 8)
        if len(data) != expected:
            raise ValueError(f"bitmap data has {len(data)} bytes, expected {expected}")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=self.granules)
        self.bits = bits.astype(bool)
