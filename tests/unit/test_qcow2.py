"""The qcow2 driver against a bytearray model, on real temporary files.

Hypothesis drives random writes (unaligned, across cluster boundaries),
zeroing, trims and reopens on small images with 512 B .. 64 KiB clusters,
with and without a backing file; after every run the image must read back
as the model and the driver's own refcount check must find neither errors
nor leaks.  The fixed tests cover the header checks, backing chains,
allocation status, concurrency on one new cluster and refcount-table growth.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdfleece.block.file import FileStore
from nbdfleece.block.node import BlockNode, Extent
from nbdfleece.block.qcow2 import (
    OFLAG_COMPRESSED,
    Qcow2Error,
    Qcow2Node,
    create_qcow2,
    open_qcow2,
)
from nbdfleece.constants import AllocationState
from nbdfleece.errors import RequestError
from nbdfleece.graph import BlockGraph, ControlError

KiB = 1 << 10
MiB = 1 << 20
HOLE_ZERO = AllocationState.HOLE | AllocationState.ZERO


# -- helpers ------------------------------------------------------------------------


async def read_all(node: BlockNode, *, sparse: bool = False) -> bytes:
    buf = bytearray(node.size)
    view = memoryview(buf)
    chunk = 256 * KiB
    for off in range(0, node.size, chunk):
        part = view[off : off + chunk]
        for seg in await node.read(off, part, sparse=sparse):
            if seg.zero:
                part[seg.start : seg.start + seg.length] = bytes(seg.length)
    return bytes(buf)


async def assert_consistent(node: Qcow2Node) -> None:
    errors, leaks = await node.check()
    assert errors == []
    assert leaks == []


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def full_clusters(offset: int, length: int, size: int, cs: int) -> list[int]:
    """Guest clusters entirely inside the range (the image's last partial one counts at the end)."""
    end = offset + length
    out = []
    for c in range(-(-offset // cs), -(-size // cs)):
        if c * cs >= offset and min((c + 1) * cs, size) <= end:
            out.append(c)
    return out


def make_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- creation and opening -------------------------------------------------------------


async def test_create_and_open_empty(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 10 * MiB + 512)
    node = open_qcow2(path)
    try:
        assert node.size == 10 * MiB + 512
        assert node.cluster_size == 64 * KiB
        assert node.backing is None
        assert not node.read_only
        assert await read_all(node) == bytes(node.size)
        assert await node.block_status(0, node.size) == [Extent(node.size, HOLE_ZERO)]
        assert await node.allocation_depth(0, node.size) == [(node.size, 0)]
        await assert_consistent(node)
    finally:
        await node.close()
    assert path.read_bytes()[:4] == b"QFI\xfb"


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
async def test_create_cluster_sizes(tmp_path: Path, cluster_size: int) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 64 * MiB, cluster_size=cluster_size)
    node = open_qcow2(path)
    try:
        assert node.cluster_size == cluster_size
        await node.write(3 * MiB - 7, memoryview(b"x" * 10000))
        await assert_consistent(node)
    finally:
        await node.close()
    node = open_qcow2(path, read_only=True)
    try:
        buf = bytearray(10002)
        await node.read(3 * MiB - 8, memoryview(buf))
        assert buf == b"\0" + b"x" * 10000 + b"\0"
    finally:
        await node.close()


def test_create_refuses_bad_size(tmp_path: Path) -> None:
    with pytest.raises(Qcow2Error, match="multiple of 512"):
        create_qcow2(tmp_path / "a.qcow2", MiB + 1)


def test_create_refuses_bad_cluster_size(tmp_path: Path) -> None:
    with pytest.raises(Qcow2Error, match="cluster size"):
        create_qcow2(tmp_path / "a.qcow2", MiB, cluster_size=3000)
    with pytest.raises(Qcow2Error, match="cluster size"):
        create_qcow2(tmp_path / "a.qcow2", MiB, cluster_size=256)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("offset", "data", "message", "read_only_ok"),
    [
        (0, b"QFI\xfa", "bad magic", False),
        (4, struct.pack(">I", 2), "version 2", False),
        (32, struct.pack(">I", 1), "encrypted", False),
        (72, struct.pack(">Q", 1 << 20), "unsupported qcow2 features", False),
        (72, struct.pack(">Q", 1 << 2), "external data file", False),
        (72, struct.pack(">Q", 1 << 4), "extended L2", False),
        (104, b"\x01", "compression type 1", False),
        (72, struct.pack(">Q", 1 << 1), "corrupt", True),
        (72, struct.pack(">Q", 1 << 0), "not closed cleanly", True),
        (96, struct.pack(">I", 5), "32-bit refcounts", True),
        (60, struct.pack(">I", 1), "internal snapshots", True),
    ],
)
def test_refused_images(tmp_path: Path, offset: int, data: bytes, message: str, read_only_ok: bool) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    patch(path, offset, data)
    with pytest.raises(Qcow2Error, match=message):
        open_qcow2(path)
    if read_only_ok:
        node = open_qcow2(path, read_only=True)
        assert node.read_only
        trio.run(node.close)
    else:
        with pytest.raises(Qcow2Error, match=message):
            open_qcow2(path, read_only=True)


def test_unknown_feature_named_from_table(tmp_path: Path) -> None:
    """The header's feature-name table names an unknown incompatible bit."""
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    raw = path.read_bytes()
    pos = raw.index(struct.pack(">BB", 0, 4) + b"extended L2 entries")
    patch(path, pos, struct.pack(">BB46s", 0, 9, b"frobnication"))
    patch(path, 72, struct.pack(">Q", 1 << 9))
    with pytest.raises(Qcow2Error, match="frobnication"):
        open_qcow2(path)


async def test_autoclear_bits_cleared_on_write_open(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    patch(path, 88, struct.pack(">Q", 3))
    node = open_qcow2(path, read_only=True)
    await node.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 3
    node = open_qcow2(path)
    await node.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0


async def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    node = open_qcow2(path, read_only=True)
    try:
        with pytest.raises(RequestError):
            await node.write(0, memoryview(b"x"))
        with pytest.raises(RequestError):
            await node.trim(0, MiB)
    finally:
        await node.close()


async def test_compressed_cluster_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB, cluster_size=4096)
    node = open_qcow2(path)
    await node.write(0, memoryview(b"a" * 8192))
    await node.close()
    node = open_qcow2(path)
    l2_offset = int(node._l1[0]) & 0x00FFFFFFFFFFFE00
    await node.close()
    patch(path, l2_offset + 8, struct.pack(">Q", OFLAG_COMPRESSED | 0x5000))
    node = open_qcow2(path, read_only=True)
    try:
        buf = bytearray(4096)
        await node.read(0, memoryview(buf))
        assert buf == b"a" * 4096
        with pytest.raises(RequestError, match="compressed"):
            await node.read(4096, memoryview(buf))
        assert (await node.block_status(4096, 4096))[0].flags == AllocationState(0)
    finally:
        await node.close()


# -- model-based -------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.floats(0, 1), st.integers(1, 200 * KiB), st.integers(0, 1 << 30)),
        st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 300 * KiB), st.booleans()),
        st.tuples(st.just("trim"), st.floats(0, 1), st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0.0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=12,
)


