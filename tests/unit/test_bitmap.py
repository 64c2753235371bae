"""DirtyBitmap against a naive pure-Python reference (one bool per granule).

The reference knows nothing of numpy: ``mark`` dirties every granule a byte
range touches, extents are built by walking the window granule by granule.
Hypothesis drives random granularities (512 B .. 1 MiB), sizes (often not a
multiple of the granularity), writes and windows.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdfleece.bitmap import DEFAULT_GRANULARITY, DirtyBitmap

KiB = 1 << 10
MiB = 1 << 20
TiB = 1 << 40

GRANULARITIES = [1 << s for s in range(9, 21)]  # 512 .. 1 MiB


class Reference:
    """One Python bool per granule; every operation a plain loop."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        self.dirty = [False] * (-(-size // granularity))

    def mark(self, offset: int, length: int) -> None:
        """Dirty granule after granule while the granule starts before the end."""
        end = min(offset + length, self.size)
        g = offset // self.g
        while g * self.g < end:
            self.dirty[g] = True
            g += 1

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            flag = int(self.dirty[pos // self.g])
            nxt = min((pos // self.g + 1) * self.g, end)
            if out and out[-1][1] == flag:
                out[-1] = (out[-1][0] + nxt - pos, flag)
            else:
                out.append((nxt - pos, flag))
            pos = nxt
        return out

    def count(self) -> int:
        return sum(
            min((i + 1) * self.g, self.size) - i * self.g for i, d in enumerate(self.dirty) if d
        )

    def dirty_ranges(self) -> list[tuple[int, int]]:
        ranges = []
        pos = 0
        for length, flag in self.extents(0, self.size):
            if flag:
                ranges.append((pos, length))
            pos += length
        return ranges

    def dirty_byte_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every dirty granule, clipped to the size."""
        return [
            (i * self.g, min((i + 1) * self.g, self.size)) for i, d in enumerate(self.dirty) if d
        ]


# -- strategies ------------------------------------------------------------------

@st.composite
def geometry(draw: st.DrawFn) -> tuple[int, int]:
    """(size, granularity): 1..96 granules, the last one often partial."""
    g = draw(st.sampled_from(GRANULARITIES))
    granules = draw(st.integers(1, 96))
    tail = draw(st.one_of(st.just(0), st.integers(1, g - 1)))
    size = (granules - 1) * g + (tail or g)
    return size, g


@st.composite
def ranges(draw: st.DrawFn, size: int, max_count: int = 12) -> list[tuple[int, int]]:
    """Writes a client may send: inside the export, at least one byte."""
    out = []
    for _ in range(draw(st.integers(0, max_count))):
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - offset, 4 * MiB)))
        out.append((offset, length))
    return out


@st.composite
def scenario(draw: st.DrawFn) -> tuple[DirtyBitmap, Reference, list[tuple[int, int]]]:
    size, g = draw(geometry())
    writes = draw(ranges(size))
    bitmap = DirtyBitmap("bm", size, g)
    ref = Reference(size, g)
    for offset, length in writes:
        bitmap.mark(offset, length)
        ref.mark(offset, length)
    return bitmap, ref, writes


def check_extents_shape(
    ext: list[tuple[int, int]], offset: int, length: int, size: int, g: int
) -> None:
    """The invariants block status relies on, independent of the contents."""
    end = min(offset + length, size)
    if offset >= end:
        assert ext == []
        return
    assert ext, "a non-empty window has at least one extent"
    assert sum(n for n, _ in ext) == end - offset
    assert all(n > 0 for n, _ in ext)
    assert all(f in (0, 1) for _, f in ext)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(ext)), "flags alternate"
    # Every inner boundary falls on a granule boundary (the first extent starts
    # at ``offset`` whatever its alignment, the last ends at the window end).
    pos = offset
    for n, _ in ext[:-1]:
        pos += n
        assert pos % g == 0, (pos, g, ext)
    # Lengths are multiples of the granularity except at the window ends.
    for i, (n, _) in enumerate(ext):
        if 0 < i < len(ext) - 1:
            assert n % g == 0


# -- properties ------------------------------------------------------------------

@given(scenario())
def test_mark_dirties_whole_granules(case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]]) -> None:
    bitmap, ref, writes = case
    assert bitmap.bits.tolist() == ref.dirty
    # Every written byte is covered; every dirty granule holds a written byte.
    dirty = bitmap.dirty_ranges()
    for offset, length in writes:
        end = min(offset + length, bitmap.size)
        assert any(s <= offset and end <= s + n for s, n in dirty), (offset, length, dirty)
    for start, end in ref.dirty_byte_ranges():
        assert any(o < end and start < o + n for o, n in writes)


@given(scenario(), st.data())
def test_extents_random_windows(
    case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]], data: st.DataObject
) -> None:
    bitmap, ref, _ = case
    size, g = bitmap.size, bitmap.granularity
    for _ in range(5):
        offset = data.draw(st.integers(0, size + g))
        length = data.draw(st.one_of(st.integers(1, 3 * g), st.integers(1, size + 2 * g)))
        ext = bitmap.extents(offset, length)
        check_extents_shape(ext, offset, length, size, g)
        assert ext == ref.extents(offset, length), (offset, length)
    whole = bitmap.extents(0, size)
    check_extents_shape(whole, 0, size, size, g)
    assert whole == ref.extents(0, size)
    assert bitmap.dirty_ranges() == ref.dirty_ranges()


@given(scenario())
def test_count_clips_last_granule(case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]]) -> None:
    bitmap, ref, _ = case
    assert bitmap.count() == ref.count()
    assert bitmap.count() == sum(n for n, f in ref.extents(0, bitmap.size) if f)


@given(scenario(), st.sampled_from(GRANULARITIES), st.data())
def test_merge_different_granularities(
    case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]], dest_g: int, data: st.DataObject
) -> None:
    source, src_ref, _ = case
    size = source.size
    dest = DirtyBitmap("dest", size, dest_g)
    dest_ref = Reference(size, dest_g)
    for offset, length in data.draw(ranges(size, 4)):
        dest.mark(offset, length)
        dest_ref.mark(offset, length)
    # The reference merge: every dirty source granule's bytes, marked in dest.
    for start, end in src_ref.dirty_byte_ranges():
        dest_ref.mark(start, end - start)
    before = source.bits.copy()
    dest.merge_from(source)
    assert dest.bits.tolist() == dest_ref.dirty
    assert np.array_equal(source.bits, before), "the source is left alone"
    # Merging back (any direction) never loses a dirty source granule.
    again = DirtyBitmap("again", size, source.granularity)
    again.merge_from(dest)
    assert not np.any(source.bits & ~again.bits)


@given(scenario())
def test_merge_same_granularity_and_copy(case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]]) -> None:
    source, ref, _ = case
    dest = DirtyBitmap("dest", source.size, source.granularity)
    dest.mark(0, 1)
    dest.merge_from(source)
    expected = list(ref.dirty)
    expected[0] = True
    assert dest.bits.tolist() == expected
    dest.copy_from(source)
    assert dest.bits.tolist() == ref.dirty
    assert dest.sha256() == source.sha256()


def test_merge_different_sizes_refused() -> None:
    a = DirtyBitmap("a", 10 * MiB, 64 * KiB)
    b = DirtyBitmap("b", 10 * MiB + 512, 64 * KiB)
    with pytest.raises(ValueError):
        a.merge_from(b)


@given(scenario())
def test_clear(case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]]) -> None:
    bitmap, _, _ = case
    bitmap.clear()
    assert bitmap.count() == 0
    assert bitmap.dirty_ranges() == []
    assert bitmap.extents(0, bitmap.size) == [(bitmap.size, 0)]
    assert bitmap.sha256() == DirtyBitmap("x", bitmap.size, bitmap.granularity).sha256()


@given(scenario())
def test_bytes_round_trip(case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]]) -> None:
    bitmap, ref, _ = case
    data = bitmap.to_bytes()
    assert len(data) == -(-len(ref.dirty) // 8)
    # Little bit order: granule i is bit i % 8 of byte i // 8.
    for i, d in enumerate(ref.dirty):
        assert bool(data[i // 8] >> (i % 8) & 1) == d
    copy = DirtyBitmap("copy", bitmap.size, bitmap.granularity)
    copy.load_bytes(data)
    assert copy.bits.tolist() == ref.dirty
    assert copy.to_bytes() == data
    assert copy.sha256() == bitmap.sha256()
    assert copy.extents(0, copy.size) == bitmap.extents(0, bitmap.size)
    with pytest.raises(ValueError):
        copy.load_bytes(data + b"\0")
    with pytest.raises(ValueError):
        copy.load_bytes(data[:-1])


@given(scenario(), st.randoms(use_true_random=False))
def test_sha256_depends_on_contents_only(
    case: tuple[DirtyBitmap, Reference, list[tuple[int, int]]], rnd: random.Random
) -> None:
    """Equal contents, reached by other writes in another order: equal digests."""
    bitmap, ref, writes = case
    other = DirtyBitmap("other", bitmap.size, bitmap.granularity, persistent=True)
    shuffled = list(writes)
    rnd.shuffle(shuffled)
    for offset, length in shuffled:
        other.mark(offset, length)
    assert other.sha256() == bitmap.sha256()
    # One dirty granule per run of the reference, written as a single byte each.
    third = DirtyBitmap("third", bitmap.size, bitmap.granularity)
    for start, end in ref.dirty_byte_ranges():
        third.mark(start + rnd.randrange(end - start), 1)
    assert third.sha256() == bitmap.sha256()
    # Different contents: different digest.
    free = [i for i, d in enumerate(ref.dirty) if not d]
    if free:
        third.mark(free[0] * bitmap.granularity, 1)
        assert third.sha256() != bitmap.sha256()


# -- named edge cases ----------------------------------------------------------------

G = DEFAULT_GRANULARITY


def test_first_granule() -> None:
    b = DirtyBitmap("b", 10 * G, G)
    b.mark(0, 1)
    assert b.dirty_ranges() == [(0, G)]
    assert b.extents(0, 10 * G) == [(G, 1), (9 * G, 0)]
    assert b.count() == G


def test_last_partial_granule() -> None:
    size = 10 * G + 100
    b = DirtyBitmap("b", size, G)
    assert b.granules == 11
    b.mark(size - 1, 1)
    assert b.dirty_ranges() == [(10 * G, 100)]
    assert b.extents(0, size) == [(10 * G, 0), (100, 1)]
    assert b.extents(0, size + 5 * G) == [(10 * G, 0), (100, 1)], "clipped to the size"
    assert b.extents(10 * G + 50, 1 << 30) == [(50, 1)]
    assert b.count() == 100


def test_one_byte_write_dirties_its_granule() -> None:
    b = DirtyBitmap("b", 64 * MiB, G)
    b.mark(10485860, 1)  # P4's unaligned byte
    assert b.dirty_ranges() == [(10485760, G)]
    assert b.extents(0, 64 * MiB) == [(10485760, 0), (G, 1), (64 * MiB - 10485760 - G, 0)]


def test_write_ending_on_granule_boundary() -> None:
    b = DirtyBitmap("b", 8 * G, G)
    b.mark(G, G)  # exactly granule 1
    assert b.dirty_ranges() == [(G, G)]
    b.mark(4 * G - 1, 1)  # the last byte of granule 3 only
    assert b.dirty_ranges() == [(G, G), (3 * G, G)]
    b.mark(5 * G + 1, G - 1)  # ends exactly at 6 G: granule 5 only
    assert b.dirty_ranges() == [(G, G), (3 * G, G), (5 * G, G)]


def test_window_inside_one_granule() -> None:
    b = DirtyBitmap("b", 8 * G, G)
    b.mark(2 * G, 1)
    assert b.extents(2 * G + 10, 100) == [(100, 1)]
    assert b.extents(G + 10, 100) == [(100, 0)]
    assert b.extents(2 * G - 10, 20) == [(10, 0), (10, 1)]


def test_empty_bitmap_gives_one_clean_extent() -> None:
    b = DirtyBitmap("b", 64 * MiB, G)
    assert b.extents(0, 64 * MiB) == [(64 * MiB, 0)]
    assert b.extents(12345, 4 << 30) == [(64 * MiB - 12345, 0)]
    assert b.count() == 0
    assert b.dirty_ranges() == []


def test_zero_length_and_past_end() -> None:
    b = DirtyBitmap("b", 4 * G, G)
    b.mark(G, 0)
    assert b.count() == 0
    assert b.extents(4 * G, 10) == []
    assert b.extents(G, 0) == []
    b.mark(3 * G + 5, 10 * G)  # clipped to the size
    assert b.dirty_ranges() == [(3 * G, G)]


def test_max_extents() -> None:
    b = DirtyBitmap("b", 16 * G, G)
    for i in range(0, 16, 2):
        b.mark(i * G, 1)
    assert len(b.extents(0, 16 * G)) == 16
    assert b.extents(0, 16 * G, max_extents=3) == [(G, 1), (G, 0), (G, 1)]


@pytest.mark.parametrize("granularity", [0, 256, 511, 513, 3 * 1024, 1 << 32])
def test_bad_granularity(granularity: int) -> None:
    with pytest.raises(ValueError, match="Granularity must be power of 2 and at least 512"):
        DirtyBitmap("b", MiB, granularity)


def test_large_bitmap_many_runs() -> None:
    """1 TiB at 64 KiB: 100,000 scattered dirty runs give 200,001 extents.

    The expected runs come from the inputs (granule numbers chosen here),
    not from the code under test.  No timing is asserted.
    """
    size, g = TiB, 64 * KiB
    granules = size // g
    rnd = random.Random(20240601)
    # Run starts spaced at least 2 granules apart from the end of the previous run.
    n = 100_000
    slot = granules // n  # 167 granules per slot
    runs: list[tuple[int, int]] = []  # (first granule, granule count)
    for i in range(n):
        base = i * slot
        first = base + 1 + rnd.randrange(slot // 2)  # never granule 0
        count = 1 + rnd.randrange(slot // 2 - 1)  # ends at least 1 granule before the next slot
        runs.append((first, count))
    assert runs[-1][0] + runs[-1][1] < granules
    b = DirtyBitmap("big", size, g)
    for first, count in runs:
        # Unaligned byte ranges that touch exactly these granules.
        start = first * g + rnd.randrange(g)
        end = (first + count - 1) * g + 1 + rnd.randrange(g)
        b.mark(start, max(1, end - start))
    expected: list[tuple[int, int]] = []
    pos = 0
    for first, count in runs:
        expected.append((first * g - pos, 0))
        expected.append((count * g, 1))
        pos = (first + count) * g
    expected.append((size - pos, 0))
    ext = b.extents(0, size)
    assert len(ext) == 2 * n + 1 == 200_001
    assert ext == expected
    assert b.count() == sum(c for _, c in runs) * g
    assert b.dirty_ranges() == [(f * g, c * g) for f, c in runs]
    # A window in the middle, unaligned at both ends.
    mid_first, mid_count = runs[n // 2]
    window = b.extents(mid_first * g + 7, mid_count * g)
    assert window == [(mid_count * g - 7, 1), (7, 0)]
