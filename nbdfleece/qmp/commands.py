"""The QMP commands: a table name -> (argument schema, handler).

Every command is declared with its QAPI argument schema (see ``schema.py``)
and an ``async`` handler ``(daemon, args) -> result``; :func:`execute` checks
the arguments against the schema before the handler runs, so handlers only
see well-typed input and only implement the command's own rules::

    @command("blockdev-del", {"node-name": STR})
    async def blockdev_del(daemon: Daemon, args: Args) -> None: ...

Bitmap operations are also *transaction actions*: an action applies at once
and returns its undo, and ``transaction`` runs the actions in order, undoing
the applied ones in reverse when one fails (all or nothing, as QEMU).  Each
bitmap command is its action run on its own.  :data:`ACTIONS` is open:
registering another action (``@action("blockdev-backup", {...})``) makes it
valid in ``transaction`` too.

Names, argument shapes and error texts are QEMU 7.2's.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbdfleece import __version__
from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.faults import (
    BLKDEBUG_EVENTS,
    OPS,
    FaultSpecError,
    blkdebug_spec,
    spec_from_options,
)
from nbdfleece.block.nbd import NbdNode
from nbdfleece.client import NbdAddress, NbdConnectionError
from nbdfleece.daemon import BackupJob, Daemon, JobTxn, check_speed
from nbdfleece.errors import ConfigError
from nbdfleece.graph import ControlError, GraphNode, Undo, id_wellformed
from nbdfleece.qmp.protocol import CAPABILITIES_ARGS, version_info
from nbdfleece.qmp.schema import (
    BOOL,
    INT,
    NUMBER,
    STR,
    UINT32,
    UINT64,
    Alternate,
    Enum,
    List,
    QmpError,
    Struct,
    Type,
    Union,
    Where,
    check_arguments,
)
from nbdfleece.tls import TlsCredsObject, TlsMode, TlsPolicy, load_creds_object

log = logging.getLogger(__name__)

Args = dict[str, Any]
Handler = Callable[[Daemon, Args], Awaitable[Any]]
Apply = Callable[[Daemon, Args], Undo]

PACKAGE = f"nbdfleece {__version__}"
MAX_NODE_NAME = 31
"""QEMU keeps node names in a 32-byte buffer."""
MAX_DESCRIPTION = 4096


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arguments: Type
    """A :class:`Struct`, or a :class:`Union` for commands whose arguments are one."""
    handler: Handler


@dataclass(frozen=True, slots=True)
class Action:
    """A transaction action: applies at once and returns its undo."""

    name: str
    data: Struct
    apply: Apply
    grouped: bool = False
    """Whether it supports ``completion-mode: grouped`` (only job-starting actions do)."""


COMMANDS: dict[str, Command] = {}
ACTIONS: dict[str, Action] = {}


def command(name: str, members: Mapping[str, Type] | Type | None = None
            ) -> Callable[[Handler], Handler]:
    """Register ``handler`` as QMP command ``name`` with these argument members."""
    schema = members if isinstance(members, Type) else Struct(name, members)

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, schema, handler)
        return handler

    return register


def action(name: str, members: Mapping[str, Type], *, command: bool = True,
           grouped: bool = False) -> Callable[[Apply], Apply]:
    """Register a transaction action, by default also a command of the same name."""
    data = Struct(name, members)

    def register(apply: Apply) -> Apply:
        ACTIONS[name] = Action(name, data, apply, grouped)
        if not command:
            return apply

        async def run_alone(daemon: Daemon, args: Args) -> None:
            commit(apply(daemon, args))

        COMMANDS[name] = Command(name, data, run_alone)
        return apply

    return register


async def execute(daemon: Daemon, name: str, arguments: Args) -> Any:
    """Run command ``name``; raises :class:`QmpError` with QEMU's error."""
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")
    args = check_arguments(cmd.arguments, arguments)
    try:
        result = await cmd.handler(daemon, args)
    except ControlError as exc:
        raise QmpError(exc.desc, exc.error_class) from None
    await daemon.journal.sync()  # what the command started is journaled before it replies
    return result


# -- monitor --------------------------------------------------------------------------


@command("qmp_capabilities", CAPABILITIES_ARGS)
async def qmp_capabilities(daemon: Daemon, args: Args) -> None:
    # In negotiation mode the session handles it; here negotiation is over.
    raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")


@command("query-version")
async def query_version(daemon: Daemon, args: Args) -> Any:
    return version_info(PACKAGE)


@command("query-commands")
async def query_commands(daemon: Daemon, args: Args) -> Any:
    return [{"name": name} for name in COMMANDS]


# -- dirty bitmaps (commands and transaction actions) -------------------------------------