async def run_model(
    tmp_path: Path, cluster_size: int, size: int, ops: list[tuple[str, float, int, int]],
    backing_data: bytes | None,
) -> None:
    path = tmp_path / "img.qcow2"
    if backing_data is not None:
        make_raw(tmp_path / "base.raw", backing_data)
        create_qcow2(path, size, cluster_size=cluster_size, backing_file="base.raw", backing_format="raw")
        model = bytearray(backing_data[:size].ljust(size, b"\0"))
    else:
        create_qcow2(path, size, cluster_size=cluster_size)
        model = bytearray(size)
    node = open_qcow2(path)
    try:
        for kind, where, length, arg in ops:
            offset = min(int(where * size), size - 1)
            length = min(length, size - offset)
            if kind == "write":
                data = pattern(arg, length)
                await node.write(offset, memoryview(data))
                model[offset : offset + length] = data
            elif kind == "zero":
                await node.write_zeroes(offset, length, may_trim=bool(arg))
                model[offset : offset + length] = bytes(length)
            elif kind == "trim":
                await node.trim(offset, length)
                for c in full_clusters(offset, length, size, cluster_size):
                    lo, hi = c * cluster_size, min((c + 1) * cluster_size, size)
                    model[lo:hi] = bytes(hi - lo)
            else:
                await node.close()
                node = open_qcow2(path)
        assert await read_all(node) == model
        assert await read_all(node, sparse=True) == model
        await check_status(node, model)
        await node.flush()
        await assert_consistent(node)
    finally:
        await node.close()
    node = open_qcow2(path, read_only=True)
    try:
        assert await read_all(node) == model
    finally:
        await node.close()
    node = open_qcow2(path)
    try:
        await assert_consistent(node)
    finally:
        await node.close()


