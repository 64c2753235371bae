"""The daemon's state: block graph, NBD exports and NBD listeners, in one place.

The command line and the QMP commands both act through :class:`Daemon`, so
``--export live=live.raw,bitmap=bm0`` and the QMP sequence
``blockdev-add`` / ``block-dirty-bitmap-add`` / ``block-export-add`` build the
same objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.constants import QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP_PREFIX, AllocationState
from nbdfleece.exports import Export, ExportRegistry, ExtentProvider
from nbdfleece.extents import ExtentArray, as_extents
from nbdfleece.graph import BlockGraph, ControlError, GraphNode
from nbdfleece.qmp.events import EventBroadcaster
from nbdfleece.server import Server, describe_listener, open_listener

log = logging.getLogger(__name__)

BitmapRef = str | dict[str, str]


@dataclass(eq=False)
class ExportRecord:
    """A block export as QMP sees it (``id`` may differ from the NBD name)."""

    id: str
    node: GraphNode
    export: Export
    bitmaps: list[DirtyBitmap] = field(default_factory=list)


def bitmap_provider(bitmap: DirtyBitmap) -> ExtentProvider:
    async def extents(offset: int, length: int) -> ExtentArray:
        return bitmap.extent_array(offset, length)

    return extents


def allocation_depth_provider(node: GraphNode) -> ExtentProvider:
    """``qemu:allocation-depth``: 1 where this node holds data, 0 for holes."""

    async def extents(offset: int, length: int) -> ExtentArray:
        found = await node.top.block_status(offset, length)
        return as_extents((e.length, 0 if e.flags & AllocationState.HOLE else 1) for e in found)

    return extents


class Daemon:
    """Everything a running nbdfleece serves."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.graph = BlockGraph()
        self.registry: ExportRegistry = server.registry
        self.exports: dict[str, ExportRecord] = {}
        self._nbd_listeners: list[Callable[[], None]] = []
        self.nbd_addresses: list[str] = []
        self.events = EventBroadcaster()
        """QMP events (``emit_event(name, data)``) go to every connected monitor."""

    # -- exports -------------------------------------------------------------------
    def add_export(
        self,
        export_id: str,
        node_name: str,
        *,
        name: str | None = None,
        description: str = "",
        writable: bool = False,
        bitmaps: list[BitmapRef] | None = None,
        allocation_depth: bool = False,
    ) -> ExportRecord:
        if export_id in self.exports:
            raise ControlError(f"Block export id '{export_id}' is already in use")
        node = self.graph.node(node_name)
        nbd_name = export_id if name is None else name
        if len(nbd_name.encode()) > 4096:
            raise ControlError("export name too long")
        if self.registry.get(nbd_name) is not None and nbd_name != "":
            raise ControlError(f"NBD server already has export named '{nbd_name}'")
        if writable and node.top.read_only:
            raise ControlError(f"Cannot export node '{node_name}' writable: it is read-only")
        providers: dict[str, ExtentProvider] = {}
        if allocation_depth:
            providers[QEMU_ALLOCATION_DEPTH] = allocation_depth_provider(node)
        chosen: list[DirtyBitmap] = []
        for ref in bitmaps or []:
            if isinstance(ref, str):
                bitmap = node.bitmaps.get(ref)
                if bitmap is None:
                    raise ControlError(f"Bitmap '{ref}' is not found")
            else:
                bitmap = self.graph.bitmap(ref["node"], ref["name"])
            if bitmap.inconsistent:
                raise ControlError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")
            context = QEMU_DIRTY_BITMAP_PREFIX + bitmap.name
            if context in providers:
                raise ControlError(f"Bitmap '{bitmap.name}' is exported twice")
            providers[context] = bitmap_provider(bitmap)
            chosen.append(bitmap)
        export = Export(nbd_name, node.top, read_only=not writable, description=description,
                        providers=providers)
        self.registry.add(export)
        for bitmap in chosen:
            bitmap.busy += 1
        node.users += 1
        record = ExportRecord(export_id, node, export, chosen)
        self.exports[export_id] = record
        log.info("export '%s' of node '%s' added%s", nbd_name, node_name,
                 f" with bitmaps {[b.name for b in chosen]}" if chosen else "")
        return record

    def remove_export(self, export_id: str) -> None:
        record = self.exports.get(export_id)
        if record is None:
            raise ControlError(f"Export '{export_id}' is not found")
        self.registry.remove(record.export.name)
        for bitmap in record.bitmaps:
            bitmap.busy -= 1
        record.node.users -= 1
        del self.exports[export_id]
        log.info("export '%s' removed", record.export.name)
        self.events.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})

    # -- NBD listeners -------------------------------------------------------------
    def nbd_server_start(self, addresses: list[str]) -> None:
        if self._nbd_listeners:
            raise ControlError("NBD server already running")
        socks = []
        try:
            for spec in addresses:
                socks.append(open_listener(spec))
        except (OSError, ValueError) as exc:
            for sock in socks:
                sock.close()
            raise ControlError(f"Failed to listen on {spec}: {exc}") from None
        self.nbd_addresses = [describe_listener(s) for s in socks]
        self._nbd_listeners = [self.server.add_listener(s) for s in socks]
        for address in self.nbd_addresses:
            log.info("NBD server listening on %s", address)

    def nbd_server_stop(self) -> None:
        if not self._nbd_listeners:
            raise ControlError("NBD server not running")
        for stop in self._nbd_listeners:
            stop()
        self._nbd_listeners = []
        self.nbd_addresses = []

    async def close(self) -> None:
        await self.graph.close()
