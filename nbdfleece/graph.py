"""The block graph: named nodes, their dirty bitmaps, and bitmap operations.

Every node is topped by a :class:`DirtyTracking` layer, so bitmaps can live on
any node and see every write that passes through it.  Drivers today:

* ``file``: a :class:`FileStore` on a raw image or block device;
* ``raw``: the format node over a ``file`` node (a pass-through);
* ``qcow2``: a :class:`Qcow2Node` over a ``file`` node or an image path, with
  a backing node or the backing file its header names;
* ``x-nbdfleece-fault`` and ``blkdebug``: a :class:`FaultInjector` filter
  over any node (``block/faults.py``);
* ``nbd``: an :class:`NbdNode` whose bytes live on a remote NBD server
  (``block/nbd.py``), connected before it is added here.

Bitmap operations carry QEMU 7.2's error texts and return an *undo*
callable, so a QMP ``transaction`` can roll back every action it already
applied when a later one fails (all-or-nothing).

Persistent bitmaps belong to an image file (see ``persistence.py``).  They
are loaded into the ``file`` node that opens the image and move up to the
``raw`` node created over it, where QEMU keeps them on its format node.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nbdfleece import persistence
from nbdfleece.bitmap import DEFAULT_GRANULARITY, DirtyBitmap, valid_granularity
from nbdfleece.block.faults import FaultInjector, FaultSpec
from nbdfleece.block.file import FileStore
from nbdfleece.block.nbd import NbdNode
from nbdfleece.block.node import BlockNode, Layer
from nbdfleece.block.qcow2 import Qcow2Error, Qcow2Node
from nbdfleece.block.tracking import DirtyTracking

log = logging.getLogger(__name__)

Undo = Callable[[], None]
MAX_BITMAP_NAME = 1023


class ControlError(Exception):
    """A refused management operation, worded as QEMU words it."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


_WELLFORMED_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def id_wellformed(name: str) -> bool:
    """QEMU's ``id_wellformed``: a letter, then letters, digits, ``-``, ``.``, ``_``."""
    return _WELLFORMED_ID.match(name) is not None


@dataclass(eq=False)
class GraphNode:
    name: str
    driver: str
    top: DirtyTracking
    children: list[GraphNode] = field(default_factory=list)
    store: FileStore | None = None
    detach: Callable[[], None] | None = None
    """Called when the node is deleted (a filter unlinks itself from a chain)."""
    format_node: BlockNode | None = None
    """A format driver with state to close (qcow2), under the tracking layer."""
    users: int = 0
    """Parents and exports using this node: it cannot be deleted while > 0."""
    implicit: bool = False
    """Created inline as another node's child (QMP ``blockdev-add`` with a ``file``
    object): not deletable by itself, it goes away with its parent."""

    @property
    def bitmaps(self) -> dict[str, DirtyBitmap]:
        return self.top.bitmaps

    def image(self) -> FileStore | None:
        """The file store at the bottom of this node's chain."""
        if self.store is not None:
            return self.store
        for child in self.children:
            found = child.image()
            if found is not None:
                return found
        return None


class RawFormat(Layer):
    """The ``raw`` driver: bytes pass through unchanged."""

    def __init__(self, name: str, child: BlockNode, *, read_only: bool = False) -> None:
        super().__init__(name, child)
        self._read_only = read_only

    @property
    def read_only(self) -> bool:
        return self._read_only or self.child.read_only


