"""The server side of a backup, over QMP, with QEMU's command names only.

The point-in-time snapshot is QEMU's classic pull-mode recipe (image
fleecing, reference transcript §3.5 method A), which is atomic on
qemu-storage-daemon 7.2 as well as on nbdfleece::

    blockdev-add   qcow2 overlay NAME (scratch file), backing = the export's node
    transaction    block-dirty-bitmap-add NEW          (tracks changes from now on)
                   block-dirty-bitmap-disable OLD      (incremental: freezes what changed)
                   blockdev-backup sync=none NODE -> NAME   (copy-before-write into the overlay)
    block-export-add NAME, read-only, bitmaps [OLD]    (qemu:dirty-bitmap:OLD over NBD)
    ... the agent reads ...
    block-export-del, block-job-cancel, blockdev-del, scratch file removed
    success: block-dirty-bitmap-remove OLD
    failure: transaction merge NEW into OLD, enable OLD, remove NEW  (as if nothing happened)

Names: every node, job and export the agent makes is ``nbdfleece-ID-XXXX`` and
every bitmap ``nbdfleece-ID-pSEQ-XXXX``, where ID is the backup folder's id,
so a later run can find and undo what a killed run left on the server
(:meth:`ServerSide.clean_leftovers`) without touching other folders' bitmaps.
Each backup's bitmap has a unique name recorded in the manifest: a bitmap that
is missing, inconsistent, busy or disabled cannot be mistaken for the one that
belongs to the chain's last backup.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nbdfleece.block.qcow2 import create_qcow2
from nbdfleece.block.workers import run_blocking
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.qmp import Qmp, QmpError
from nbdfleece_backup.store import describe_os_error

EVENT_TIMEOUT = 30.0


@dataclass(frozen=True)
class BitmapState:
    name: str
    recording: bool
    busy: bool
    inconsistent: bool
    persistent: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> BitmapState:
        return cls(str(info.get("name", "")), bool(info.get("recording")), bool(info.get("busy")),
                   bool(info.get("inconsistent", False)), bool(info.get("persistent", False)),
                   int(info.get("granularity", 0)), int(info.get("count", 0)))


@dataclass
class Snapshot:
    """A point-in-time export the agent reads."""

    name: str
    """Node, job and export id, and the NBD export name."""
    node: str
    """The export's node, where the bitmaps live."""
    overlay: Path
    new_bitmap: str
    old_bitmap: str | None
    """Incremental: the frozen bitmap offered as qemu:dirty-bitmap:OLD."""
    persistent: bool
    exported: bool = False


