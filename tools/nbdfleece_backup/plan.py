"""What a backup copies, decided per qcow2 cluster from block status (no I/O here).

A backup image stores whole clusters, so the plan is made on the cluster
grid of the image (64 KiB): a cluster is *data* (read and stored), *zero*
(stored as a qcow2 zero cluster: it overrides older data in the chain) or
*none* (not stored: a hole in a full backup, unchanged in an incremental)::

    full:         data = any byte of the cluster is data in base:allocation
    incremental:  dirty = any byte of the cluster is dirty in the frozen bitmap;
                  data = dirty and any byte is data; zero = dirty and all of it reads as zeroes

Runs of equal kind become *pieces*, cut at every 4 MiB boundary of the disk.
The cut is fixed (not chosen by timing or connection count), so the image's
content checksum, a hash over its pieces, can be recomputed from the image
alone by ``image.content_digest``: the image's own clusters give back the
same pieces.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

CLUSTER = 64 << 10
PIECE = 4 << 20
NONE, DATA, ZERO = 0, 1, 2
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
NBD_STATE_DIRTY = 1

Kinds = npt.NDArray[np.int8]
Ranges = Iterable[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Piece:
    """``length`` guest bytes at ``offset``, within one 4 MiB window."""

    offset: int
    length: int
    zero: bool


def clusters_of(size: int, cluster: int = CLUSTER) -> int:
    return -(-size // cluster)


def touched(ranges: Ranges, size: int, cluster: int = CLUSTER) -> npt.NDArray[np.bool_]:
    """One bool per cluster: does any of the ``(offset, length)`` ranges touch it."""
    n = clusters_of(size, cluster)
    pairs = np.array([(o, length) for o, length in ranges if length > 0], dtype=np.int64).reshape(-1, 2)
    diff = np.zeros(n + 1, dtype=np.int64)
    if len(pairs):
        start = np.minimum(pairs[:, 0] // cluster, n)
        end = np.minimum(-(-(pairs[:, 0] + pairs[:, 1]) // cluster), n)
        np.add.at(diff, start, 1)
        np.add.at(diff, end, -1)
    covered: npt.NDArray[np.bool_] = np.cumsum(diff[:-1]) > 0
    return covered


def data_ranges(extents: Iterable[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``base:allocation`` extents ``(offset, length, flags)`` that do not read as zeroes.

    A hole without the ZERO flag may read as anything, so it counts as data.
    """
    return [(o, n) for o, n, flags in extents if not flags & NBD_STATE_ZERO]


def dirty_ranges(extents: Iterable[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap:NAME`` extents ``(offset, length, flags)`` that are dirty."""
    return [(o, n) for o, n, flags in extents if flags & NBD_STATE_DIRTY]


def plan_full(data: Ranges, size: int, cluster: int = CLUSTER) -> Kinds:
    kinds: Kinds = np.where(touched(data, size, cluster), DATA, NONE).astype(np.int8)
    return kinds


def plan_incremental(dirty: Ranges, data: Ranges, size: int, cluster: int = CLUSTER) -> Kinds:
    is_dirty = touched(dirty, size, cluster)
    has_data = touched(data, size, cluster)
    kinds: Kinds = np.where(is_dirty, np.where(has_data, DATA, ZERO), NONE).astype(np.int8)
    return kinds


def pieces(kinds: Kinds, size: int, cluster: int = CLUSTER, window: int = PIECE) -> list[Piece]:
    """Runs of equal kind (data or zero), cut at every ``window`` boundary, clipped to ``size``."""
    n = len(kinds)
    if n == 0:
        return []
    per_window = max(1, window // cluster)
    brk = np.ones(n, dtype=bool)
    brk[1:] = kinds[1:] != kinds[:-1]
    brk[::per_window] = True
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    out: list[Piece] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        kind = int(kinds[s])
        if kind == NONE:
            continue
        offset = s * cluster
        out.append(Piece(offset, min(e * cluster, size) - offset, kind == ZERO))
    return out


def split(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    """``(offset, length)`` cut into requests of at most ``limit`` bytes."""
    return [(o, min(limit, offset + length - o)) for o in range(offset, offset + length, limit)]


CHECKSUMS = ("xxh3-128", "sha256", "crc32")
"""Per-piece checksums.  ``xxh3-128`` (the default for new chains) is non-cryptographic
but a 128-bit hash with full avalanche, so a damaged piece goes unnoticed with odds of
2**-128; it costs 0.02-0.06 CPU s per GiB against ~0.5 for sha256 and ~0.15 for crc32
(whose 32 bits only bound random corruption to 2**-32).  sha256 stays for chains that
want a cryptographic digest; each image records its own algorithm in the manifest."""

DEFAULT_CHECKSUM = "xxh3-128"

INLINE_CHECKSUMS = frozenset({"xxh3-128"})
"""Hashed on the caller's thread: 4 MiB take 0.05-0.25 ms, no more than a hop to a worker thread."""


def piece_checksum(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    """Blocking (sha256 and crc32 release the GIL): run those in a worker thread for large
    buffers; ``INLINE_CHECKSUMS`` are cheap enough to call anywhere."""
    if algorithm == "xxh3-128":
        return xxhash.xxh3_128_hexdigest(data)
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    if algorithm == "crc32":
        return f"{zlib.crc32(data):08x}"
    raise ValueError(f"unknown checksum {algorithm!r} (known: {', '.join(CHECKSUMS)})")


def checksum_algorithm(checksum: str) -> str:
    """The per-piece algorithm of a manifest checksum ``ALGORITHM:HEX``."""
    algorithm = checksum.partition(":")[0]
    if algorithm not in CHECKSUMS:
        raise ValueError(f"unknown checksum {checksum!r}")
    return algorithm


class ContentDigest:
    """``ALGORITHM:`` + sha256 over the image's pieces in guest order, one line per piece:
    ``OFFSET LENGTH data CHECKSUM`` (the piece's ALGORITHM checksum) or ``OFFSET LENGTH zero``."""

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in CHECKSUMS:
            raise ValueError(f"unknown checksum {algorithm!r}")
        self.algorithm = algorithm
        self._lines: dict[int, str] = {}

    def add(self, piece: Piece, checksum: str | None) -> None:
        if piece.zero:
            self._lines[piece.offset] = f"{piece.offset} {piece.length} zero\n"
        else:
            self._lines[piece.offset] = f"{piece.offset} {piece.length} data {checksum}\n"

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for offset in sorted(self._lines):
            h.update(self._lines[offset].encode())
        return f"{self.algorithm}:{h.hexdigest()}"
