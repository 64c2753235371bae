"""The backup agent's plan: block-status extents -> per-cluster kinds -> pieces (pure numpy)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfleece_backup.plan import (
    CHECKSUMS,
    CLUSTER,
    DATA,
    DEFAULT_CHECKSUM,
    NONE,
    PIECE,
    ZERO,
    ContentDigest,
    Piece,
    checksum_algorithm,
    data_ranges,
    dirty_ranges,
    piece_checksum,
    pieces,
    plan_full,
    plan_incremental,
    split,
    touched,
)

MiB = 1 << 20


def test_touched_rounds_out_to_clusters() -> None:
    size = 1 * MiB  # 16 clusters
    mask = touched([(1, 1), (3 * CLUSTER - 1, 2), (15 * CLUSTER + 5, 10)], size)
    assert np.flatnonzero(mask).tolist() == [0, 2, 3, 15]
    assert not touched([(0, 0)], size).any()
    assert touched([(0, size)], size).all()


def test_touched_clips_past_the_end() -> None:
    mask = touched([(CLUSTER * 3, 10 * MiB)], MiB)
    assert np.flatnonzero(mask).tolist() == list(range(3, 16))


def test_status_flags() -> None:
    alloc = [(0, 4096, 0), (4096, 4096, 3), (8192, 4096, 1), (12288, 4096, 2)]
    # A hole that is not known to read as zeroes must be read.
    assert data_ranges(alloc) == [(0, 4096), (8192, 4096)]
    assert dirty_ranges([(0, CLUSTER, 0), (CLUSTER, CLUSTER, 1)]) == [(CLUSTER, CLUSTER)]


def test_full_plan_stores_clusters_with_any_data() -> None:
    size = 8 * CLUSTER
    kinds = plan_full([(CLUSTER + 10, 1), (5 * CLUSTER, 2 * CLUSTER)], size)
    assert kinds.tolist() == [NONE, DATA, NONE, NONE, NONE, DATA, DATA, NONE]


def test_incremental_plan_dirty_zero_and_data() -> None:
    size = 8 * CLUSTER
    dirty = [(0, 3 * CLUSTER), (6 * CLUSTER, 100)]
    data = [(CLUSTER + 512, 512), (5 * CLUSTER, CLUSTER)]
    kinds = plan_incremental(dirty, data, size)
    # Dirty and all zero -> zero cluster (it must override older data in the chain).
    assert kinds.tolist() == [ZERO, DATA, ZERO, NONE, NONE, NONE, ZERO, NONE]


def test_pieces_are_cut_at_4_mib_and_clipped_to_the_size() -> None:
    size = 10 * MiB - 4096  # the last cluster is partial
    kinds = np.full(-(-size // CLUSTER), DATA, dtype=np.int8)
    got = pieces(kinds, size)
    assert [(p.offset, p.length) for p in got] == [(0, PIECE), (PIECE, PIECE), (2 * PIECE, size - 2 * PIECE)]
    assert not any(p.zero for p in got)


def test_pieces_split_on_kind_changes() -> None:
    kinds = np.array([DATA, DATA, ZERO, NONE, ZERO, ZERO, DATA], dtype=np.int8)
    got = pieces(kinds, 7 * CLUSTER)
    assert got == [Piece(0, 2 * CLUSTER, False), Piece(2 * CLUSTER, CLUSTER, True),
                   Piece(4 * CLUSTER, 2 * CLUSTER, True), Piece(6 * CLUSTER, CLUSTER, False)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=300), st.integers(0, CLUSTER - 1))
def test_pieces_cover_exactly_the_stored_clusters(raw: list[int], short: int) -> None:
    kinds = np.array([k if k != 3 else NONE for k in raw], dtype=np.int8)
    size = len(kinds) * CLUSTER - (short // 512) * 512
    got = pieces(kinds, size)
    covered = np.full(len(kinds), NONE, dtype=np.int8)
    for p in got:
        assert p.length > 0 and p.offset % CLUSTER == 0
        assert p.offset // PIECE == (p.offset + p.length - 1) // PIECE  # never across a 4 MiB line
        first, last = p.offset // CLUSTER, (p.offset + p.length - 1) // CLUSTER
        assert (covered[first : last + 1] == NONE).all()
        covered[first : last + 1] = ZERO if p.zero else DATA
    assert (covered == kinds).all()
    assert all(p.offset + p.length <= size for p in got)


def test_split() -> None:
    assert split(10, 25, 10) == [(10, 10), (20, 10), (30, 5)]
    assert split(0, 0, 10) == []


def test_content_digest_is_order_independent_and_kind_sensitive() -> None:
    a, b = Piece(0, 4, False), Piece(PIECE, 4, True)
    sha = hashlib.sha256(b"abcd").hexdigest()
    one, two = ContentDigest(), ContentDigest()
    one.add(a, sha)
    one.add(b, None)
    two.add(b, None)
    two.add(a, sha)
    assert one.hexdigest() == two.hexdigest()
    three = ContentDigest()
    three.add(a, sha)
    three.add(Piece(PIECE, 4, False), hashlib.sha256(bytes(4)).hexdigest())
    assert three.hexdigest() != one.hexdigest()  # zero cluster != data that happens to be zero
    assert one.hexdigest().startswith("sha256:")


def test_piece_checksums() -> None:
    assert DEFAULT_CHECKSUM == "xxh3-128" and set(CHECKSUMS) == {"xxh3-128", "sha256", "crc32"}
    # XXH3-128 reference vector (xxHash's sanity test: the empty input, seed 0).
    assert piece_checksum("xxh3-128", b"") == "99aa06d3014798d86001c324468d497f"
    assert piece_checksum("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert piece_checksum("crc32", b"123456789") == "cbf43926"
    data = bytearray(range(256)) * 4096
    before = piece_checksum("xxh3-128", memoryview(data))
    data[12345] ^= 1
    assert piece_checksum("xxh3-128", memoryview(data)) != before
    assert checksum_algorithm("xxh3-128:" + "0" * 64) == "xxh3-128"
    with pytest.raises(ValueError):
        piece_checksum("md5", b"")