BLOCK_DIRTY_BITMAP: dict[str, Type] = {"node": STR, "name": STR}
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", string=STR,
                          obj=Struct("BlockDirtyBitmap", BLOCK_DIRTY_BITMAP))


@action("block-dirty-bitmap-add", {
    "node": STR, "name": STR, "*granularity": UINT32, "*persistent": BOOL, "*disabled": BOOL,
})
def bitmap_add(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_add(
        args["node"], args["name"], granularity=args.get("granularity"),
        persistent=args.get("persistent", False), disabled=args.get("disabled", False),
    )


@action("block-dirty-bitmap-remove", BLOCK_DIRTY_BITMAP)
def bitmap_remove(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_remove(args["node"], args["name"])


@action("block-dirty-bitmap-clear", BLOCK_DIRTY_BITMAP)
def bitmap_clear(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_clear(args["node"], args["name"])


@action("block-dirty-bitmap-enable", BLOCK_DIRTY_BITMAP)
def bitmap_enable(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_enable(args["node"], args["name"], True)


@action("block-dirty-bitmap-disable", BLOCK_DIRTY_BITMAP)
def bitmap_disable(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_enable(args["node"], args["name"], False)


@action("block-dirty-bitmap-merge", {"node": STR, "target": STR, "bitmaps": List(BITMAP_OR_STR)})
def bitmap_merge(daemon: Daemon, args: Args) -> Undo:
    return daemon.graph.bitmap_merge(args["node"], args["target"], args["bitmaps"])


@action("abort", {}, command=False)
def abort(daemon: Daemon, args: Args) -> Undo:
    raise QmpError("Transaction aborted using Abort action")


@command("x-debug-block-dirty-bitmap-sha256", BLOCK_DIRTY_BITMAP)
async def bitmap_sha256(daemon: Daemon, args: Args) -> Any:
    return {"sha256": bitmap_digest(daemon.graph.bitmap(args["node"], args["name"]).to_bytes())}


def bitmap_digest(packed: bytes) -> str:
    """SHA-256 as QEMU computes it: over the bits in 64-bit words (zero padded)."""
    return hashlib.sha256(packed + bytes(-len(packed) % 8)).hexdigest()


# -- transaction ----------------------------------------------------------------------

TRANSACTION_ACTION = Union(
    "TransactionAction", "type",
    branches={},  # filled from ACTIONS below, so later registrations count too
)


class _ActionBranches(Mapping[str, Struct]):
    """``{type: {"data": <action's data>}}``, a live view of :data:`ACTIONS`."""

    def __getitem__(self, key: str) -> Struct:
        return Struct(f"{key}-wrapper", {"data": ACTIONS[key].data})

    def __iter__(self) -> Any:
        return iter(ACTIONS)

    def __len__(self) -> int:
        return len(ACTIONS)


TRANSACTION_ACTION.branches = _ActionBranches()


@command("transaction", {
    "actions": List(TRANSACTION_ACTION),
    "*properties": Struct("TransactionProperties", {
        "*completion-mode": Enum("ActionCompletionMode", ("individual", "grouped")),
    }),
})
async def transaction(daemon: Daemon, args: Args) -> None:
    run_transaction(daemon, args["actions"], args.get("properties", {}).get("completion-mode", "individual"))


def run_transaction(daemon: Daemon, actions: list[Args], completion_mode: str = "individual") -> None:
    """Apply ``actions`` all or nothing: on the first failure undo the applied ones.
    With ``completion_mode`` grouped the jobs it starts form one group (``JobTxn``)."""
    undos: list[Undo] = []
    daemon.grouping = JobTxn() if completion_mode == "grouped" else None
    try:
        for item in actions:
            spec = ACTIONS[item["type"]]
            if completion_mode != "individual" and not spec.grouped and spec.name != "abort":
                raise QmpError(
                    f"Action '{spec.name}' does not support Transaction property "
                    f"completion-mode = {completion_mode}"
                )
            undos.append(spec.apply(daemon, item["data"]))
    except BaseException:
        for undo in reversed(undos):
            try:
                undo()
            except Exception:  # keep undoing the rest; the original error is what we report
                log.exception("transaction: an undo failed")
        raise
    finally:
        daemon.grouping = None
    for undo in undos:
        commit(undo)


class Staged:
    """An action's undo that also has a commit step, run once every action of
    the transaction has applied (QEMU's ``.commit``: ``blockdev-backup`` starts
    its job there, so an aborted transaction never runs it)."""

    def __init__(self, undo: Undo, on_commit: Callable[[], None]) -> None:
        self.undo = undo
        self.on_commit = on_commit

    def __call__(self) -> None:
        self.undo()


def commit(undo: Undo) -> None:
    """The commit step of an applied action, if it has one."""
    if isinstance(undo, Staged):
        undo.on_commit()


# -- block nodes ----------------------------------------------------------------------

BLOCKDEV_OPTIONS = Union(
    "BlockdevOptions", "driver",
    base={"*node-name": STR, "*read-only": BOOL,
          # Only snapshot-access acts on it (TRIM as snapshot discard); see protocol/qmp.md.
          "*discard": Enum("BlockdevDiscardOptions", ("ignore", "unmap"))},
)
BLOCKDEV_REF = Alternate("BlockdevRef", string=STR, obj=BLOCKDEV_OPTIONS)
BLOCKDEV_OPTIONS.branches = {
    "file": Struct("BlockdevOptionsFile", {"filename": STR}),
    "raw": Struct("BlockdevOptionsRaw", {"file": BLOCKDEV_REF}),
    # backing: a node name; absent = the backing file named in the image header.
    "qcow2": Struct("BlockdevOptionsQcow2", {"file": BLOCKDEV_REF, "*backing": STR}),
    "copy-before-write": Struct("BlockdevOptionsCbw", {
        "file": BLOCKDEV_REF, "target": BLOCKDEV_REF, "*bitmap": Struct("BlockDirtyBitmap", {
            "node": STR, "name": STR}),
        "*on-cbw-error": Enum("OnCbwError", ("break-guest-write", "break-snapshot")),
        "*cbw-timeout": UINT32,
    }),
    "snapshot-access": Struct("BlockdevOptionsSnapshotAccess", {"file": BLOCKDEV_REF}),
    # Fault injection (block/faults.py): QEMU's blkdebug as far as it fits, and our own rules.
    "blkdebug": Struct("BlockdevOptionsBlkdebug", {
        "image": BLOCKDEV_REF,
        "*inject-error": List(Struct("BlkdebugInjectErrorOptions", {
            "event": Enum("BlkdebugEvent", BLKDEBUG_EVENTS), "*state": INT,
            "*iotype": Enum("BlkdebugIOType", OPS), "*errno": INT, "*sector": INT,
            "*once": BOOL, "*immediately": BOOL,
        })),
    }),
    "x-nbdfleece-fault": Struct("BlockdevOptionsNbdfleeceFault", {
        "image": BLOCKDEV_REF,
        "rules": List(Struct("NbdfleeceFaultRule", {
            "ops": List(Enum("NbdfleeceFaultOp", (*OPS, "all"))), "*errno": STR,
            "*probability": NUMBER,
            "*ranges": List(Struct("NbdfleeceFaultRange", {"offset": UINT64, "length": UINT64})),
            "*after": UINT64, "*once": BOOL, "*count": UINT64, "*delay": NUMBER,
            "*partial": BOOL, "*seed": INT,
        })),
    }),
}
FAULT_DRIVERS = ("blkdebug", "x-nbdfleece-fault")
_generated_names = itertools.count(1)


def _generate_node_name(daemon: Daemon) -> str:
    while True:
        name = f"#block{next(_generated_names):03d}"  # '#' is not allowed in user names
        if name not in daemon.graph.nodes:
            return name


def _check_node_name(daemon: Daemon, name: str) -> None:
    if not id_wellformed(name):
        raise QmpError(f"Invalid node-name: '{name}'")
    if name in daemon.graph.nodes:
        raise QmpError(f"Duplicate nodes with node-name='{name}'")
    if len(name) > MAX_NODE_NAME:
        raise QmpError("Node name too long")


def _open_node(daemon: Daemon, options: Args, created: list[GraphNode], *,
               implicit: bool, inherited_read_only: bool = False) -> GraphNode:
    """Create the node (and any inline child) described by ``BlockdevOptions``."""
    graph = daemon.graph
    name = options.get("node-name")
    if name is None:
        name = _generate_node_name(daemon)
    else:
        _check_node_name(daemon, name)
    read_only = options.get("read-only", inherited_read_only)
    if options["driver"] in FAULT_DRIVERS:
        node = _open_fault_node(daemon, name, options, created, read_only)
    elif options["driver"] == "nbd":  # connected beforehand by _connect_nbd_nodes
        node = graph.add_nbd(name, _CONNECTED_NBD[id(options)], read_only=read_only)
        del _CONNECTED_NBD[id(options)]  # the graph owns it now (blockdev-del closes it)
    elif options["driver"] == "file":
        node = graph.add_file(name, options["filename"], read_only=read_only)
    else:
        ref = options["file"]
        if isinstance(ref, str):
            child = graph.node(ref)
        else:
            child = _open_node(daemon, ref, created, implicit=True, inherited_read_only=read_only)
        if not read_only and child.top.read_only:
            raise QmpError("Block node is read-only")
        if options["driver"] == "qcow2":
            backing = graph.node(options["backing"]) if "backing" in options else None
            node = graph.add_qcow2(name, child, backing, read_only=read_only)
        elif options["driver"] == "copy-before-write":
            ref = options["target"]
            target = (graph.node(ref) if isinstance(ref, str)
                      else _open_node(daemon, ref, created, implicit=True))
            node = daemon.add_cbw_node(name, child, target,
                                       on_cbw_error=options.get("on-cbw-error", "break-guest-write"),
                                       bitmap=_cbw_bitmap(daemon, options.get("bitmap")),
                                       cbw_timeout=options.get("cbw-timeout", 0))
        elif options["driver"] == "snapshot-access":
            node = daemon.add_snapshot_access(name, child, discard=options.get("discard") == "unmap")
        else:
            node = graph.add_raw(name, child, read_only=read_only)
    node.implicit = implicit
    created.append(node)
    return node


def _open_fault_node(daemon: Daemon, name: str, options: Args, created: list[GraphNode],
                     read_only: bool) -> GraphNode:
    """``blkdebug`` / ``x-nbdfleece-fault``: a fault filter over ``image``."""
    try:
        if options["driver"] == "blkdebug":
            specs = [blkdebug_spec(rule) for rule in options.get("inject-error", [])]
        else:
            specs = [spec_from_options(_fault_rule_options(rule)) for rule in options["rules"]]
    except FaultSpecError as exc:
        raise QmpError(f"{options['driver']}: {exc}") from None
    ref = options["image"]
    image = (daemon.graph.node(ref) if isinstance(ref, str)
             else _open_node(daemon, ref, created, implicit=True, inherited_read_only=read_only))
    if not read_only and image.top.read_only:
        raise QmpError("Block node is read-only")
    return daemon.graph.add_fault(name, image, specs, driver=options["driver"], read_only=read_only)


def _fault_rule_options(rule: Args) -> Args:
    """A checked ``NbdfleeceFaultRule`` in ``spec_from_options`` form (ranges as pairs)."""
    out = dict(rule)
    out["ranges"] = [(r["offset"], r["offset"] + r["length"]) for r in rule.get("ranges", [])]
    return out


def _cbw_bitmap(daemon: Daemon, ref: Args | None) -> DirtyBitmap | None:
    """copy-before-write's ``bitmap``, looked up as QEMU's block_dirty_bitmap_lookup does."""
    if ref is None:
        return None
    owner = daemon.graph.nodes.get(ref["node"])
    if owner is None:
        raise QmpError(f"Node '{ref['node']}' not found")
    bitmap = owner.bitmaps.get(ref["name"])
    if bitmap is None:
        raise QmpError(f"Dirty bitmap '{ref['name']}' not found")
    return bitmap


@command("blockdev-add", BLOCKDEV_OPTIONS)
async def blockdev_add(daemon: Daemon, args: Args) -> None:
    if "node-name" not in args:
        raise QmpError("'node-name' must be specified for the root node")
    created: list[GraphNode] = []
    connected = await _connect_nbd_nodes(daemon, args)
    try:
        _open_node(daemon, args, created, implicit=False)
    except BaseException:
        for node in reversed(created):
            await daemon.graph.remove(node.name)
        raise
    finally:
        for key in connected:  # connected, but the graph did not take them
            leftover = _CONNECTED_NBD.pop(key, None)
            if leftover is not None:
                await leftover.close()
    log.info("blockdev-add: node '%s' (%s)", args["node-name"], args["driver"])


@command("blockdev-del", {"node-name": STR})
async def blockdev_del(daemon: Daemon, args: Args) -> None:
    name = args["node-name"]
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise QmpError(f"Failed to find node with node-name='{name}'")
    if any(job.target is node and job.status != "concluded" for job in daemon.jobs.values()):
        raise QmpError(f"Node '{name}' is busy: block device is in use by block job: backup")
    if any(record.node is node for record in daemon.exports.values()):
        raise QmpError(f"Node {name} is in use")
    if node.implicit:
        raise QmpError(f"Node {name} is not owned by the monitor")
    if node.users:
        raise QmpError(f"Block device {name} is in use")
    await _delete_node(daemon, node)
    log.info("blockdev-del: node '%s'", name)


async def _delete_node(daemon: Daemon, node: GraphNode) -> None:
    """Delete ``node`` and the implicit children it was the last user of."""
    await daemon.graph.remove(node.name)
    for child in node.children:
        if child.implicit and not child.users and daemon.graph.nodes.get(child.name) is child:
            await _delete_node(daemon, child)


@command("query-named-block-nodes", {"*flat": BOOL})
async def query_named_block_nodes(daemon: Daemon, args: Args) -> Any:
    return [block_device_info(daemon, node) for node in daemon.graph]


def block_device_info(daemon: Daemon, node: GraphNode) -> dict[str, Any]:
    """QEMU's ``BlockDeviceInfo`` for one node (the fields that mean something here)."""
    image = node.image()
    filename = image.path if image is not None else ""
    if isinstance(node.format_node, NbdNode):  # QEMU shows the server's NBD URI
        filename = node.format_node.describe()
    snapshot = next((sn for sn in daemon.snapshots.values() if sn.node is node), None)
    if snapshot is not None:
        filename = snapshot.overlay  # the overlay that holds the copied clusters
    size = node.top.size
    info: dict[str, Any] = {
        "node-name": node.name,
        "drv": node.driver,
        "file": filename,
        "ro": node.top.read_only,
        "encrypted": False,
        "detect_zeroes": "off",
        "backing_file_depth": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": True, "direct": False, "no-flush": False},
        "image": {"filename": filename, "format": node.driver, "virtual-size": size},
    }
    if filename:  # QEMU's ImageInfo actual-size: bytes allocated on the host
        with contextlib.suppress(OSError):
            info["image"]["actual-size"] = os.stat(filename).st_blocks * 512
    # QEMU lists the newest bitmap first and leaves the member out when there is none.
    bitmaps = list(reversed(daemon.graph.bitmap_info(node)))
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


# -- exports --------------------------------------------------------------------------

BLOCK_EXPORT_OPTIONS = Union(
    "BlockExportOptions", "type",
    base={"id": STR, "node-name": STR, "*writable": BOOL},
    branches={"nbd": Struct("BlockExportOptionsNbd", {
        "*name": STR, "*description": STR, "*bitmaps": List(BITMAP_OR_STR), "*allocation-depth": BOOL,
    })},
)


@command("block-export-add", BLOCK_EXPORT_OPTIONS)
async def block_export_add(daemon: Daemon, args: Args) -> None:
    export_id: str = args["id"]
    node_name: str = args["node-name"]
    if not id_wellformed(export_id):
        raise QmpError("Invalid block export id")
    if export_id in daemon.exports:
        raise QmpError(f"Block export id '{export_id}' is already in use")
    node = daemon.graph.nodes.get(node_name)
    if node is None:
        raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
    writable = args.get("writable", False)
    if writable and node.top.read_only:
        raise QmpError("Cannot export read-only node as writable")
    name: str = args.get("name", node_name)
    description: str = args.get("description", "")
    if len(name.encode()) > MAX_DESCRIPTION:
        raise QmpError(f"export name '{name}' too long")
    if len(description.encode()) > MAX_DESCRIPTION:
        raise QmpError(f"description '{description}' too long")
    if daemon.registry.get(name) is not None:  # before the bitmaps, as in QEMU
        raise QmpError(f"NBD server already has export named '{name}'")
    for ref in args.get("bitmaps", []):
        _check_export_bitmap(daemon, node, ref, writable=writable)
    daemon.add_export(
        export_id, node_name, name=name, description=description, writable=writable,
        bitmaps=args.get("bitmaps", []), allocation_depth=args.get("allocation-depth", False),
    )


def _check_export_bitmap(daemon: Daemon, node: GraphNode, ref: str | dict[str, str], *,
                         writable: bool) -> None:
    """QEMU 7.2's checks of one ``bitmaps`` entry of an NBD export, in its order."""
    if isinstance(ref, str):
        bitmap = daemon.find_bitmap(node, ref)
        if bitmap is None:
            raise QmpError(f"Bitmap '{ref}' is not found")
        if not writable and not node.top.read_only and bitmap.recording:
            raise QmpError(f"Enabled bitmap '{ref}' incompatible with readonly export")
    else:
        bitmap = daemon.graph.bitmap(ref["node"], ref["name"])
    if bitmap.busy:
        raise QmpError(
            f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used"
        )
    if bitmap.inconsistent:
        raise QmpError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


@command("block-export-del", {"id": STR, "*mode": Enum("BlockExportRemoveMode", ("safe", "hard"))})
async def block_export_del(daemon: Daemon, args: Args) -> None:
    daemon.remove_export(args["id"])  # emits BLOCK_EXPORT_DELETED


@command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: Args) -> Any:
    return [
        {"id": record.id, "type": "nbd", "node-name": record.node.name, "shutting-down": False}
        for record in daemon.exports.values()
    ]


# -- NBD server -------------------------------------------------------------------------

INET = Struct("InetSocketAddress", {"host": STR, "port": STR})
UNIX = Struct("UnixSocketAddress", {"path": STR})
SOCKET_ADDRESS_LEGACY = Union("SocketAddressLegacy", "type", branches={
    "inet": Struct("InetSocketAddressWrapper", {"data": INET}),
    "unix": Struct("UnixSocketAddressWrapper", {"data": UNIX}),
})
SOCKET_ADDRESS = Union("SocketAddress", "type", branches={"inet": INET, "unix": UNIX})


# -- blockdev-add driver=nbd: a node on a remote NBD server (block/nbd.py) ----------------

BLOCKDEV_OPTIONS.branches = {**BLOCKDEV_OPTIONS.branches, "nbd": Struct("BlockdevOptionsNbd", {
    "server": SOCKET_ADDRESS, "*export": STR, "*tls-creds": STR, "*tls-hostname": STR,
    "*x-dirty-bitmap": STR, "*reconnect-delay": UINT32, "*open-timeout": UINT32,
})}
_CONNECTED_NBD: dict[int, NbdNode] = {}
"""nbd nodes connected for a ``blockdev-add`` in progress, by ``id()`` of their options."""


def _nbd_address(options: Args) -> NbdAddress:
    """QEMU's ``BlockdevOptionsNbd`` as a client address; refuses what is not supported."""
    for option, why in (("tls-creds", "TLS for nbd nodes is not supported yet"),
                        ("tls-hostname", "TLS for nbd nodes is not supported yet"),
                        ("x-dirty-bitmap", "not supported (read bitmaps with block status instead)")):
        if option in options:
            raise QmpError(f"nbd: '{option}': {why}")
    if options.get("reconnect-delay", 0):
        raise QmpError("nbd: 'reconnect-delay': not supported (a lost connection is not re-made)")
    server = options["server"]
    export = options.get("export", "")
    if server["type"] == "unix":
        return NbdAddress(False, None, 0, server["path"], export)
    host, port = server["host"], server["port"]
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number < 65536:
        raise QmpError(f"Address resolution failed for {host}:{port}: Servname not supported for ai_socktype")
    return NbdAddress(False, host, number, None, export)


async def _connect_nbd_nodes(daemon: Daemon, options: Args) -> list[int]:
    """Connect every ``nbd`` node of a ``BlockdevOptions`` tree (inline children
    included) before ``_open_node``, which does not await, adds them."""
    keys: list[int] = []
    try:
        for value in (options, *options.values()):
            if value is options:
                if options.get("driver") != "nbd":
                    continue
                address = _nbd_address(options)
                timeout = float(options.get("open-timeout", 0)) or 30.0
                try:
                    # No nursery: the connection's holder task must outlive the daemon's
                    # nurseries, since the graph closes its nodes after they have ended.
                    remote = await NbdNode.connect(options.get("node-name", ""), address,
                                                   connect_timeout=timeout)
                except NbdConnectionError as exc:
                    raise QmpError(f"Failed to connect to {address.describe()}: "
                                   f"{exc.strerror or exc}") from None
                _CONNECTED_NBD[id(options)] = remote
                keys.append(id(options))
            elif isinstance(value, dict) and "driver" in value:
                keys += await _connect_nbd_nodes(daemon, value)
    except BaseException:
        for key in keys:
            leftover = _CONNECTED_NBD.pop(key, None)
            if leftover is not None:
                await leftover.close()
        raise
    return keys


class NbdServerAddress(Type):
    """``SocketAddressLegacy`` (``{type, data: {...}}``) or the flat ``SocketAddress``."""

    def check(self, value: Any, where: Where) -> Any:
        if isinstance(value, dict) and "data" in value:
            legacy = SOCKET_ADDRESS_LEGACY.check(value, where)
            return {"type": legacy["type"], **legacy["data"]}
        return SOCKET_ADDRESS.check(value, where)


def listen_spec(addr: Args) -> str:
    """The daemon's listener spec (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``)."""
    if addr["type"] == "unix":
        return f"unix:{addr['path']}"
    host = addr["host"]
    return f"[{host}]:{addr['port']}" if ":" in host else f"{host}:{addr['port']}"


@command("nbd-server-start", {
    "addr": NbdServerAddress(), "*tls-creds": STR, "*tls-authz": STR, "*max-connections": UINT32,
})
async def nbd_server_start(daemon: Daemon, args: Args) -> None:
    tls = None
    if "tls-creds" in args:
        creds = daemon.objects.get(args["tls-creds"])
        if not isinstance(creds, TlsCredsObject):
            raise QmpError(f"No TLS credentials with id '{args['tls-creds']}'")
        if creds.server is None:
            raise QmpError("Expected TLS credentials for a server endpoint")
        # As QEMU: tls-creds means FORCEDTLS; the exports' tls-allow lists still apply.
        base = daemon.server.tls.policy if daemon.server.tls is not None else TlsPolicy()
        if base.allow and not creds.server.verify_peer:
            raise QmpError(f"TLS credentials '{creds.id}' do not verify client certificates "
                           "(verify-peer), but exports have tls-allow lists")
        tls = creds.server.with_policy(base.with_mode(TlsMode.REQUIRED))
    if "tls-authz" in args:
        raise QmpError("tls-authz is not supported without tls-creds" if tls is None else
                       "tls-authz is not supported: authorise clients with the exports' tls-allow")
    if "max-connections" in args:
        log.warning("nbd-server-start: max-connections=%d is not enforced", args["max-connections"])
    daemon.nbd_server_start([listen_spec(args["addr"])], tls=tls)


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: Args) -> None:
    daemon.nbd_server_stop()


# -- user-creatable objects: TLS credentials ---------------------------------------------

_TLS_CREDS_COMMON = {
    "*verify-peer": BOOL, "*dir": STR, "*endpoint": Enum("QCryptoTLSCredsEndpoint", ("client", "server")),
    "*priority": STR,
}
OBJECT_OPTIONS = Union("ObjectOptions", "qom-type", base={"id": STR}, branches={
    "tls-creds-psk": Struct("TlsCredsPskProperties", {**_TLS_CREDS_COMMON, "*username": STR}),
    "tls-creds-x509": Struct("TlsCredsX509Properties", {
        **_TLS_CREDS_COMMON, "*sanity-check": BOOL, "*passwordid": STR,
    }),
})


@command("object-add", OBJECT_OPTIONS)
async def object_add(daemon: Daemon, args: Args) -> None:
    """``tls-creds-x509`` / ``tls-creds-psk`` as QEMU: ``dir`` in the QEMU/libnbd layout."""
    object_id = args["id"]
    if not id_wellformed(object_id):
        raise QmpError("Parameter 'id' expects an identifier")
    for unsupported in ("priority", "passwordid", "username"):
        if unsupported in args:
            raise QmpError(f"{args['qom-type']}: '{unsupported}' is not supported by nbdfleece")
    if "dir" not in args:
        raise QmpError("Missing 'dir' property value")
    try:
        creds = load_creds_object(object_id, args["qom-type"], args["dir"],
                                  args.get("endpoint", "client"), args.get("verify-peer", True))
    except ConfigError as exc:
        raise QmpError(str(exc)) from None
    if object_id in daemon.objects:  # QEMU checks this last, once the object is complete
        raise QmpError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
    daemon.objects[object_id] = creds


@command("object-del", {"id": STR})
async def object_del(daemon: Daemon, args: Args) -> None:
    # As QEMU, a running NBD server keeps credentials that are deleted under it.
    if daemon.objects.pop(args["id"], None) is None:
        raise QmpError(f"object '{args['id']}' not found")


# -- point-in-time snapshots (nbdfleece extension) --------------------------------------

CBW_ERROR = Enum("OnCbwError", ("break-guest-write", "break-snapshot"))


@command("x-nbdfleece-snapshot-create", {
    "name": STR, "export": STR, "*bitmap": STR, "*on-cbw-error": CBW_ERROR,
})
async def snapshot_create(daemon: Daemon, args: Args) -> Any:
    """Snapshot + bitmap rotation in one step (see ``Daemon.create_snapshot``)."""
    snapshot = daemon.create_snapshot(
        args["name"], args["export"], bitmap=args.get("bitmap"),
        on_cbw_error=args.get("on-cbw-error", "break-guest-write"),
    )
    return {"name": snapshot.name, "overlay": snapshot.overlay}


@command("x-nbdfleece-snapshot-delete", {"name": STR})
async def snapshot_delete(daemon: Daemon, args: Args) -> None:
    await daemon.delete_snapshot(args["name"])


@command("x-nbdfleece-query-snapshots")
async def query_snapshots(daemon: Daemon, args: Args) -> Any:
    return [
        {
            "name": s.name,
            "export": s.of_export,
            "overlay": s.overlay,
            "copied-bytes": s.cbw.copied_bytes,
            "broken": s.cbw.broken is not None,
        }
        for s in daemon.snapshots.values()
    ]


# -- backup jobs ----------------------------------------------------------------------------

SYNC_MODE = Enum("MirrorSyncMode", ("top", "full", "none", "incremental", "bitmap"))
BITMAP_SYNC_MODE = Enum("BitmapSyncMode", ("on-success", "never", "always"))
ERROR_ACTION = Enum("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto"))


def _check_backup_options(daemon: Daemon, args: Args) -> None:
    """QEMU 7.2's checks of ``blockdev-backup``'s options, in its order (do_backup_common)."""
    device = daemon.graph.node(args["device"])
    daemon.graph.node(args["target"])
    sync = args["sync"]
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise QmpError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode not in (None, "on-success"):
            raise QmpError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    if "bitmap" in args:
        bitmap = device.bitmaps.get(args["bitmap"])
        if bitmap is None:
            raise QmpError(f"Bitmap '{args['bitmap']}' could not be found")
        if mode is None:
            raise QmpError("Bitmap sync mode must be given when providing a bitmap")
        daemon.graph._usable(bitmap, modify=True)
        if sync == "none":
            raise QmpError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise QmpError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                           f"with sync mode '{sync}'")
    elif mode is not None:
        raise QmpError("Cannot specify bitmap sync mode without a bitmap")


@action("blockdev-backup", grouped=True, members={
    "*job-id": STR, "device": STR, "target": STR, "sync": SYNC_MODE, "*speed": INT,
    "*bitmap": STR, "*bitmap-mode": BITMAP_SYNC_MODE, "*compress": BOOL,
    "*on-source-error": ERROR_ACTION, "*on-target-error": ERROR_ACTION,
    "*auto-finalize": BOOL, "*auto-dismiss": BOOL, "*filter-node-name": STR,
})
def blockdev_backup(daemon: Daemon, args: Args) -> Undo:
    """``sync: none`` is image fleecing: copy-before-write into ``target`` until cancelled;
    the other modes are push backups, run by a background task (``Daemon.start_push_backup``)."""
    _check_backup_options(daemon, args)
    job_id: str = args.get("job-id", "")  # checked with the nodes (Daemon._job_nodes)
    manual = {"auto_finalize": args.get("auto-finalize", True),
              "auto_dismiss": args.get("auto-dismiss", True)}
    speed = check_speed(args.get("speed", 0))  # before the job exists
    sync = args["sync"]
    if sync == "none":
        job = daemon.start_fleecing(job_id, args["device"], args["target"], **manual)
    else:
        job = daemon.start_push_backup(job_id, args["device"], args["target"], sync,
                                       bitmap=args.get("bitmap"), bitmap_mode=args.get("bitmap-mode"),
                                       **manual)

    daemon.set_job_speed(job, speed)
    if daemon.grouping is not None:
        job.txn = daemon.grouping
        job.txn.jobs.append(job)

    def undo() -> None:
        if job.status not in ("concluded", "null"):  # a grouped job may be gone with another's
            daemon.cancel_job(job)  # not started yet: created -> aborting -> concluded -> null

    return Staged(undo, lambda: daemon.start_job(job))


@command("query-block-jobs")
async def query_block_jobs(daemon: Daemon, args: Args) -> Any:
    return [daemon.job_info(job) for job in daemon.jobs_newest_first()]


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: Args) -> Any:
    return [daemon.job_query(job) for job in daemon.jobs_newest_first()]


