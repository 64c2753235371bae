"""Block-status extents as numpy arrays: shaped and packed without Python loops.

An extent array has shape ``(n, 2)``: column 0 lengths, column 1 status flags.
Bitmaps produce hundreds of thousands of extents per request (a 1 TiB map),
so merging, clipping and packing them one by one in Python would cost more
than everything else in a block-status reply::

    request        |<------------- length ------------->|
    raw extents    |--a--|--a--|---b---|------c-------------|
    shaped         |----a----|---b---|-------c--------|       (c clipped)
    REQ_ONE        |----a----|
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from nbdfleece.constants import MAX_EXTENTS

ExtentArray = npt.NDArray[np.int64]
_WIRE = np.dtype(">u4")


def as_extents(pairs: Iterable[tuple[int, int]]) -> ExtentArray:
    """A small list of ``(length, flags)`` pairs as an extent array."""
    return np.array(list(pairs), dtype=np.int64).reshape(-1, 2)


def shape(extents: ExtentArray, length: int, *, req_one: bool) -> ExtentArray:
    """Drop empty extents, merge equal neighbours, clip to ``length``, honour REQ_ONE."""
    lengths = extents[:, 0]
    flags = extents[:, 1]
    keep = lengths > 0
    if not keep.all():
        lengths, flags = lengths[keep], flags[keep]
    if not lengths.size:
        raise ValueError("block status produced no extent")
    starts = np.concatenate(([0], np.flatnonzero(flags[1:] != flags[:-1]) + 1))
    if starts.size != lengths.size:
        lengths = np.add.reduceat(lengths, starts)
        flags = flags[starts]
    # Keep the extents up to the one that reaches ``length``, and at most MAX_EXTENTS.
    ends = np.cumsum(lengths)
    count = min(int(np.searchsorted(ends, length)) + 1, lengths.size, MAX_EXTENTS)
    if req_one:
        count = 1
    out = np.empty((count, 2), dtype=np.int64)
    out[:, 0] = lengths[:count]
    out[:, 1] = flags[:count]
    covered = int(ends[count - 1])
    if covered > length:
        out[-1, 0] -= covered - length
    return out


def pack(context_id: int, extents: ExtentArray) -> bytes:
    """A BLOCK_STATUS chunk payload: u32 context id + n x (u32 length, u32 flags)."""
    return context_id.to_bytes(4, "big") + extents.astype(_WIRE).tobytes()