class ServerSide:
    """What the agent does through QMP for one export."""

    def __init__(self, qmp: Qmp, export: str, folder_id: str) -> None:
        self.qmp = qmp
        self.export = export
        self.prefix = f"nbdfleece-{folder_id}-"
        self.node = ""
        self.size = 0

    # -- discovery -------------------------------------------------------------------
    async def find_export(self) -> None:
        """The export's node and size; a clear error when there is no such export."""
        exports = await self.qmp.execute("query-block-exports")
        found = next((e for e in exports if e.get("id") == self.export), None)
        if found is None:
            ids = ", ".join(sorted(str(e.get("id")) for e in exports)) or "none"
            raise BackupError(f"the server has no block export '{self.export}' (exports: {ids})", 2)
        self.node = str(found["node-name"])
        info = await self._node_info(self.node)
        self.size = int(info.get("image", {}).get("virtual-size", 0))
        if self.size <= 0:
            raise BackupError(f"cannot tell the size of node '{self.node}' from query-named-block-nodes")

    async def _nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = await self.qmp.execute("query-named-block-nodes", {"flat": True})
        return nodes

    async def _node_info(self, name: str) -> dict[str, Any]:
        for info in await self._nodes():
            if info.get("node-name") == name:
                return info
        raise BackupError(f"node '{name}' of export '{self.export}' is not in query-named-block-nodes")

    async def bitmaps(self) -> dict[str, BitmapState]:
        info = await self._node_info(self.node)
        states = (BitmapState.from_qmp(b) for b in info.get("dirty-bitmaps", []))
        return {b.name: b for b in states if b.name}

    # -- leftovers of a killed run ------------------------------------------------------
    async def clean_leftovers(self, tracking: str | None, scratch: Path) -> list[str]:
        """Undo what an interrupted run of this folder left on the server.

        ``tracking`` is the bitmap the manifest says tracks changes since the
        last backup.  Other bitmaps of this folder are leftovers: if a killed
        incremental had disabled ``tracking``, they hold what it missed since,
        so they are merged back into it (as a failed backup would have done).
        """
        done: list[str] = []
        for export in await self.qmp.execute("query-block-exports"):
            if str(export.get("id", "")).startswith(self.prefix):
                await self._del_export(export["id"])
                done.append(f"removed export {export['id']}")
        for job in await self.qmp.execute("query-block-jobs"):
            if str(job.get("device", "")).startswith(self.prefix):
                await self._cancel_job(job["device"])
                done.append(f"cancelled job {job['device']}")
        for node in await self._nodes():
            name = str(node.get("node-name", ""))
            if name.startswith(self.prefix):
                await self._del_node(name)
                done.append(f"removed node {name}")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(scratch):
                if entry.name.startswith(self.prefix) and entry.name.endswith(".qcow2"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        bitmaps = await self.bitmaps()
        current = bitmaps.get(tracking) if tracking else None
        others = [b for name, b in bitmaps.items() if name.startswith(self.prefix) and name != tracking]
        if not others:
            return done
        actions: list[dict[str, Any]] = []
        if current is not None and not current.recording and not current.inconsistent and not current.busy:
            usable = [b.name for b in others if not b.inconsistent]
            if usable:
                actions.append(self._action("block-dirty-bitmap-merge", target=current.name, bitmaps=usable))
            actions.append(self._action("block-dirty-bitmap-enable", name=current.name))
            done.append(f"re-enabled bitmap {current.name}"
                        + (f" with the changes recorded in {', '.join(usable)}" if usable else ""))
        actions += [self._action("block-dirty-bitmap-remove", name=b.name) for b in others]
        await self.qmp.execute("transaction", {"actions": actions})
        done += [f"removed bitmap {b.name}" for b in others]
        return done

    def _action(self, kind: str, **data: Any) -> dict[str, Any]:
        return {"type": kind, "data": {"node": self.node, **data}}

    # -- the snapshot ---------------------------------------------------------------------
    def bitmap_name(self, seq: int) -> str:
        return f"{self.prefix}p{seq}-{secrets.token_hex(2)}"

    async def start(self, scratch: Path, seq: int, old_bitmap: str | None) -> Snapshot:
        """Snapshot + bitmap rotation in one transaction, then the read-only export."""
        name = f"{self.prefix}{secrets.token_hex(2)}"
        overlay = scratch / f"{name}.qcow2"
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            await run_blocking(create_qcow2, overlay, self.size)
        except OSError as exc:
            what = f"cannot create the scratch overlay {overlay}"
            raise BackupError(describe_os_error(exc, what)) from None
        snap = Snapshot(name, self.node, overlay, self.bitmap_name(seq), old_bitmap, persistent=True)
        try:
            await self.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": self.node,
                "file": {"driver": "file", "filename": str(overlay.absolute())},
            })
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(overlay)
            raise
        try:
            await self._transaction(snap)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._del_node(name)
                with contextlib.suppress(OSError):
                    os.unlink(overlay)
            raise
        try:
            await self.qmp.execute("block-export-add", {
                "type": "nbd", "id": name, "node-name": name, "name": name, "writable": False,
                "bitmaps": [old_bitmap] if old_bitmap else [],
            })
            snap.exported = True
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.finish(snap, success=False)
            raise
        return snap

    async def _transaction(self, snap: Snapshot) -> None:
        def actions() -> list[dict[str, Any]]:
            add: dict[str, Any] = {"name": snap.new_bitmap}
            if snap.persistent:
                add["persistent"] = True
            out = [self._action("block-dirty-bitmap-add", **add)]
            if snap.old_bitmap:
                out.append(self._action("block-dirty-bitmap-disable", name=snap.old_bitmap))
            out.append({"type": "blockdev-backup", "data": {
                "job-id": snap.name, "device": self.node, "target": snap.name, "sync": "none"}})
            return out

        try:
            await self.qmp.execute("transaction", {"actions": actions()})
        except QmpError as exc:
            if "persistent" not in exc.desc:
                raise
            # Raw images cannot hold persistent bitmaps in QEMU: a transient one
            # works until the server restarts (then the next backup is a full one).
            snap.persistent = False
            await self.qmp.execute("transaction", {"actions": actions()})

    async def finish(self, snap: Snapshot, *, success: bool) -> None:
        """Tear the snapshot down; settle the bitmaps (see the module docstring)."""
        if snap.exported:
            await self._del_export(snap.name)
            snap.exported = False
        await self._cancel_job(snap.name)
        await self._del_node(snap.name)
        with contextlib.suppress(OSError):
            os.unlink(snap.overlay)
        if success:
            return
        actions = []
        if snap.old_bitmap:
            actions += [
                self._action("block-dirty-bitmap-merge", target=snap.old_bitmap, bitmaps=[snap.new_bitmap]),
                self._action("block-dirty-bitmap-enable", name=snap.old_bitmap),
            ]
        actions.append(self._action("block-dirty-bitmap-remove", name=snap.new_bitmap))
        await self.qmp.execute("transaction", {"actions": actions})

    async def remove_bitmaps(self, keep: str) -> list[str]:
        """After a committed backup: every other bitmap of this folder goes."""
        removed = []
        for name in await self.bitmaps():
            if name.startswith(self.prefix) and name != keep:
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": self.node, "name": name})
                removed.append(name)
        return removed

    async def remove_bitmap(self, name: str) -> None:
        await self.qmp.execute("block-dirty-bitmap-remove", {"node": self.node, "name": name})

    # -- teardown steps (each tolerates "already gone") -----------------------------------
    async def _del_export(self, export_id: str) -> None:
        """``block-export-del``; QEMU finishes it asynchronously (BLOCK_EXPORT_DELETED)."""
        mode = "safe"
        for _ in range(50):
            try:
                await self.qmp.execute("block-export-del", {"id": export_id, "mode": mode})
                break
            except QmpError as exc:
                if "not found" in exc.desc or "No export" in exc.desc:
                    return
                if "in use" not in exc.desc:
                    raise
                await trio.sleep(0.05)  # our NBD connections are still closing
        else:
            await self.qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
        await self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == export_id,
                                  EVENT_TIMEOUT)

    async def _cancel_job(self, job_id: str) -> None:
        try:
            await self.qmp.execute("block-job-cancel", {"device": job_id})
        except QmpError as exc:
            if exc.error_class == "DeviceNotActive" or "not found" in exc.desc:
                return
            raise
        await self.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == job_id,
                                  EVENT_TIMEOUT)
        with trio.move_on_after(EVENT_TIMEOUT):
            while any(j.get("device") == job_id for j in await self.qmp.execute("query-block-jobs")):
                await trio.sleep(0.02)

    async def _del_node(self, name: str) -> None:
        for _ in range(100):
            try:
                await self.qmp.execute("blockdev-del", {"node-name": name})
                return
            except QmpError as exc:
                if "Failed to find node" in exc.desc or "Cannot find" in exc.desc:
                    return
                if "in use" not in exc.desc and "busy" not in exc.desc:
                    raise
                await trio.sleep(0.05)
        await self.qmp.execute("blockdev-del", {"node-name": name})