async def check_status(node: Qcow2Node, model: bytes) -> None:
    """Extents cover the image; no non-zero byte is reported as ZERO."""
    pos = 0
    while pos < node.size:
        extents = await node.block_status(pos, node.size - pos)
        assert extents
        for ext in extents:
            if ext.flags & AllocationState.ZERO:
                assert model[pos : pos + ext.length] == bytes(ext.length)
            pos += ext.length
    assert pos == node.size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cluster_size=st.sampled_from([512, 4096, 65536]),
    size=st.integers(1, 6 * KiB).map(lambda n: n * 512),
    ops=OPS,
)
def test_model_no_backing(tmp_path_factory: pytest.TempPathFactory, cluster_size: int, size: int,
                          ops: list[tuple[str, float, int, int]]) -> None:
    tmp = tmp_path_factory.mktemp("q")
    trio.run(run_model, tmp, cluster_size, size, ops, None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cluster_size=st.sampled_from([512, 4096, 65536]),
    size=st.integers(1, 4 * KiB).map(lambda n: n * 512),
    backing_size=st.integers(0, 2 * MiB),
    seed=st.integers(0, 1000),
    ops=OPS,
)
def test_model_with_backing(tmp_path_factory: pytest.TempPathFactory, cluster_size: int, size: int,
                            backing_size: int, seed: int, ops: list[tuple[str, float, int, int]]) -> None:
    tmp = tmp_path_factory.mktemp("q")
    trio.run(run_model, tmp, cluster_size, size, ops, pattern(seed, backing_size))


# -- backing chains and status ----------------------------------------------------------------


async def test_backing_node_given(tmp_path: Path) -> None:
    base_data = pattern(1, 2 * MiB)
    base = FileStore("base", str(make_raw(tmp_path / "base.raw", base_data)), read_only=True)
    path = tmp_path / "top.qcow2"
    create_qcow2(path, 2 * MiB, cluster_size=4096)
    store = FileStore("file", str(path))
    node = Qcow2Node("top", store, backing=base)
    try:
        assert await read_all(node) == base_data
        await node.write(5000, memoryview(b"z" * 100))
        model = bytearray(base_data)
        model[5000:5100] = b"z" * 100
        assert await read_all(node) == model
        assert await node.allocation_depth(0, 12288) == [(4096, 2), (4096, 1), (4096, 2)]
        status = await node.block_status(0, 2 * MiB)
        assert sum(e.length for e in status) == 2 * MiB
        await assert_consistent(node)
    finally:
        await node.close()
        await store.close()
        await base.close()
    # Without a backing the copied cluster keeps the base's bytes around the write.
    node = open_qcow2(path, backing=None)
    try:
        buf = bytearray(4096)
        await node.read(4096, memoryview(buf))
        assert buf == model[4096:8192]
        await node.read(0, memoryview(buf))
        assert buf == bytes(4096)
    finally:
        await node.close()


