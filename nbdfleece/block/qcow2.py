"""The ``qcow2`` format driver: QEMU's copy-on-write image format, version 3.

Reference: QEMU's ``docs/interop/qcow2.txt``.  A guest offset maps through
two tables to a *host cluster* of the image file::

    guest cluster vc ──L1[vc >> l2_bits]──> L2 table ──L2[vc & mask]──> host cluster

and every host cluster in use (header, tables, data) carries a reference
count, kept in refcount blocks listed by the refcount table.  This driver
keeps those counts exact, so ``qemu-img check`` finds neither errors nor
leaks after a clean close.

Supported: version 3 images, 16-bit refcounts (``refcount_order`` 4, the
default), standard 64-bit L2 entries, zero clusters (flag bit 0), a backing
node (given, or opened by name from the header as ``raw`` or ``qcow2``).
Refused with a clear :class:`Qcow2Error`: version 2, encryption, external
data files, extended L2 entries, compression types other than zlib, and,
for writing, internal snapshots, other refcount widths, dirty (lazy
refcount) and corrupt images.  Compressed clusters fail the request that
touches them.

Metadata and ordering
---------------------
All metadata is written through to the file at once (the in-memory tables
are caches, never ahead of the file), so a process that dies without
``close`` leaves a consistent image.  The order makes a power loss safe as
well, at the price of a few syncs that are rare or batched:

* clusters are taken from a *pool* whose refcounts were written and synced
  in one batch before any of them is used, so an L2 entry never reaches the
  disk before the refcount of the cluster it names (leftover pool clusters
  are only leaks after a crash, and are given back on ``close``);
* a new L2 table or refcount block is written and synced before the L1 or
  refcount-table entry that links it (a reused cluster may hold stale data);
* guest data goes to the new cluster before the L2 entry names it;
* a freed cluster (trim, zeroing) is cleared in L2 first and its refcount
  is decremented only after the next sync (``flush`` or a pool refill), so
  a cluster is never reused while a stale L2 entry on disk still names it.

Concurrency
-----------
Requests run as concurrent trio tasks.  Each request locks the guest
clusters it touches: *shared* for reads and for writes into clusters that
are already allocated (those run fully in parallel), *exclusive* for
anything that changes an L2 entry (allocation, copy-on-write, zeroing,
discard), so two writes to the same new cluster never allocate twice and a
cluster is never freed under a reader.  One ``trio.Lock`` serialises every
metadata update and table load.
"""

from __future__ import annotations

import os
import stat
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import trio

from nbdfleece.block.file import FileStore
from nbdfleece.block.node import BlockNode, Extent, Layer, Segment
from nbdfleece.constants import AllocationState, Errno
from nbdfleece.errors import RequestError

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_V2_FORMAT = ">4sIQIIQIIQQIIQ"  # 72 bytes
HEADER_V3_FORMAT = ">QQQII"  # 32 more bytes, at 72
HEADER_V3_MIN = 104
HEADER_LENGTH = 112
"""What we write: the v3 fields, compression_type at 104, padding to 8."""
REFCOUNT_ORDER = 4

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
MAX_BACKING_DEPTH = 128
"""Images below the top one that a chain may hold (the backup agent's chains of incrementals
grow to this); deeper means a loop.  Reads recurse once per image, well within Python's limit."""
L2_CACHE_BYTES = 32 << 20
REFBLOCK_CACHE_BYTES = 8 << 20
POOL_BATCH_MIN = 16
POOL_BATCH_BYTES = 32 << 20
STATUS_MAX_CLUSTERS = 1 << 16
"""block_status and allocation_depth look at most this many clusters per call."""

FEATURE_NAMES: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

# Cluster kinds, as classified from L2 entries.
UNALLOCATED = 0
DATA = 1
ZERO = 2
COMPRESSED = 3

U64 = npt.NDArray[np.uint64]
A = TypeVar("A", npt.NDArray[np.uint64], npt.NDArray[np.uint16])
HOLE_ZERO = AllocationState.HOLE | AllocationState.ZERO
BackingSpec = BlockNode | None | Literal["header"]
SHARED_L2 = "qcow2: a shared L2 table (internal snapshot) cannot be written"
SHARED_CLUSTER = "qcow2: a shared cluster (internal snapshot) cannot be written"


class Qcow2Error(Exception):
    """The image cannot be opened or created (the message says why)."""


# -- helpers -----------------------------------------------------------------


def _bottom_store(node: BlockNode) -> FileStore:
    """The FileStore at the bottom of a chain of layers."""
    while not isinstance(node, FileStore):
        if not isinstance(node, Layer):
            raise Qcow2Error(f"qcow2 needs a file store below it, not {type(node).__name__}")
        node = node.child
    return node


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    data = b""
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            raise Qcow2Error(f"image is truncated: {what} at offset {offset} lies past the end of the file")
        data += chunk
    return data


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _zero(view: memoryview) -> None:
    if len(view):
        np.frombuffer(view, dtype=np.uint8).fill(0)


def _classify(entries: U64) -> npt.NDArray[np.int8]:
    kinds = np.zeros(len(entries), dtype=np.int8)
    kinds[(entries & np.uint64(L2E_OFFSET_MASK)) != 0] = DATA
    kinds[(entries & np.uint64(OFLAG_ZERO)) != 0] = ZERO
    kinds[(entries & np.uint64(OFLAG_COMPRESSED)) != 0] = COMPRESSED
    return kinds