class BlockGraph:
    """All nodes by node-name."""

    def __init__(self) -> None:
        self.nodes: dict[str, GraphNode] = {}
        self._qcow2_users: dict[tuple[int, int], dict[str, bool]] = {}
        """Open qcow2 images (device, inode) -> {node name: writable}."""

    def __iter__(self) -> Iterator[GraphNode]:
        return iter(list(self.nodes.values()))

    # -- nodes ------------------------------------------------------------------
    def node(self, name: str) -> GraphNode:
        found = self.nodes.get(name)
        if found is None:
            raise ControlError(f"Cannot find device='{name}' nor node-name='{name}'")
        return found

    def _check_new_name(self, name: str) -> None:
        if not name:
            raise ControlError("node-name cannot be empty")
        if name in self.nodes:
            raise ControlError(f"Duplicate nodes with node-name='{name}'")

    def add_file(self, name: str, filename: str, *, read_only: bool = False) -> GraphNode:
        self._check_new_name(name)
        try:
            store = FileStore(name, filename, read_only=read_only)
        except OSError as exc:
            raise ControlError(f"Could not open '{filename}': {exc.strerror}") from None
        node = GraphNode(name, "file", DirtyTracking(name, store), store=store)
        try:
            bitmaps, crashed = persistence.load(filename, store.size)
        except persistence.BitmapFileError as exc:
            store.close_sync()
            raise ControlError(str(exc)) from None
        if crashed:
            log.warning(
                "%s was not closed cleanly: %d persistent bitmap(s) marked inconsistent",
                filename, len(bitmaps),
            )
        node.bitmaps.update((b.name, b) for b in bitmaps)
        self.nodes[name] = node
        if bitmaps and not read_only:
            self._mark_in_use(node)
        return node

    def add_raw(self, name: str, file: GraphNode, *, read_only: bool = False) -> GraphNode:
        self._check_new_name(name)
        raw = RawFormat(name, file.top, read_only=read_only)
        node = GraphNode(name, "raw", DirtyTracking(name, raw), children=[file])
        # Persistent bitmaps of the image live on its format node, as in QEMU -- unless
        # the file node is in use already (exported, another parent): writes through
        # it would then no longer reach the bitmaps.  Left below, they still see the
        # raw node's writes too, which pass through the file node's tracking.
        if not file.users:
            for bname, bitmap in list(file.bitmaps.items()):
                if bitmap.persistent:
                    node.bitmaps[bname] = file.bitmaps.pop(bname)
        file.users += 1
        self.nodes[name] = node
        return node

    def add_qcow2(
        self,
        name: str,
        file: GraphNode | str,
        backing: GraphNode | None = None,
        *,
        read_only: bool = False,
    ) -> GraphNode:
        """A ``qcow2`` format node on ``file`` (a node, or an image path opened
        here).  ``backing`` None means: the backing file named in the image
        header, if any (opened read-only, owned by the qcow2 node)."""
        self._check_new_name(name)
        store: FileStore | None = None
        if isinstance(file, str):
            try:
                self._claim_qcow2(name, os.stat(file), writable=not read_only)
            except OSError as exc:
                raise ControlError(f"Could not open '{file}': {exc.strerror}") from None
            try:
                store = FileStore(name, file, read_only=read_only)
            except OSError as exc:
                self._release_qcow2(name)
                raise ControlError(f"Could not open '{file}': {exc.strerror}") from None
            below: BlockNode = store
        else:
            below = file.top
            image = file.image()
            self._claim_qcow2(name, os.fstat(image.fileno()) if image is not None else None,
                              writable=not (read_only or below.read_only))
        try:
            qcow2 = Qcow2Node(
                name, below, backing="header" if backing is None else backing.top, read_only=read_only
            )
        except (Qcow2Error, OSError) as exc:
            self._release_qcow2(name)
            if store is not None:
                store.close_sync()
            raise ControlError(str(exc)) from None
        children = [n for n in (file, backing) if isinstance(n, GraphNode)]
        node = GraphNode(name, "qcow2", DirtyTracking(name, qcow2), children=children, store=store,
                         format_node=qcow2)
        for child in children:
            child.users += 1
        self.nodes[name] = node
        return node

    def add_nbd(self, name: str, remote: NbdNode, *, read_only: bool = False) -> GraphNode:
        """An ``nbd`` node over an already connected :class:`NbdNode` (connecting
        awaits, adding does not); deleting the node disconnects it."""
        self._check_new_name(name)
        if not read_only and remote.remote_read_only:
            raise ControlError("NBD export is read-only")
        remote.name = name
        remote.read_only_option = read_only
        node = GraphNode(name, "nbd", DirtyTracking(name, remote), format_node=remote)
        self.nodes[name] = node
        return node

    def add_fault(self, name: str, image: GraphNode, specs: list[FaultSpec], *,
                  driver: str = "x-nbdfleece-fault", read_only: bool = False) -> GraphNode:
        """A fault-injection filter node over ``image`` (QMP ``x-nbdfleece-fault``
        or ``blkdebug``), so it can sit under an overlay or a backup target."""
        self._check_new_name(name)
        layer = FaultInjector(name, image.top, specs, read_only=read_only)
        node = GraphNode(name, driver, DirtyTracking(name, layer), children=[image])
        image.users += 1
        self.nodes[name] = node
        log.info("fault node '%s' over '%s': %s", name, image.name,
                 "; ".join(s.describe() for s in specs) or "no rules")
        return node

    def insert_fault(self, node: GraphNode, spec: FaultSpec) -> FaultInjector:
        """Add a rule to the fault layer right under ``node``'s tracking layer,
        inserting one there first if needed (``--fault NODE:...``): bitmaps
        above it see every request, failed or not."""
        layer = node.top.child
        if not isinstance(layer, FaultInjector):
            layer = FaultInjector(node.name, node.top.child)
            node.top.child = layer
        layer.add(spec)
        log.info("fault rule on '%s': %s", node.name, spec.describe())
        return layer

    def _claim_qcow2(self, name: str, st: os.stat_result | None, *, writable: bool) -> None:
        """One qcow2 node per image while any of them writes (QEMU's image locking,
        within this process): two allocators on one file would hand out the same
        clusters, and a reader would follow tables a writer is changing.  (Writable
        files are also ``flock``ed, ``FileStore``, which keeps other servers out.)"""
        if st is None:
            return
        users = self._qcow2_users.setdefault((st.st_dev, st.st_ino), {})
        if users and (writable or any(users.values())):
            lock = '"write" lock' if writable else 'shared "write" lock'
            raise ControlError(f"Failed to get {lock}")
        users[name] = writable

    def _release_qcow2(self, name: str) -> None:
        """Node ``name`` no longer has its image open (if it was a qcow2 node)."""
        for key, users in list(self._qcow2_users.items()):
            if users.pop(name, None) is not None and not users:
                del self._qcow2_users[key]

    async def remove(self, name: str) -> None:
        node = self.node(name)
        if node.users:
            raise ControlError(f"Node '{name}' is busy: block device is in use")
        for bitmap in node.bitmaps.values():
            if bitmap.busy:
                raise ControlError(f"Node '{name}' is busy: bitmap '{bitmap.name}' is in use")
        self._release_qcow2(name)
        store = node.image()
        if node.detach is not None:
            node.detach()
        del self.nodes[name]
        for child in node.children:
            child.users -= 1
            self._restore_persistent(node, child)
        if store is not None and not store.read_only:
            # Clean only if no open node still uses (and may write) the image.
            still_open = self._image_nodes(store)
            bitmaps = [b for n in still_open or [node] for b in n.bitmaps.values()]
            try:
                persistence.save(store.path, store.size, bitmaps, in_use=bool(still_open))
            except OSError as exc:
                log.error("cannot store persistent bitmaps of %s: %s", store.path, exc.strerror)
        if node.format_node is not None:
            await node.format_node.close()  # qcow2: pending frees, tail trim, owned backing
        if node.store is not None:
            await node.store.close()

    def _restore_persistent(self, parent: GraphNode, child: GraphNode) -> None:
        for bname, bitmap in list(parent.bitmaps.items()):
            if bitmap.persistent:
                child.bitmaps.setdefault(bname, bitmap)

    # -- persistence --------------------------------------------------------------
    def _image_nodes(self, store: FileStore) -> list[GraphNode]:
        return [n for n in self.nodes.values() if n.image() is store]

    def save_bitmaps(self, node: GraphNode, *, clean: bool) -> None:
        """Write the sidecar of ``node``'s image (in_use unless ``clean``)."""
        store = node.image()
        if store is None or store.read_only:
            return
        bitmaps = [b for n in self._image_nodes(store) for b in n.bitmaps.values()]
        try:
            persistence.save(store.path, store.size, bitmaps, in_use=not clean)
        except OSError as exc:
            raise ControlError(f"Can't store persistent bitmaps to {node.name}: {exc.strerror}") from None

    def _mark_in_use(self, node: GraphNode) -> None:
        self.save_bitmaps(node, clean=False)

    def _save_quietly(self, node: GraphNode) -> None:
        """The sidecar again, in an undo (which must not fail): a failure is logged; the
        bitmaps in memory are right, and the next save or a clean stop writes them."""
        try:
            self._mark_in_use(node)
        except ControlError as exc:
            log.error("%s", exc.desc)

    @staticmethod
    def _persists(node: GraphNode) -> bool:
        """Whether ``node``'s bitmaps can go to its image's sidecar: its bytes are the
        file's (``file``, ``raw``).  Under a format driver (qcow2, where QEMU keeps them
        inside the image) the file's size is not the disk's: not supported here."""
        while node.format_node is None:
            if node.store is not None:
                return True
            if not node.children:
                return False
            node = node.children[0]
        return False

    async def close(self) -> None:
        """Clean shutdown: persist exact bitmap contents, then close the files."""
        done: set[int] = set()
        for node in self:
            store = node.image()
            if store is None or id(store) in done:
                continue
            done.add(id(store))
            try:
                self.save_bitmaps(node, clean=True)
            except ControlError as exc:
                log.error("%s", exc.desc)
        for node in self:
            if node.format_node is not None:
                await node.format_node.close()
        for node in self:
            if node.store is not None:
                await node.store.close()

    # -- bitmap lookups -----------------------------------------------------------
    def bitmap(self, node: str, name: str) -> DirtyBitmap:
        """QEMU's ``block_dirty_bitmap_lookup`` (its texts differ from :meth:`node`'s)."""
        owner = self.nodes.get(node)
        if owner is None:
            raise ControlError(f"Node '{node}' not found")
        found = owner.bitmaps.get(name)
        if found is None:
            raise ControlError(f"Dirty bitmap '{name}' not found")
        return found

    @staticmethod
    def _usable(bitmap: DirtyBitmap, *, modify: bool) -> None:
        if bitmap.inconsistent:
            raise ControlError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")
        if modify and bitmap.busy:
            raise ControlError(
                f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used"
            )

    # -- bitmap operations (each returns its undo) -----------------------------
    def bitmap_add(
        self,
        node: str,
        name: str,
        *,
        granularity: int | None = None,
        persistent: bool = False,
        disabled: bool = False,
    ) -> Undo:
        # QEMU 7.2's order of checks (qmp_block_dirty_bitmap_add, bdrv_create_dirty_bitmap).
        if not name:
            raise ControlError("Bitmap name cannot be empty")
        target = self.node(node)
        gran = DEFAULT_GRANULARITY if granularity is None else granularity
        if not valid_granularity(gran):
            raise ControlError("Granularity must be power of 2 and at least 512")
        if persistent and (not self._persists(target) or target.top.read_only):
            raise ControlError(f"Can't store persistent bitmaps to {node}: Operation not supported")
        if name in target.bitmaps:
            raise ControlError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_BITMAP_NAME:
            raise ControlError(f"Bitmap name too long: {name}")
        bitmap = DirtyBitmap(name, target.top.size, gran, recording=not disabled, persistent=persistent)
        target.bitmaps[name] = bitmap
        if persistent:
            try:
                self._mark_in_use(target)
            except ControlError:  # not stored: not added either
                target.bitmaps.pop(name, None)
                raise

        def undo() -> None:
            target.bitmaps.pop(name, None)
            if persistent:
                self._save_quietly(target)

        return undo

    def bitmap_remove(self, node: str, name: str) -> Undo:
        bitmap = self.bitmap(node, name)
        target = self.node(node)
        if bitmap.busy:
            self._usable(bitmap, modify=True)
        del target.bitmaps[name]
        if bitmap.persistent:
            try:
                self._mark_in_use(target)
            except ControlError:  # still stored: not removed either
                target.bitmaps[name] = bitmap
                raise

        def undo() -> None:
            target.bitmaps[name] = bitmap
            if bitmap.persistent:
                self._save_quietly(target)

        return undo

    def bitmap_clear(self, node: str, name: str) -> Undo:
        bitmap = self.bitmap(node, name)
        self._usable(bitmap, modify=True)
        saved = bitmap.bits.copy()
        bitmap.clear()

        def undo() -> None:
            bitmap.bits = saved

        return undo

    def bitmap_enable(self, node: str, name: str, enable: bool = True) -> Undo:
        bitmap = self.bitmap(node, name)
        self._usable(bitmap, modify=True)
        before = bitmap.recording
        bitmap.recording = enable

        def undo() -> None:
            bitmap.recording = before

        return undo

    def bitmap_merge(self, node: str, target: str, sources: list[str | dict[str, str]]) -> Undo:
        """QEMU 7.2's order: the target found; then for each source: found, the
        target usable, the source usable (a busy one too is refused), same size."""
        dest = self.bitmap(node, target)
        resolved = []
        for src in sources:
            src_node, src_name = (node, src) if isinstance(src, str) else (src["node"], src["name"])
            bitmap = self.bitmap(src_node, src_name)
            self._usable(dest, modify=True)
            self._usable(bitmap, modify=True)
            if bitmap.size != dest.size:
                raise ControlError(
                    f"Bitmaps are of different sizes (destination size is {dest.size}, "
                    f"source size is {bitmap.size}) and can't be merged"
                )
            resolved.append(bitmap)
        self._usable(dest, modify=True)  # also with no source at all
        saved = dest.bits.copy()
        for bitmap in resolved:
            dest.merge_from(bitmap)

        def undo() -> None:
            dest.bits = saved

        return undo

    def bitmap_info(self, node: GraphNode) -> list[dict[str, object]]:
        """``BlockDirtyInfo`` for every bitmap of ``node`` (QEMU's field order)."""
        out: list[dict[str, object]] = []
        for b in node.bitmaps.values():
            info: dict[str, object] = {
                "name": b.name,
                "recording": b.recording,
                "persistent": b.persistent,
                "busy": bool(b.busy),
                "granularity": b.granularity,
                "count": b.count(),
            }
            if b.inconsistent:
                info["inconsistent"] = True
            out.append(info)
        return out