async def test_backing_chain_from_header(tmp_path: Path) -> None:
    base_data = pattern(2, MiB)
    make_raw(tmp_path / "base.raw", base_data)
    create_qcow2(tmp_path / "mid.qcow2", MiB, cluster_size=4096, backing_file="base.raw")  # probed: raw
    sub = tmp_path / "sub"
    sub.mkdir()
    create_qcow2(sub / "top.qcow2", 2 * MiB, cluster_size=65536, backing_file="../mid.qcow2",
                 backing_format="qcow2")
    mid = open_qcow2(tmp_path / "mid.qcow2")
    await mid.write(8192, memoryview(b"m" * 4096))
    await mid.write_zeroes(65536, 4096, may_trim=True)
    await mid.close()
    top = open_qcow2(sub / "top.qcow2")
    try:
        assert isinstance(top.backing, Qcow2Node)
        assert isinstance(top.backing.backing, FileStore)
        model = bytearray(base_data + bytes(MiB))
        model[8192:12288] = b"m" * 4096
        model[65536:69632] = bytes(4096)
        assert await read_all(top) == model
        await top.write(MiB - 10, memoryview(b"t" * 20))
        model[MiB - 10 : MiB + 10] = b"t" * 20
        assert await read_all(top) == model
        depth = await top.allocation_depth(0, 2 * MiB)
        assert depth == [
            (8192, 3), (4096, 2), (65536 - 12288, 3), (4096, 2), (MiB - 65536 - 4096 - 65536, 3),
            (2 * 65536, 1), (MiB - 65536, 0),
        ]
        extents = await top.block_status(0, 2 * MiB)
        assert sum(e.length for e in extents) == 2 * MiB
        assert extents[-1] == Extent(MiB - 65536, HOLE_ZERO)
        await assert_consistent(top)
    finally:
        await top.close()
    # The chain is untouched below the top.
    assert (tmp_path / "base.raw").read_bytes() == base_data


async def test_missing_backing_file(tmp_path: Path) -> None:
    create_qcow2(tmp_path / "a.qcow2", MiB, backing_file="nothere.raw", backing_format="raw")
    with pytest.raises(Qcow2Error, match=r"nothere\.raw"):
        open_qcow2(tmp_path / "a.qcow2")
    create_qcow2(tmp_path / "b.qcow2", MiB, backing_file="a.qcow2", backing_format="vmdk")
    with pytest.raises(Qcow2Error, match="vmdk"):
        open_qcow2(tmp_path / "b.qcow2")