# QEMU's job verbs, by job id (job-*) and by device (block-job-*: "Block job 'x' not found").

JobVerb = Callable[[Daemon, BackupJob], None]
JobCheck = Callable[[BackupJob, Args], None]


def _refuse_paused_unless_forced(job: BackupJob, args: Args) -> None:
    """``block-job-cancel`` of a paused job needs ``force`` (QEMU's text)."""
    if job.user_paused and not args.get("force", False):
        raise QmpError(f"The block job for device '{args['device']}' is currently paused")


def job_verb(name: str, key: str, run: JobVerb, *, block: bool,
             members: Mapping[str, Type] | None = None, check: JobCheck | None = None) -> None:
    """Register command ``name``: find the job named by member ``key``, check, run the verb."""
    async def handler(daemon: Daemon, args: Args) -> None:
        job = daemon.find_job(args[key], block=block)
        if check is not None:
            check(job, args)
        run(daemon, job)

    command(name, {key: STR, **(members or {})})(handler)


# verb, Daemon method, the member block-job-VERB names its job by (QEMU's block-job-finalize
# and -dismiss take "id", the older verbs "device"), its extra members, its extra check.
_JOB_VERBS: tuple[tuple[str, JobVerb, str, Mapping[str, Type], JobCheck | None], ...] = (
    ("cancel", Daemon.cancel_job, "device", {"*force": BOOL}, _refuse_paused_unless_forced),
    ("pause", Daemon.pause_job, "device", {}, None),
    ("resume", Daemon.resume_job, "device", {}, None),
    ("complete", Daemon.complete_job, "device", {}, None),
    ("finalize", Daemon.finalize_job, "id", {}, None),
    ("dismiss", Daemon.dismiss_job, "id", {}, None),
)
for _verb, _run, _key, _members, _check in _JOB_VERBS:
    job_verb(f"job-{_verb}", "id", _run, block=False)
    job_verb(f"block-job-{_verb}", _key, _run, block=True, members=_members, check=_check)


@command("block-job-set-speed", {"device": STR, "speed": INT})
async def block_job_set_speed(daemon: Daemon, args: Args) -> None:
    """The job's rate limit in bytes per second (0: none), from now on."""
    job = daemon.find_job(args["device"], block=True)
    daemon.set_job_speed(job, args["speed"])