def _runs(kinds: npt.NDArray[np.int8], hosts: U64 | None, cluster_size: int) -> list[tuple[int, int, int]]:
    """(kind, first index, count) of runs of equal kind; with ``hosts``, DATA
    runs also break where the host clusters are not consecutive."""
    n = len(kinds)
    if n == 0:
        return []
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    brk[1:] = kinds[1:] != kinds[:-1]
    if hosts is not None:
        brk[1:] |= (kinds[1:] == DATA) & (hosts[1:] != hosts[:-1] + np.uint64(cluster_size))
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    return [(int(kinds[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


SMALL_PLAN = 16
"""Requests on at most this many clusters are planned in plain Python (numpy's
per-call overhead dominates for a handful of entries)."""


def _kind(raw: int) -> int:
    if raw & OFLAG_COMPRESSED:
        return COMPRESSED
    if raw & OFLAG_ZERO:
        return ZERO
    return DATA if raw & L2E_OFFSET_MASK else UNALLOCATED


def _plan(entries: U64, cluster_size: int, *, by_host: bool) -> list[tuple[int, int, int]]:
    """(kind, first index, count) runs of ``entries``; ``by_host`` also splits
    DATA runs where the host clusters are not consecutive."""
    if len(entries) > SMALL_PLAN:
        hosts = entries & np.uint64(L2E_OFFSET_MASK) if by_host else None
        return _runs(_classify(entries), hosts, cluster_size)
    runs: list[tuple[int, int, int]] = []
    prev_host = 0
    for i, raw in enumerate(entries.tolist()):
        kind, host = _kind(raw), raw & L2E_OFFSET_MASK
        split = by_host and kind == DATA and host != prev_host + cluster_size
        if runs and runs[-1][0] == kind and not split:
            runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((kind, i, 1))
        prev_host = host
    return runs


def _all_mapped(entries: U64) -> bool:
    """Every entry names an allocated data cluster of refcount 1 (writable in place)."""
    if len(entries) > SMALL_PLAN:
        return bool(np.all((_classify(entries) == DATA) & ((entries >> np.uint64(63)) != 0)))
    return all(raw & OFLAG_COPIED and _kind(raw) == DATA for raw in entries.tolist())


def _add_extent(extents: list[Extent], length: int, flags: AllocationState) -> None:
    if length <= 0:
        return
    if extents and extents[-1].flags == flags:
        extents[-1] = Extent(extents[-1].length + length, flags)
    else:
        extents.append(Extent(length, flags))


def _add_depth(depths: list[tuple[int, int]], length: int, depth: int) -> None:
    if length <= 0:
        return
    if depths and depths[-1][1] == depth:
        depths[-1] = (depths[-1][0] + length, depth)
    else:
        depths.append((length, depth))


def _add_segment(segments: list[Segment], start: int, length: int, zero: bool) -> None:
    if length <= 0:
        return
    if segments and segments[-1].zero == zero:
        last = segments[-1]
        segments[-1] = Segment(last.start, last.length + length, zero)
    else:
        segments.append(Segment(start, length, zero))


def _unwrap(node: BlockNode) -> BlockNode:
    """Skip layers (dirty tracking, raw format) down to a qcow2 node or a store."""
    while isinstance(node, Layer) and not isinstance(node, Qcow2Node):
        node = node.child
    return node


# -- cluster range locks -------------------------------------------------------


@dataclass(eq=False, slots=True)
class _LockState:
    shared: int = 0
    exclusive: bool = False
    waiters: int = 0
    exclusive_waiting: int = 0
    changed: trio.Event | None = None
    """Made by the first waiter: an uncontended cluster never builds one."""


class ClusterLocks:
    """Shared/exclusive locks on guest clusters, taken in ascending order.

    Waiting writers block new readers, so a busy cluster cannot starve an
    allocation.  Ascending order on every path keeps range locks deadlock-free.
    """

    def __init__(self) -> None:
        self._states: dict[int, _LockState] = {}

    @asynccontextmanager
    async def hold(self, first: int, last: int, *, exclusive: bool) -> AsyncIterator[None]:
        held = first
        """Clusters ``first .. held-1`` are held."""
        states = self._states
        try:
            for cluster in range(first, last + 1):
                # Fast path, no coroutine: a cluster nobody holds or waits for
                # (every cluster of a large write into a fresh image).
                if cluster not in states:
                    states[cluster] = _LockState(shared=0 if exclusive else 1, exclusive=exclusive)
                else:
                    await self._acquire(cluster, exclusive)
                held = cluster + 1
            yield
        finally:
            for cluster in range(first, held):
                self._release(cluster, exclusive)

    def busy(self) -> int:
        return len(self._states)

    async def _acquire(self, cluster: int, exclusive: bool) -> None:
        while True:
            st = self._states.get(cluster)
            if st is None:
                st = self._states[cluster] = _LockState()
            if exclusive:
                if not st.exclusive and st.shared == 0:
                    st.exclusive = True
                    return
                st.exclusive_waiting += 1
            elif not st.exclusive and st.exclusive_waiting == 0:
                st.shared += 1
                return
            st.waiters += 1
            if st.changed is None:
                st.changed = trio.Event()
            try:
                await st.changed.wait()
            finally:
                st.waiters -= 1
                if exclusive:
                    st.exclusive_waiting -= 1
                self._maybe_drop(cluster, st)

    def _release(self, cluster: int, exclusive: bool) -> None:
        st = self._states[cluster]
        if exclusive:
            st.exclusive = False
        else:
            st.shared -= 1
        if st.shared == 0 and not st.exclusive and st.changed is not None:
            event, st.changed = st.changed, None
            event.set()
        self._maybe_drop(cluster, st)

    def _maybe_drop(self, cluster: int, st: _LockState) -> None:
        if st.shared == 0 and not st.exclusive and st.waiters == 0 and self._states.get(cluster) is st:
            del self._states[cluster]


# -- header ------------------------------------------------------------------------


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = REFCOUNT_ORDER
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @classmethod
    def parse(cls, cluster0: bytes) -> Header:
        if len(cluster0) < 72 or cluster0[:4] != MAGIC:
            raise Qcow2Error("not a qcow2 image (bad magic)")
        fields = struct.unpack_from(HEADER_V2_FORMAT, cluster0)
        hdr = cls(*fields[1:])
        if hdr.version != VERSION:
            raise Qcow2Error(f"qcow2 version {hdr.version} is not supported (only version 3)")
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = struct.unpack_from(HEADER_V3_FORMAT, cluster0, 72)
        if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
            raise Qcow2Error(f"unsupported cluster size: 2^{hdr.cluster_bits} bytes")
        cluster_size = 1 << hdr.cluster_bits
        if not HEADER_V3_MIN <= hdr.header_length <= cluster_size or hdr.header_length % 8:
            raise Qcow2Error(f"invalid qcow2 header length {hdr.header_length}")
        if hdr.header_length > HEADER_V3_MIN:
            hdr.compression_type = cluster0[HEADER_V3_MIN]
        hdr._parse_extensions(cluster0[:cluster_size])
        if hdr.backing_file_offset:
            end = hdr.backing_file_offset + hdr.backing_file_size
            if hdr.backing_file_size > MAX_BACKING_NAME or end > cluster_size:
                raise Qcow2Error("invalid backing file name in the qcow2 header")
            name = cluster0[hdr.backing_file_offset : end]
            hdr.backing_file = name.decode("utf-8", errors="surrogateescape")
        return hdr

    def _parse_extensions(self, cluster0: bytes) -> None:
        pos = self.header_length
        while pos + 8 <= len(cluster0):
            ext_type, length = struct.unpack_from(">II", cluster0, pos)
            pos += 8
            if ext_type == EXT_END:
                return
            if pos + length > len(cluster0):
                raise Qcow2Error("invalid qcow2 header extension (runs past the first cluster)")
            data = cluster0[pos : pos + length]
            if ext_type == EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", errors="replace")
            elif ext_type == EXT_FEATURE_TABLE:
                for i in range(0, len(data) - 47, 48):
                    kind, bit = data[i], data[i + 1]
                    self.feature_names[(kind, bit)] = data[i + 2 : i + 48].rstrip(b"\0").decode(
                        "utf-8", errors="replace")
            pos += (length + 7) & ~7

    def feature_name(self, kind: int, bit: int) -> str:
        known = {(k, b): n for k, b, n in FEATURE_NAMES}
        return self.feature_names.get((kind, bit)) or known.get((kind, bit)) or f"unknown bit {bit}"


def _pack_header(hdr: Header) -> bytes:
    out = bytearray(struct.pack(
        HEADER_V2_FORMAT, MAGIC, hdr.version, hdr.backing_file_offset, hdr.backing_file_size,
        hdr.cluster_bits, hdr.size, hdr.crypt_method, hdr.l1_size, hdr.l1_table_offset,
        hdr.refcount_table_offset, hdr.refcount_table_clusters, hdr.nb_snapshots, hdr.snapshots_offset,
    ))
    out += struct.pack(HEADER_V3_FORMAT, hdr.incompatible_features, hdr.compatible_features,
                       hdr.autoclear_features, hdr.refcount_order, hdr.header_length)
    out += bytes([hdr.compression_type]) + bytes(hdr.header_length - HEADER_V3_MIN - 1)
    return bytes(out)


def _extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)


# -- creation ----------------------------------------------------------------------


def create_qcow2(
    path: str | os.PathLike[str],
    size: int,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Write a new, empty version-3 image (like ``qemu-img create -f qcow2``).

    Layout: header, refcount table, refcount blocks, L1 table, every cluster
    with refcount 1.  ``backing_file`` is stored as given (relative names are
    resolved against the image's folder when it is opened).
    """
    if size < 0 or size % 512:
        raise Qcow2Error(f"image size must be a multiple of 512 bytes, not {size}")
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"cluster size must be a power of two from 512 B to 2 MiB, not {cluster_size}")
    if backing_format is not None and backing_file is None:
        raise Qcow2Error("a backing format needs a backing file")
    l2_entries = cluster_size // 8
    refs_per_block = cluster_size * 8 // (1 << REFCOUNT_ORDER)
    l1_size = max(1, _ceil_div(_ceil_div(size, cluster_size), l2_entries))
    l1_clusters = -(-(l1_size * 8) // cluster_size)
    rt_clusters, nblocks = 1, 1
    while True:
        total = 1 + rt_clusters + nblocks + l1_clusters
        need_blocks = -(-total // refs_per_block)
        need_rt = -(-need_blocks // l2_entries)
        if need_blocks <= nblocks and need_rt <= rt_clusters:
            break
        nblocks, rt_clusters = max(nblocks, need_blocks), max(rt_clusters, need_rt)
    rt_offset = cluster_size
    blocks_offset = rt_offset + rt_clusters * cluster_size
    l1_offset = blocks_offset + nblocks * cluster_size

    extensions = b""
    if backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, backing_format.encode())
    name = backing_file.encode() if backing_file is not None else b""
    if len(name) > MAX_BACKING_NAME:
        raise Qcow2Error("backing file name too long")
    table = _extension(EXT_FEATURE_TABLE, b"".join(
        struct.pack(">BB46s", k, b, n.encode()) for k, b, n in FEATURE_NAMES))
    if HEADER_LENGTH + len(extensions) + len(table) + 8 + len(name) <= cluster_size:
        extensions += table  # optional: only where it fits (not in 512-byte clusters)
    extensions += bytes(8)
    hdr = Header(
        version=VERSION, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters, nb_snapshots=0,
        snapshots_offset=0, header_length=HEADER_LENGTH,
    )
    if backing_file is not None:
        hdr.backing_file_offset = HEADER_LENGTH + len(extensions)
        hdr.backing_file_size = len(name)
    cluster0 = _pack_header(hdr) + extensions + name
    if len(cluster0) > cluster_size:
        raise Qcow2Error("header does not fit in one cluster (backing file name too long)")

    reftable = np.zeros(rt_clusters * l2_entries, dtype=">u8")
    refblocks = np.zeros(nblocks * refs_per_block, dtype=">u2")
    refblocks[:total] = 1
    for i in range(nblocks):
        reftable[i] = blocks_offset + i * cluster_size
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total * cluster_size)
        os.pwrite(fd, cluster0, 0)
        os.pwrite(fd, reftable.tobytes(), rt_offset)
        os.pwrite(fd, refblocks.tobytes(), blocks_offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_qcow2(
    path: str | os.PathLike[str], *, name: str | None = None, read_only: bool = False,
    backing: BackingSpec = "header", depth: int = 0,
) -> Qcow2Node:
    """Open an image file as a qcow2 node that owns (and closes) its file store."""
    node_name = name if name is not None else os.fspath(path)
    try:
        store = FileStore(node_name + "-file", os.fspath(path), read_only=read_only)
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{os.fspath(path)}': {exc.strerror}") from None
    try:
        return Qcow2Node(node_name, store, backing=backing, read_only=read_only, owns_file=True, depth=depth)
    except BaseException:
        store.close_sync()
        raise


# -- the node ------------------------------------------------------------------


class Qcow2Node(BlockNode):
    """A qcow2 image on ``file`` (a FileStore, possibly under layers).

    ``backing`` is a node to read unallocated clusters from, None for none,
    or ``"header"`` to open the backing file the image names (read-only;
    closed with this node).
    """

    def __init__(
        self,
        name: str,
        file: BlockNode,
        *,
        backing: BackingSpec = "header",
        read_only: bool = False,
        owns_file: bool = False,
        depth: int = 0,
    ) -> None:
        super().__init__(name)
        self.file = file
        self._store = _bottom_store(file)
        self._fd = self._store.fileno()
        self._read_only = read_only or file.read_only
        self._owns_file = owns_file
        self._closed = False

        if stat.S_ISBLK(os.fstat(self._fd).st_mode):
            # Its length is not the data's end (fstat says 0): reads would find
            # zeroes and the allocator would hand out the header's cluster.
            raise Qcow2Error(f"'{self._store.path}': qcow2 images on block devices are not supported")
        head = _pread_exact(self._fd, HEADER_V3_MIN, 0, "the header")
        if head[:4] != MAGIC:
            raise Qcow2Error(f"'{self._store.path}' is not a qcow2 image (bad magic)")
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise Qcow2Error(f"unsupported cluster size: 2^{cluster_bits} bytes")
        cluster0 = os.pread(self._fd, 1 << cluster_bits, 0)
        hdr = Header.parse(cluster0)
        self.header = hdr
        self._check_features(hdr)

        cb = hdr.cluster_bits
        self._cb = cb
        self._cs = cs = 1 << cb
        self._l2_bits = cb - 3
        self._l2_entries = cs // 8
        self._rb_bits = cb + 3 - hdr.refcount_order
        self._rb_entries = 1 << self._rb_bits
        self._size = hdr.size
        self._file_len = os.fstat(self._fd).st_size

        need_l1 = _ceil_div(_ceil_div(hdr.size, cs), self._l2_entries)
        if hdr.l1_size < need_l1:
            raise Qcow2Error(f"L1 table too small for the image size ({hdr.l1_size} < {need_l1} entries)")
        for what, offset in (("L1 table", hdr.l1_table_offset),
                             ("refcount table", hdr.refcount_table_offset)):
            if offset % cs:
                raise Qcow2Error(f"{what} offset {offset:#x} is not cluster aligned (image corrupt)")
        self._l1_offset = hdr.l1_table_offset
        self._l1: U64 = np.frombuffer(
            bytearray(_pread_exact(self._fd, hdr.l1_size * 8, hdr.l1_table_offset, "the L1 table")),
            dtype=">u8")
        self._rt_offset = hdr.refcount_table_offset
        self._rt_clusters = hdr.refcount_table_clusters
        self._reftable: U64 = np.frombuffer(
            bytearray(_pread_exact(self._fd, self._rt_clusters * cs, self._rt_offset, "the refcount table")),
            dtype=">u8")

        self._meta = trio.Lock()
        self._locks = ClusterLocks()
        self._l2_cache: OrderedDict[int, U64] = OrderedDict()
        self._rb_cache: OrderedDict[int, npt.NDArray[np.uint16]] = OrderedDict()
        self._pool: list[int] = []
        self._pool_batch = POOL_BATCH_MIN
        self._pool_batch_max = max(POOL_BATCH_MIN, POOL_BATCH_BYTES // cs)
        self._pending_free: list[int] = []
        self._free_hint = 0

        self.backing: BlockNode | None
        self._owns_backing = False
        if backing == "header":
            self.backing = self._open_backing(hdr, depth)
            self._owns_backing = self.backing is not None
        else:
            self.backing = backing

        if not self._read_only and hdr.autoclear_features:
            # We maintain none of the autoclear features (bitmaps, raw data file): clear them.
            os.pwrite(self._fd, struct.pack(">Q", 0), 88)
            os.fdatasync(self._fd)
            hdr.autoclear_features = 0

    # -- opening --------------------------------------------------------------------
    def _check_features(self, hdr: Header) -> None:
        path = self._store.path
        if hdr.crypt_method != 0:
            raise Qcow2Error(f"'{path}': encrypted qcow2 images are not supported")
        unknown = hdr.incompatible_features & ~(
            INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
        if unknown:
            names = ", ".join(hdr.feature_name(0, b) for b in range(64) if unknown >> b & 1)
            raise Qcow2Error(f"'{path}' uses unsupported qcow2 features: {names}")
        if hdr.incompatible_features & INCOMPAT_DATA_FILE:
            raise Qcow2Error(f"'{path}': qcow2 images with an external data file are not supported")
        if hdr.incompatible_features & INCOMPAT_EXTL2:
            raise Qcow2Error(f"'{path}': qcow2 extended L2 entries (subclusters) are not supported")
        if hdr.compression_type != 0:
            raise Qcow2Error(f"'{path}': qcow2 compression type {hdr.compression_type} is not supported "
                             "(only zlib)")
        if self._read_only:
            return
        if hdr.incompatible_features & INCOMPAT_CORRUPT:
            raise Qcow2Error(f"'{path}' is marked corrupt; repair it with 'qemu-img check -r all' "
                             "(it can be opened read-only)")
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            raise Qcow2Error(f"'{path}' was not closed cleanly (lazy refcounts); repair it with "
                             "'qemu-img check -r all' (it can be opened read-only)")
        if hdr.refcount_order != REFCOUNT_ORDER:
            raise Qcow2Error(f"'{path}': only 16-bit refcounts can be written, this image has "
                             f"{1 << hdr.refcount_order}-bit refcounts")
        if hdr.nb_snapshots:
            raise Qcow2Error(f"'{path}' has internal snapshots: it can only be opened read-only")

    def _open_backing(self, hdr: Header, depth: int) -> BlockNode | None:
        if hdr.backing_file is None:
            return None
        if depth >= MAX_BACKING_DEPTH:
            raise Qcow2Error(f"backing chain of '{self._store.path}' is too deep (more than "
                             f"{MAX_BACKING_DEPTH} backing images, or a loop)")
        path = hdr.backing_file
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self._store.path)), path)
        fmt = hdr.backing_format
        if fmt is None:
            try:
                with open(path, "rb") as f:
                    fmt = "qcow2" if f.read(4) == MAGIC else "raw"
            except OSError as exc:
                raise Qcow2Error(f"Could not open backing file '{path}': {exc.strerror}") from None
        if fmt == "qcow2":
            return open_qcow2(path, name=f"{self.name}-backing", read_only=True, depth=depth + 1)
        if fmt != "raw":
            raise Qcow2Error(f"backing format '{fmt}' of '{self._store.path}' is not supported "
                             "(raw or qcow2 only)")
        try:
            return FileStore(f"{self.name}-backing", path, read_only=True)
        except OSError as exc:
            raise Qcow2Error(f"Could not open backing file '{path}': {exc.strerror}") from None

    # -- properties ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def path(self) -> str:
        return self._store.path

    # -- low-level I/O ---------------------------------------------------------------
    async def _write_file(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        await self.file.write(offset, view)
        self._file_len = max(self._file_len, offset + len(view))

    async def _read_host(self, offset: int, view: memoryview) -> None:
        """Read from the image file; what lies past its end reads as zeroes."""
        avail = max(0, min(len(view), self._file_len - offset))
        if avail:
            await self.file.read(offset, view[:avail])
        _zero(view[avail:])

    async def _sync(self) -> None:
        await self.file.flush()

    def _check_writable(self) -> None:
        if self._read_only:
            raise RequestError(Errno.EPERM, f"qcow2 node '{self.name}' is read-only")
        if self._closed:
            raise RequestError(Errno.ESHUTDOWN, f"qcow2 node '{self.name}' is closed")

    # -- table caches (loads and inserts only under self._meta) ----------------------------
    def _cache_put(self, cache: OrderedDict[int, A], key: int, table: A, limit: int) -> None:
        cache[key] = table
        cache.move_to_end(key)
        while len(cache) * self._cs > limit and len(cache) > 1:
            cache.popitem(last=False)

    async def _load_table(self, offset: int, dtype: str, what: str) -> npt.NDArray[Any]:
        if not offset or offset % self._cs:
            raise RequestError(Errno.EIO, f"qcow2 image corrupt: {what} at invalid offset {offset:#x}")
        buf = bytearray(self._cs)
        await self._read_host(offset, memoryview(buf))
        return np.frombuffer(buf, dtype=dtype)

    async def _l2_locked(self, offset: int) -> U64:
        table = self._l2_cache.get(offset)
        if table is None:
            table = await self._load_table(offset, ">u8", "L2 table")
            self._cache_put(self._l2_cache, offset, table, L2_CACHE_BYTES)
        else:
            self._l2_cache.move_to_end(offset)
        return table

    async def _l2(self, l1_index: int) -> U64 | None:
        """The L2 table of ``l1_index``, None when it has none (all unallocated)."""
        offset = int(self._l1[l1_index]) & L1E_OFFSET_MASK
        if not offset:
            return None
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        async with self._meta:
            return await self._l2_locked(offset)

    async def _entries(self, first: int, count: int) -> U64:
        """The L2 entries of guest clusters ``first .. first+count-1`` (0 = unallocated)."""
        out = np.zeros(count, dtype=np.uint64)
        done = 0
        while done < count:
            vc = first + done
            index = vc & (self._l2_entries - 1)
            n = min(count - done, self._l2_entries - index)
            table = await self._l2(vc >> self._l2_bits)
            if table is not None:
                out[done : done + n] = table[index : index + n]
            done += n
        return out

    def _has_refblock(self, rt_index: int) -> bool:
        return rt_index < len(self._reftable) and bool(int(self._reftable[rt_index]) & REFT_OFFSET_MASK)

    async def _refblock_locked(self, rt_index: int, *, create: bool = False) -> npt.NDArray[np.uint16]:
        if not self._has_refblock(rt_index):
            if not create:
                raise RequestError(Errno.EIO, f"qcow2 image corrupt: no refcount block #{rt_index}")
            await self._create_refblock_locked(rt_index)
        offset = int(self._reftable[rt_index]) & REFT_OFFSET_MASK
        block = self._rb_cache.get(offset)
        if block is None:
            block = await self._load_table(offset, ">u2", "refcount block")
            self._cache_put(self._rb_cache, offset, block, REFBLOCK_CACHE_BYTES)
        else:
            self._rb_cache.move_to_end(offset)
        return block

    # -- refcounts and allocation (all under self._meta) --------------------------------
    async def _write_refcounts(self, rt_index: int, block: npt.NDArray[np.uint16], lo: int, hi: int) -> None:
        offset = int(self._reftable[rt_index]) & REFT_OFFSET_MASK
        await self._write_file(offset + lo * 2, block[lo:hi].tobytes())

    async def _create_refblock_locked(self, rt_index: int) -> None:
        """A refcount block for a range with none: all its clusters are free, so
        it goes at the range's first cluster and counts itself."""
        if rt_index >= len(self._reftable):
            await self._grow_reftable_locked(rt_index + 1)
            if self._has_refblock(rt_index):
                return
        cluster = rt_index << self._rb_bits
        block: npt.NDArray[np.uint16] = np.zeros(self._rb_entries, dtype=">u2")
        block[0] = 1
        offset = cluster << self._cb
        await self._write_file(offset, block.tobytes())
        await self._sync()  # the block is on disk before the table names it
        self._reftable[rt_index] = offset
        entry = self._reftable[rt_index : rt_index + 1].tobytes()
        await self._write_file(self._rt_offset + rt_index * 8, entry)
        self._cache_put(self._rb_cache, offset, block, REFBLOCK_CACHE_BYTES)

    async def _end_cluster_locked(self) -> int:
        """First cluster after everything in use (refcounted or in the file)."""
        end = max(_ceil_div(self._file_len, self._cs), await self._end_cluster_in_use_locked())
        if self._pool:
            end = max(end, self._pool[-1] + 1)
        return end

    async def _end_cluster_in_use_locked(self) -> int:
        """First cluster after the last one with a refcount."""
        end = 0
        for rt_index in range(len(self._reftable) - 1, -1, -1):
            if not self._has_refblock(rt_index):
                continue
            used = np.flatnonzero(await self._refblock_locked(rt_index))
            if len(used):
                end = (rt_index << self._rb_bits) + int(used[-1]) + 1
                break
        return end

    async def _grow_reftable_locked(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at the end of the image."""
        cs, rbb = self._cs, self._rb_bits
        per = cs // 8
        end = await self._end_cluster_locked()
        new_clusters = max(2 * self._rt_clusters, -(-min_entries // per))
        while True:
            start, table_end = end, end + new_clusters
            missing: list[int] = []
            while True:
                hi = table_end + len(missing)
                now = [r for r in range(start >> rbb, ((hi - 1) >> rbb) + 1) if not self._has_refblock(r)]
                if len(now) <= len(missing):
                    break
                missing = now
            hi = table_end + len(missing)
            need = max(min_entries, ((hi - 1) >> rbb) + 1, len(self._reftable))
            if need <= new_clusters * per:
                break
            new_clusters = -(-need // per)

        table = np.zeros(new_clusters * per, dtype=">u8")
        table[: len(self._reftable)] = self._reftable
        new_blocks: dict[int, npt.NDArray[np.uint16]] = {
            r: np.zeros(self._rb_entries, dtype=">u2") for r in missing
        }
        for k, r in enumerate(missing):
            table[r] = (table_end + k) << self._cb
        for cluster in range(start, hi):
            r, i = cluster >> rbb, cluster & (self._rb_entries - 1)
            if r in new_blocks:
                new_blocks[r][i] = 1
                continue
            # Leaks until the header names the new table; written at once, so a
            # cache eviction between two clusters loses nothing.
            block = await self._refblock_locked(r)
            block[i] += 1
            await self._write_refcounts(r, block, i, i + 1)
        for k, r in enumerate(missing):
            await self._write_file((table_end + k) << self._cb, new_blocks[r].tobytes())
        await self._write_file(start << self._cb, table.tobytes())
        await self._sync()
        await self._write_file(48, struct.pack(">QI", start << self._cb, new_clusters))
        await self._sync()
        old_offset, old_clusters = self._rt_offset, self._rt_clusters
        self._reftable, self._rt_offset, self._rt_clusters = table, start << self._cb, new_clusters
        self.header.refcount_table_offset, self.header.refcount_table_clusters = self._rt_offset, new_clusters
        for k, r in enumerate(missing):
            self._cache_put(self._rb_cache, (table_end + k) << self._cb, new_blocks[r], REFBLOCK_CACHE_BYTES)
        first_old = old_offset >> self._cb
        for cluster in range(first_old, first_old + old_clusters):
            await self._decref_locked(cluster)

    async def _decref_locked(self, cluster: int) -> None:
        rt_index, i = cluster >> self._rb_bits, cluster & (self._rb_entries - 1)
        block = await self._refblock_locked(rt_index)
        if block[i] == 0:
            raise RequestError(Errno.EIO, f"qcow2 image corrupt: freeing cluster {cluster:#x} twice")
        block[i] -= 1
        await self._write_refcounts(rt_index, block, i, i + 1)
        if block[i] == 0:
            self._free_hint = min(self._free_hint, cluster)

    async def _refill_locked(self, want: int) -> None:
        """Reserve free clusters (refcount 1, synced) for the pool; then apply
        the frees that this sync made safe."""
        batch = max(want, self._pool_batch)
        self._pool_batch = min(2 * self._pool_batch, self._pool_batch_max)
        pending, self._pending_free = self._pending_free, []
        got: list[int] = []
        pos = hint = self._free_hint
        while len(got) < batch:
            rt_index = pos >> self._rb_bits
            block = await self._refblock_locked(rt_index, create=True)
            base = rt_index << self._rb_bits
            start = pos - base
            free = np.flatnonzero(block[start:] == 0)[: batch - len(got)] + start
            if len(free):
                block[free] = 1
                await self._write_refcounts(rt_index, block, int(free[0]), int(free[-1]) + 1)
                got.extend(base + int(i) for i in free)
            pos = got[-1] + 1 if len(got) == batch else base + self._rb_entries
        # Growing the refcount table may have freed clusters below the old hint.
        self._free_hint = pos if self._free_hint >= hint else self._free_hint
        pool_end = (max(got) + 1) << self._cb
        if pool_end > self._file_len:
            # Reserved clusters inside the file: after a crash, qemu-img check
            # reports them as (repairable) leaks instead of not seeing them.
            await self._write_file(pool_end - 1, b"\0")
        await self._sync()
        self._pool = sorted(self._pool + got)
        for cluster in pending:
            await self._decref_locked(cluster)

    async def _alloc_locked(self, count: int) -> list[int]:
        """Host offsets of ``count`` clusters, refcount 1 already on disk."""
        if not count:
            return []
        if len(self._pool) < count:
            await self._refill_locked(count - len(self._pool))
        taken, self._pool = self._pool[:count], self._pool[count:]
        return [c << self._cb for c in taken]

    def _unalloc(self, offsets: list[int]) -> None:
        """Give clusters taken by ``_alloc_locked`` but never used back to the pool."""
        self._pool = sorted(self._pool + [o >> self._cb for o in offsets])

    async def _update_l2_locked(self, updates: list[tuple[int, int]]) -> None:
        """Set L2 entries ``(guest cluster, entry)`` (sorted), creating tables as needed."""
        i = 0
        while i < len(updates):
            l1_index = updates[i][0] >> self._l2_bits
            offset, table = await self._l2_for_update_locked(l1_index)
            j = i
            mask = self._l2_entries - 1
            while j < len(updates) and updates[j][0] >> self._l2_bits == l1_index:
                table[updates[j][0] & mask] = updates[j][1]
                j += 1
            lo, hi = updates[i][0] & mask, (updates[j - 1][0] & mask) + 1
            await self._write_file(offset + lo * 8, table[lo:hi].tobytes())
            i = j

    async def _l2_for_update_locked(self, l1_index: int) -> tuple[int, U64]:
        entry = int(self._l1[l1_index])
        offset = entry & L1E_OFFSET_MASK
        if offset:
            if not entry & OFLAG_COPIED:
                raise RequestError(Errno.ENOTSUP, SHARED_L2)
            return offset, await self._l2_locked(offset)
        [offset] = await self._alloc_locked(1)
        table = np.zeros(self._l2_entries, dtype=">u8")
        await self._write_file(offset, table.tobytes())
        await self._sync()  # the table is on disk before L1 names it
        self._l1[l1_index] = offset | OFLAG_COPIED
        await self._write_file(self._l1_offset + l1_index * 8, self._l1[l1_index : l1_index + 1].tobytes())
        self._cache_put(self._l2_cache, offset, table, L2_CACHE_BYTES)
        return offset, table

    # -- reads ---------------------------------------------------------------------------
    def _range(self, offset: int, length: int) -> tuple[int, int]:
        first = offset >> self._cb
        return first, ((offset + length - 1) >> self._cb) - first + 1

    def _compressed_error(self) -> RequestError:
        return RequestError(Errno.EIO, f"qcow2 '{self.path}': compressed clusters are not supported")

    async def _read_backing(self, offset: int, view: memoryview, *, sparse: bool = False) -> list[Segment]:
        """Read guest range from the backing node (zeroes past its end); segments
        are relative to ``view``."""
        segments: list[Segment] = []
        n = 0 if self.backing is None else max(0, min(len(view), self.backing.size - offset))
        if n and self.backing is not None:
            for seg in await self.backing.read(offset, view[:n], sparse=sparse):
                _add_segment(segments, seg.start, seg.length, seg.zero)
        if n < len(view):
            if not sparse:
                _zero(view[n:])
            _add_segment(segments, n, len(view) - n, sparse)
        return segments

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        length = len(buf)
        if not length:
            return [Segment(0, 0, False)]
        first, count = self._range(offset, length)
        segments: list[Segment] = []
        cs = self._cs
        async with self._locks.hold(first, first + count - 1, exclusive=False):
            entries = await self._entries(first, count)
            for kind, start, n in _plan(entries, cs, by_host=True):
                lo = max(offset, (first + start) * cs)
                hi = min(offset + length, (first + start + n) * cs)
                view = buf[lo - offset : hi - offset]
                if kind == DATA:
                    host = int(entries[start]) & L2E_OFFSET_MASK
                    await self._read_host(host + lo - (first + start) * cs, view)
                    _add_segment(segments, lo - offset, hi - lo, False)
                elif kind == COMPRESSED:
                    raise self._compressed_error()
                elif kind == ZERO or self.backing is None:
                    if not sparse:
                        _zero(view)
                    _add_segment(segments, lo - offset, hi - lo, sparse)
                else:
                    for seg in await self._read_backing(lo, view, sparse=sparse):
                        _add_segment(segments, lo - offset + seg.start, seg.length, seg.zero)
        return segments

    async def cache(self, offset: int, length: int) -> None:
        """A prefetch hint: nothing to do."""

    # -- writes ----------------------------------------------------------------------------
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        if not len(data):
            return
        first, count = self._range(offset, len(data))
        last = first + count - 1
        mapped = False
        if not self._surely_unallocated(first):
            async with self._locks.hold(first, last, exclusive=False):
                entries = await self._entries(first, count)
                mapped = _all_mapped(entries)
                if mapped:
                    await self._write_mapped(offset, data, first, entries)
        if not mapped:
            async with self._locks.hold(first, last, exclusive=True):
                entries = await self._entries(first, count)
                with trio.CancelScope(shield=True):
                    await self._write_allocating(offset, data, first, entries)
        if fua:
            await self.flush()

    def _surely_unallocated(self, first: int) -> bool:
        """Cluster ``first`` is unallocated by what is in memory (no L2 table, or a zero entry
        in a cached one): the write allocates, so it may take the exclusive lock right away
        instead of a shared one first.  Only a hint: the exclusive path reads the entries again."""
        offset = int(self._l1[first >> self._l2_bits]) & L1E_OFFSET_MASK
        if not offset:
            return True
        table = self._l2_cache.get(offset)
        return table is not None and not int(table[first & (self._l2_entries - 1)])

    async def _write_mapped(self, offset: int, data: memoryview, first: int, entries: U64) -> None:
        """Write into clusters that are all allocated (and ours alone)."""
        cs = self._cs
        for _, start, n in _plan(entries, cs, by_host=True):
            lo = max(offset, (first + start) * cs)
            hi = min(offset + len(data), (first + start + n) * cs)
            host = (int(entries[start]) & L2E_OFFSET_MASK) + lo - (first + start) * cs
            await self._write_file(host, data[lo - offset : hi - offset])

    async def _write_allocating(self, offset: int, data: memoryview, first: int, entries: U64) -> None:
        """Write with copy-on-write into new clusters where needed, then link them."""
        cs, end = self._cs, offset + len(data)
        if not offset % cs and not len(data) % cs and not entries.any():
            await self._write_fresh(data, first, len(entries))
            return
        kinds = _classify(entries)
        if np.any(kinds == COMPRESSED):
            raise self._compressed_error()
        new_needed = 0
        for i, raw in enumerate(entries.tolist()):
            if raw & L2E_OFFSET_MASK and not raw & OFLAG_COPIED:
                raise RequestError(Errno.ENOTSUP, SHARED_CLUSTER)
            if kinds[i] == UNALLOCATED or (kinds[i] == ZERO and not raw & L2E_OFFSET_MASK):
                new_needed += 1
        async with self._meta:
            new = await self._alloc_locked(new_needed)
        pieces: list[tuple[int, memoryview, int]] = []
        """(host offset, bytes, offset of the bytes in ``data`` or -1 for a cluster buffer)"""
        updates: list[tuple[int, int]] = []
        fresh = iter(new)
        try:
            for i, raw in enumerate(entries.tolist()):
                vc = first + i
                cstart = vc * cs
                lo, hi = max(offset, cstart), min(end, cstart + cs)
                src = data[lo - offset : hi - offset]
                host = raw & L2E_OFFSET_MASK
                if kinds[i] == DATA:
                    pieces.append((host + lo - cstart, src, lo - offset))
                    continue
                if not host:
                    host = next(fresh)
                if lo == cstart and hi == cstart + cs:
                    pieces.append((host, src, lo - offset))
                else:
                    cluster = bytearray(cs)
                    if kinds[i] == UNALLOCATED and self.backing is not None:
                        await self._read_backing(cstart, memoryview(cluster)[: min(cs, self._size - cstart)])
                    cluster[lo - cstart : hi - cstart] = src
                    pieces.append((host, memoryview(cluster), -1))
                updates.append((vc, host | OFLAG_COPIED))
            await self._write_pieces(pieces, data)
        except BaseException:
            async with self._meta:
                self._unalloc(new)
            raise
        async with self._meta:
            await self._update_l2_locked(updates)

    async def _write_fresh(self, data: memoryview, first: int, count: int) -> None:
        """``_write_allocating`` of whole clusters that are all unallocated (a large write into
        a new image): each run of consecutive new host clusters in one pwrite straight from
        ``data``, then all the L2 entries (one pwrite per L2 table)."""
        cs = self._cs
        async with self._meta:
            new = await self._alloc_locked(count)
        try:
            i = 0
            while i < count:
                j = i + 1
                while j < count and new[j] == new[j - 1] + cs:
                    j += 1
                await self._write_file(new[i], data[i * cs : j * cs])
                i = j
        except BaseException:
            async with self._meta:
                self._unalloc(new)
            raise
        async with self._meta:
            await self._update_l2_locked([(first + i, host | OFLAG_COPIED) for i, host in enumerate(new)])

    async def _write_pieces(self, pieces: list[tuple[int, memoryview, int]], data: memoryview) -> None:
        """Write (host offset, bytes, offset in ``data``) pieces, joining runs that are
        contiguous on the host; a run that is also one stretch of ``data`` is written
        from it without a copy (a large write into new, consecutive clusters)."""
        i = 0
        while i < len(pieces):
            j = i + 1
            pos = pieces[i][0] + len(pieces[i][1])
            in_data = pieces[i][2] >= 0
            while j < len(pieces) and pieces[j][0] == pos:
                in_data = in_data and pieces[j][2] == pieces[j - 1][2] + len(pieces[j - 1][1])
                pos += len(pieces[j][1])
                j += 1
            if j == i + 1:
                await self._write_file(pieces[i][0], pieces[i][1])
            elif in_data:
                start = pieces[i][2]
                await self._write_file(pieces[i][0], data[start : start + pos - pieces[i][0]])
            else:
                await self._write_file(pieces[i][0], b"".join(p for _, p, _ in pieces[i:j]))
            i = j

    # -- zeroing and discard ------------------------------------------------------------------
    def _full_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """(first, count) of the clusters entirely inside the range (the last,
        partial cluster of the image counts when the range reaches the end)."""
        cs, end = self._cs, offset + length
        first = -(-offset // cs)
        last_end = self._size if end >= self._size else (end // cs) * cs
        count = max(0, -(-last_end // cs) - first) if last_end >= first * cs else 0
        return first, count

    async def _zero_clusters(self, first: int, count: int, *, unmap: bool, discard: bool) -> None:
        """Make whole clusters read as zeroes (``discard``: TRIM's rules), one
        L2 table's worth at a time."""
        end = first + count
        while first < end:
            n = min(end - first, self._l2_entries - (first & (self._l2_entries - 1)))
            await self._zero_table_part(first, n, unmap=unmap, discard=discard)
            first += n

    async def _zero_table_part(self, first: int, count: int, *, unmap: bool, discard: bool) -> None:
        async with self._locks.hold(first, first + count - 1, exclusive=True):
            entries = await self._entries(first, count)
            kinds = _classify(entries)
            if np.any(kinds == COMPRESSED):
                raise self._compressed_error()
            updates: list[tuple[int, int]] = []
            freed: list[int] = []
            for i, raw in enumerate(entries.tolist()):
                host = raw & L2E_OFFSET_MASK
                if host and not raw & OFLAG_COPIED:
                    raise RequestError(Errno.ENOTSUP, SHARED_CLUSTER)
                if kinds[i] == UNALLOCATED:
                    new = OFLAG_ZERO if (self.backing is not None or not discard) else 0
                elif host and (unmap or discard):
                    new = OFLAG_ZERO
                    freed.append(host >> self._cb)
                elif kinds[i] == DATA:
                    new = host | OFLAG_ZERO | OFLAG_COPIED
                else:
                    new = raw
                if new != raw:
                    updates.append((first + i, new))
            with trio.CancelScope(shield=True):
                async with self._meta:
                    await self._update_l2_locked(updates)
                    # Freed only after the next sync: the cleared L2 entries reach the disk first.
                    self._pending_free.extend(freed)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        if not length:
            return
        first, count = self._full_clusters(offset, length)
        cs, end = self._cs, offset + length
        head_end = min(end, first * cs) if count else end
        tail_start = max(head_end, (first + count) * cs) if count else end
        for lo, hi in ((offset, head_end), (tail_start, end)):
            if lo >= hi:
                continue
            c, n = self._range(lo, hi - lo)
            kinds = _classify(await self._entries(c, n))
            if np.all((kinds == ZERO) | ((kinds == UNALLOCATED) & (self.backing is None))):
                continue
            if fast:
                raise RequestError(Errno.ENOTSUP, "qcow2: zeroing part of a cluster is not fast")
            await self.write(lo, memoryview(bytes(hi - lo)))
        if count:
            await self._zero_clusters(first, count, unmap=may_trim, discard=False)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        first, count = self._full_clusters(offset, length)
        if count:
            await self._zero_clusters(first, count, unmap=True, discard=True)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self._read_only or self._closed:
            return
        pending, self._pending_free = self._pending_free, []
        await self._sync()
        if pending:
            with trio.CancelScope(shield=True):
                async with self._meta:
                    for cluster in pending:
                        await self._decref_locked(cluster)

    # -- status -------------------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._size)
        if end <= offset:
            return [Extent(length, HOLE_ZERO)]
        first, count = self._range(offset, end - offset)
        count = min(count, STATUS_MAX_CLUSTERS)
        cs = self._cs
        extents: list[Extent] = []
        entries = await self._entries(first, count)
        for kind, start, n in _plan(entries, cs, by_host=False):
            lo = max(offset, (first + start) * cs)
            hi = min(end, (first + start + n) * cs)
            if kind in (DATA, COMPRESSED):
                _add_extent(extents, hi - lo, AllocationState(0))
            elif kind == ZERO or self.backing is None or lo >= self.backing.size:
                _add_extent(extents, hi - lo, HOLE_ZERO)
            else:
                m = min(hi, self.backing.size) - lo
                covered = 0
                for ext in await self.backing.block_status(lo, m):
                    take = min(ext.length, m - covered)
                    _add_extent(extents, take, ext.flags)
                    covered += take
                    if covered >= m:
                        break
                if covered < m:
                    break
                _add_extent(extents, hi - lo - m, HOLE_ZERO)
        return extents

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, depth)`` runs: 1 allocated here (data or zero), 2+ in the
        backing chain at that depth, 0 unallocated everywhere."""
        end = min(offset + length, self._size)
        if end <= offset:
            return [(length, 0)]
        first, count = self._range(offset, end - offset)
        count = min(count, STATUS_MAX_CLUSTERS)
        cs = self._cs
        depths: list[tuple[int, int]] = []
        entries = await self._entries(first, count)
        backing = _unwrap(self.backing) if self.backing is not None else None
        for kind, start, n in _plan(entries, cs, by_host=False):
            lo = max(offset, (first + start) * cs)
            hi = min(end, (first + start + n) * cs)
            if kind != UNALLOCATED:
                _add_depth(depths, hi - lo, 1)
            elif backing is None or lo >= backing.size:
                _add_depth(depths, hi - lo, 0)
            elif not isinstance(backing, Qcow2Node):
                m = min(hi, backing.size) - lo
                _add_depth(depths, m, 2)
                _add_depth(depths, hi - lo - m, 0)
            else:
                m = min(hi, backing.size) - lo
                covered = 0
                for sub, depth in await backing.allocation_depth(lo, m):
                    take = min(sub, m - covered)
                    _add_depth(depths, take, depth + 1 if depth else 0)
                    covered += take
                    if covered >= m:
                        break
                if covered < m:
                    break
                _add_depth(depths, hi - lo - m, 0)
        return depths

    # -- consistency check (tests and diagnostics) ------------------------------------------------
    async def check(self) -> tuple[list[str], list[int]]:
        """Compare refcounts with references: (errors, leaked clusters).

        Counts the header, refcount table and blocks, L1, L2 tables and data
        clusters; with the pool and pending frees taken into account, an
        open image is consistent when both lists are empty.
        """
        async with self._meta:
            refs: dict[int, int] = {}

            def ref(offset: int, clusters: int = 1) -> None:
                for c in range(offset >> self._cb, (offset >> self._cb) + clusters):
                    refs[c] = refs.get(c, 0) + 1

            ref(0)
            ref(self._rt_offset, self._rt_clusters)
            ref(self._l1_offset, -(-len(self._l1) * 8 // self._cs))
            for r in range(len(self._reftable)):
                if self._has_refblock(r):
                    ref(int(self._reftable[r]) & REFT_OFFSET_MASK)
            for entry in self._l1.tolist():
                l2 = entry & L1E_OFFSET_MASK
                if not l2:
                    continue
                ref(l2)
                for raw in (await self._l2_locked(l2)).tolist():
                    if raw & OFLAG_COMPRESSED:
                        continue
                    if raw & L2E_OFFSET_MASK:
                        ref(raw & L2E_OFFSET_MASK)
            for c in self._pool + self._pending_free:
                refs[c] = refs.get(c, 0) + 1
            errors: list[str] = []
            leaks: list[int] = []
            counts: dict[int, int] = {}
            for r in range(len(self._reftable)):
                if not self._has_refblock(r):
                    continue
                block = await self._refblock_locked(r)
                for i in np.flatnonzero(block).tolist():
                    counts[(r << self._rb_bits) + i] = int(block[i])
            for c in sorted(set(refs) | set(counts)):
                have, want = counts.get(c, 0), refs.get(c, 0)
                if have < want:
                    errors.append(f"cluster {c}: refcount {have} < {want} references")
                elif have > want:
                    leaks.append(c)
            return errors, leaks

    # -- closing --------------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        if not self._read_only:
            await self.flush()
            with trio.CancelScope(shield=True):
                async with self._meta:
                    pool, self._pool = self._pool, []
                    for cluster in pool:
                        await self._decref_locked(cluster)
                    end = (await self._end_cluster_in_use_locked()) << self._cb
                    if end < self._file_len:  # drop the unused tail the pool reserved
                        os.ftruncate(self._fd, end)
                        self._file_len = end
                await self._sync()
        self._closed = True
        if self._owns_backing and self.backing is not None:
            await self.backing.close()
        if self._owns_file:
            await self.file.close()