async def test_backing_loop_refused(tmp_path: Path) -> None:
    create_qcow2(tmp_path / "a.qcow2", MiB, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(Qcow2Error, match="too deep"):
        open_qcow2(tmp_path / "a.qcow2")


async def test_status_and_depth_kinds(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB, cluster_size=4096)
    node = open_qcow2(path)
    try:
        await node.write(0, memoryview(b"d" * 8192))
        await node.write_zeroes(8192, 8192, may_trim=False)  # unallocated -> zero flag
        await node.write_zeroes(0, 4096, may_trim=False)  # data -> preallocated zero
        await node.write_zeroes(4096, 4096, may_trim=True)  # data -> freed, zero flag
        assert await node.block_status(0, MiB) == [Extent(MiB, HOLE_ZERO)]
        assert await node.allocation_depth(0, MiB) == [(16384, 1), (MiB - 16384, 0)]
        await node.write(100, memoryview(b"x"))  # into the preallocated zero cluster
        assert await node.block_status(0, 8192) == [Extent(4096, AllocationState(0)), Extent(4096, HOLE_ZERO)]
        buf = bytearray(4096)
        await node.read(0, memoryview(buf))
        assert buf == bytes(100) + b"x" + bytes(3995)
        await node.flush()
        await assert_consistent(node)
    finally:
        await node.close()


async def test_fast_zero_unaligned(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB, cluster_size=4096)
    node = open_qcow2(path)
    try:
        await node.write_zeroes(100, 200, may_trim=True, fast=True)  # already zero: fine
        await node.write(0, memoryview(b"d" * 4096))
        with pytest.raises(RequestError):
            await node.write_zeroes(100, 200, may_trim=True, fast=True)
        await node.write_zeroes(0, 8192, may_trim=True, fast=True)
        assert await read_all(node) == bytes(MiB)
    finally:
        await node.close()


async def test_trim_frees_and_reuses_clusters(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 4 * MiB, cluster_size=65536)
    node = open_qcow2(path)
    await node.write(0, memoryview(pattern(3, 2 * MiB)))
    await node.close()
    length_after_write = os.path.getsize(path)
    node = open_qcow2(path)
    try:
        await node.trim(0, 2 * MiB)
        await node.flush()  # frees become effective after the sync
        await node.write(2 * MiB, memoryview(pattern(4, 2 * MiB)))
        assert await read_all(node) == bytes(2 * MiB) + pattern(4, 2 * MiB)
        await node.flush()
        await assert_consistent(node)
    finally:
        await node.close()
    # The freed clusters were reused, and close dropped the pool's reserved tail.
    assert os.path.getsize(path) == length_after_write


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrent_writes_into_one_new_cluster(tmp_path: Path) -> None:
    """Sixteen writes into one unallocated cluster at once: one allocation, no lost data."""
    base_data = pattern(5, 64 * KiB)
    make_raw(tmp_path / "base.raw", base_data)
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 64 * KiB, cluster_size=65536, backing_file="base.raw", backing_format="raw")
    node = open_qcow2(path)
    model = bytearray(base_data)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(16):
                data = bytes([i + 1]) * 1000
                model[i * 4096 : i * 4096 + 1000] = data
                nursery.start_soon(node.write, i * 4096, memoryview(data))
        assert await read_all(node) == model
        await node.flush()
        await assert_consistent(node)
        assert node._locks.busy() == 0
    finally:
        await node.close()


@pytest.mark.parametrize("cluster_size", [4096, 65536])
async def test_concurrent_mixed_requests(tmp_path: Path, cluster_size: int) -> None:
    """Requests on disjoint byte ranges (sharing clusters with 64 KiB ones) all land."""
    path = tmp_path / "a.qcow2"
    size = 4 * MiB
    create_qcow2(path, size, cluster_size=cluster_size)
    node = open_qcow2(path)
    model = bytearray(size)
    rng = random.Random(7)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                # Disjoint 16 KiB slots so the final content is determined.
                slot = i * 16 * KiB % size
                offset = slot + rng.randrange(0, 8 * KiB)
                length = rng.randrange(1, 8 * KiB)
                if i % 5 == 4:
                    model[offset : offset + length] = bytes(length)
                    nursery.start_soon(lambda o=offset, n=length: node.write_zeroes(o, n, may_trim=True))
                else:
                    data = pattern(i, length)
                    model[offset : offset + length] = data
                    nursery.start_soon(node.write, offset, memoryview(data))
                if i % 3 == 0:
                    nursery.start_soon(read_all, node)
        assert await read_all(node) == model
        await node.flush()
        await assert_consistent(node)
    finally:
        await node.close()


async def test_large_writes_into_fresh_clusters(tmp_path: Path) -> None:
    """Whole-cluster writes into unallocated clusters (the backup agent's path: no shared lock
    first, one pwrite per run of new host clusters, the L2 entries in one go) across L2 tables,
    concurrently, next to reads and partial writes; then overwrites in place."""
    path = tmp_path / "a.qcow2"
    cs = 512  # 64 L2 entries per table: a 16 KiB write spans two or three tables
    size = 2 * MiB
    create_qcow2(path, size, cluster_size=cs)
    node = open_qcow2(path)
    model = bytearray(size)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(64):
                offset, length = i * 32 * KiB + (i % 7) * cs, 16 * KiB + (i % 3) * cs
                data = pattern(100 + i, length)
                model[offset : offset + length] = data
                nursery.start_soon(node.write, offset, memoryview(data))
                tail = offset + 28 * KiB + 3  # a partial write into a fresh cluster of its own
                model[tail : tail + 100] = pattern(300 + i, 100)
                nursery.start_soon(node.write, tail, memoryview(pattern(300 + i, 100)))
                if i % 4 == 0:
                    nursery.start_soon(read_all, node)
        assert await read_all(node) == model
        assert node._locks.busy() == 0
        for i in range(0, 64, 5):  # mapped now: written in place under shared locks
            offset = i * 32 * KiB
            model[offset : offset + 8 * KiB] = pattern(500 + i, 8 * KiB)
            await node.write(offset, memoryview(pattern(500 + i, 8 * KiB)))
        await node.flush()
        await assert_consistent(node)
        await node.close()
        if shutil.which("qemu-img"):
            subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)
        node = open_qcow2(path)
        assert await read_all(node) == model
    finally:
        await node.close()


# -- refcount table growth and crash -----------------------------------------------------------------


async def test_refcount_table_grows(tmp_path: Path) -> None:
    """512 B clusters: one refcount-table cluster covers only 8 MiB of file."""
    path = tmp_path / "a.qcow2"
    size = 24 * MiB
    create_qcow2(path, size, cluster_size=512)
    node = open_qcow2(path)
    model = bytearray(size)
    try:
        first_table = node.header.refcount_table_offset
        for i in range(0, size, MiB):
            data = pattern(i, MiB)
            await node.write(i, memoryview(data))
            model[i : i + MiB] = data
        assert node.header.refcount_table_offset != first_table
        assert await read_all(node) == model
        await node.flush()
        await assert_consistent(node)
    finally:
        await node.close()
    node = open_qcow2(path)
    try:
        assert await read_all(node) == model
        await assert_consistent(node)
    finally:
        await node.close()


async def test_unclosed_image_only_leaks(tmp_path: Path) -> None:
    """Dropping a node without close (a crash) leaves leaks at worst, and the data."""
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 4 * MiB, cluster_size=4096)
    node = open_qcow2(path)
    await node.write(1000, memoryview(b"q" * 50000))
    await node.trim(0, 8192)
    node._store.close_sync()  # no flush, no close
    node = open_qcow2(path)
    try:
        errors, leaks = await node.check()
        assert errors == []
        assert leaks  # the unused pool and the not-yet-freed clusters
        buf = bytearray(50000)
        await node.read(1000, memoryview(buf))
        assert buf == bytes(8192 - 1000) + b"q" * (50000 - 8192 + 1000)
    finally:
        await node.close()


# -- graph ------------------------------------------------------------------------------------------------


async def test_graph_add_qcow2(tmp_path: Path) -> None:
    make_raw(tmp_path / "live.raw", pattern(9, MiB))
    create_qcow2(tmp_path / "fleece.qcow2", MiB, backing_file="live.raw", backing_format="raw")
    graph = BlockGraph()
    by_path = graph.add_qcow2("fleece", str(tmp_path / "fleece.qcow2"))
    assert by_path.driver == "qcow2"
    assert by_path.top.size == MiB
    assert await read_all(by_path.top) == pattern(9, MiB)
    await by_path.top.write(0, memoryview(b"w" * 10))
    await by_path.top.flush()

    live = graph.add_file("live", str(tmp_path / "live.raw"))
    create_qcow2(tmp_path / "f2.qcow2", MiB)
    f2_file = graph.add_file("f2-file", str(tmp_path / "f2.qcow2"))
    f2 = graph.add_qcow2("f2", f2_file, live)
    assert live.users == 1 and f2_file.users == 1
    assert await read_all(f2.top) == pattern(9, MiB)
    with pytest.raises(ControlError, match="Duplicate"):
        graph.add_qcow2("f2", f2_file)
    make_raw(tmp_path / "other.raw", pattern(10, MiB))
    with pytest.raises(ControlError, match="not a qcow2 image"):
        graph.add_qcow2("bad", str(tmp_path / "other.raw"))
    with pytest.raises(ControlError, match="open for writing elsewhere"):  # 'live' writes it
        graph.add_qcow2("bad", str(tmp_path / "live.raw"))
    with pytest.raises(ControlError, match="Could not open"):
        graph.add_qcow2("bad", str(tmp_path / "missing.qcow2"))
    assert "bad" not in graph.nodes
    for node in (by_path, f2):
        await node.top.close()
    await graph.close()


async def test_graph_opens_a_qcow2_image_once_while_it_is_written(tmp_path: Path) -> None:
    """Two writable qcow2 nodes on one image would allocate the same clusters (QEMU
    refuses with its image lock); readers may share an image nobody writes."""
    create_qcow2(tmp_path / "a.qcow2", MiB)
    graph = BlockGraph()
    graph.add_qcow2("a", str(tmp_path / "a.qcow2"))
    with pytest.raises(ControlError, match=r'^Failed to get "write" lock$'):
        graph.add_qcow2("b", str(tmp_path / "a.qcow2"))
    with pytest.raises(ControlError, match=r'^Failed to get shared "write" lock$'):
        graph.add_qcow2("c", str(tmp_path / "a.qcow2"), read_only=True)
    with pytest.raises(ControlError, match="open for writing elsewhere"):
        graph.add_file("a-file", str(tmp_path / "a.qcow2"))  # the same image, another writer
    assert not {"b", "c", "a-file"} & set(graph.nodes)
    await graph.remove("a")
    r1 = graph.add_qcow2("r1", str(tmp_path / "a.qcow2"), read_only=True)
    r2 = graph.add_qcow2("r2", str(tmp_path / "a.qcow2"), read_only=True)
    with pytest.raises(ControlError, match=r'^Failed to get "write" lock$'):
        graph.add_qcow2("w", str(tmp_path / "a.qcow2"))
    assert r1.top.read_only and r2.top.read_only
    await graph.remove("r1")
    await graph.remove("r2")
    w = graph.add_qcow2("w", str(tmp_path / "a.qcow2"))  # free again
    await w.top.write(0, memoryview(b"x" * 512))
    await graph.close()


def test_qcow2_on_a_block_device_is_refused(tmp_path: Path) -> None:
    """Its size is not where the data ends (fstat says 0): refused, not corrupted."""
    if os.geteuid() != 0 or not shutil.which("losetup") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    image = tmp_path / "dev.qcow2"
    create_qcow2(image, MiB)
    proc = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    try:
        before = Path(device).read_bytes()[:4096]
        with pytest.raises(Qcow2Error, match="block devices are not supported"):
            open_qcow2(device)
        assert Path(device).read_bytes()[:4096] == before
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)



async def test_a_backing_chain_as_deep_as_allowed_opens_and_reads(tmp_path: Path) -> None:
    """A backup agent's chain of incrementals: MAX_BACKING_DEPTH images under the top
    one open and read (each level's write shows through); one more is refused."""
    from nbdfleece.block.qcow2 import MAX_BACKING_DEPTH

    size = (MAX_BACKING_DEPTH + 2) * 512
    names = [f"p{i:03d}.qcow2" for i in range(MAX_BACKING_DEPTH + 2)]
    for i, name in enumerate(names):
        create_qcow2(tmp_path / name, size, cluster_size=512,
                     backing_file=names[i - 1] if i else None, backing_format="qcow2" if i else None)
        node = open_qcow2(tmp_path / name, backing=None)
        try:
            await node.write(i * 512, memoryview(bytes([i + 1]) * 512))
        finally:
            await node.close()
    top = open_qcow2(tmp_path / names[-2], read_only=True)  # MAX_BACKING_DEPTH + 1 images
    try:
        buf = bytearray(size)
        await top.read(0, memoryview(buf))
        assert buf == b"".join(bytes([i + 1]) * 512 for i in range(MAX_BACKING_DEPTH + 1)) + bytes(512)
    finally:
        await top.close()
    with pytest.raises(Qcow2Error, match="too deep"):
        open_qcow2(tmp_path / names[-1], read_only=True)
