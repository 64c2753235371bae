"""Command line: ``nbdfleece serve ...``.

``nbdfleece serve`` with no arguments is the embedded default: it creates a
sparse 1 GiB demo image in ``./nbdfleece-data`` (or ``$NBDFLEECE_DATA``) if
missing and exports it as ``demo`` on 127.0.0.1:10809.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from nbdfleece import __version__
from nbdfleece.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_LISTEN,
    DEMO_EXPORT,
    DEMO_SIZE,
    BitmapConfig,
    ExportConfig,
    ServerConfig,
    load_file,
    parse_bitmap_spec,
    parse_export_spec,
    parse_fault_spec,
    parse_tls_mode,
)
from nbdfleece.daemon import Daemon
from nbdfleece.errors import ConfigError
from nbdfleece.exports import ExportRegistry
from nbdfleece.graph import ControlError
from nbdfleece.probe import DEFAULT_ADDRESS as PROBE_ADDRESS
from nbdfleece.probe import ProbeError, probe
from nbdfleece.probe import describe as describe_probe
from nbdfleece.qmp.client import QmpClient, QmpClientError
from nbdfleece.qmp.server import serve_qmp
from nbdfleece.server import (
    Limits,
    Server,
    describe_listener,
    open_listener,
    systemd_listeners,
)
from nbdfleece.tls import TlsSettings, load_server_tls

log = logging.getLogger("nbdfleece")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdfleece", description="An NBD server for incremental live backup."
    )
    parser.add_argument("--version", action="version", version=f"nbdfleece {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the NBD server",
        description="Serve raw images over NBD. With no arguments at all, export a demo "
        "image from ./nbdfleece-data on 127.0.0.1:10809.",
    )
    serve.add_argument(
        "--listen", action="append", default=[], metavar="ADDR",
        help="HOST:PORT, [V6ADDR]:PORT or unix:PATH; repeatable (default 127.0.0.1:10809)",
    )
    serve.add_argument(
        "--export", action="append", default=[], metavar="SPEC",
        help="NAME=PATH[,readonly][,create=SIZE][,description=TEXT]; repeatable",
    )
    serve.add_argument(
        "--bitmap", action="append", default=[], metavar="SPEC",
        help="NODE:NAME[,granularity=SIZE][,persistent][,disabled]: a dirty bitmap on the node "
        "of export NODE; repeatable",
    )
    serve.add_argument(
        "--fault", action="append", default=[], metavar="SPEC",
        help="NODE:OPS[,errno=E][,p=P][,range=START-END]...[,after=N][,once|count=N][,delay=S]"
        "[,partial][,seed=N]: inject errors (or delays) into requests on the node of export NODE; "
        "OPS is read, write, zero, trim, flush, status or all, joined with '+'; errno defaults "
        "to EIO (none with only a delay); repeatable. For tests and drills.",
    )
    serve.add_argument(
        "--qmp", action="append", default=[], metavar="ADDR", nargs="?", const="",
        help="QMP monitor on unix:PATH (mode 0600) or HOST:PORT (loopback only); "
        "bare --qmp uses unix:DATA_DIR/qmp.sock",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--data-dir", metavar="DIR",
        help="folder for the embedded default's demo image (default ./nbdfleece-data)",
    )
    serve.add_argument("--handshake-timeout", type=float, metavar="SECONDS")
    serve.add_argument("--request-timeout", type=float, metavar="SECONDS")
    serve.add_argument("--idle-timeout", type=float, metavar="SECONDS")
    serve.add_argument(
        "--tls", choices=["off", "optional", "required"],
        help="NBD_OPT_STARTTLS: off, optional (clients choose; tls-only exports need it) or "
        "required (every option but STARTTLS refused before TLS). Default: required when "
        "credentials are given, else off",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM, with chain)")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    serve.add_argument(
        "--tls-ca", metavar="FILE",
        help="require client certificates signed by this CA (PEM); needed by tls-allow",
    )
    serve.add_argument(
        "--tls-creds-dir", metavar="DIR",
        help="QEMU/libnbd layout: server-cert.pem, server-key.pem, and ca-cert.pem (verifies "
        "client certificates when present), ca-crl.pem (optional)",
    )
    serve.add_argument(
        "--tls-psk", metavar="FILE",
        help="TLS-PSK keys, IDENTITY:HEXKEY per line (psktool); needs Python 3.13 or later",
    )
    serve.add_argument(
        "--allow-plaintext-network", action="store_true",
        help="allow listening without TLS on TCP addresses other than loopback: anyone who can "
        "connect reads and writes the exports, and data crosses the network unencrypted",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    snap = sub.add_parser(
        "snapshot", help="point-in-time snapshot exports of a running server (over QMP)",
        description="Create, delete and list point-in-time read-only exports kept by "
        "copy-before-write, through the server's QMP monitor.",
    )
    snap.add_argument(
        "--qmp", metavar="ADDR",
        help="the server's QMP monitor (default unix:DATA_DIR/qmp.sock)",
    )
    snap.add_argument("--data-dir", metavar="DIR")
    snap_sub = snap.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = snap_sub.add_parser("create", help="snapshot an export, rotating a bitmap")
    create.add_argument("name", help="name of the new read-only export")
    create.add_argument("--of", required=True, metavar="EXPORT", help="the export to snapshot")
    create.add_argument(
        "--bitmap", metavar="BITMAP",
        help="offer a frozen copy of BITMAP as qemu:dirty-bitmap:BITMAP on the snapshot, "
        "and clear BITMAP on the live node in the same instant",
    )
    create.add_argument(
        "--on-cbw-error", choices=["break-guest-write", "break-snapshot"],
        default="break-guest-write",
    )
    delete = snap_sub.add_parser("delete", help="remove a snapshot export and its overlay")
    delete.add_argument("name")
    snap_sub.add_parser("list", help="list snapshots")
    probe = sub.add_parser(
        "probe", help="check that an NBD server answers a handshake (health checks)",
        description="Connect, do the fixed-newstyle handshake and NBD_OPT_LIST (or NBD_OPT_INFO "
        "for --export), then NBD_OPT_ABORT. Exit 0 if the server answered, 1 if not.",
    )
    probe.add_argument("address", nargs="?", default=PROBE_ADDRESS, metavar="ADDR",
                       help=f"HOST:PORT, [V6ADDR]:PORT or unix:PATH (default {PROBE_ADDRESS})")
    probe.add_argument("--export", metavar="NAME", help="also require this export (NBD_OPT_INFO)")
    probe.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="for the whole handshake (default 5)")
    probe.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def probe_command(args: argparse.Namespace) -> int:
    try:
        result = probe(args.address, args.export, args.timeout)
    except (ProbeError, OSError) as exc:
        print(f"nbdfleece probe: {args.address}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"nbdfleece probe: {describe_probe(args.address, result, args.export)}")
    return 0


def snapshot_command(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or os.environ.get("NBDFLEECE_DATA") or DEFAULT_DATA_DIR
    address = args.qmp or "unix:" + os.path.join(data_dir, "qmp.sock")
    try:
        with QmpClient(address) as qmp:
            if args.action == "create":
                arguments = {"name": args.name, "export": args.of,
                             "on-cbw-error": args.on_cbw_error}
                if args.bitmap:
                    arguments["bitmap"] = args.bitmap
                result = qmp.execute("x-nbdfleece-snapshot-create", arguments)
                print(f"snapshot '{args.name}' of '{args.of}' created (overlay {result['overlay']})")
            elif args.action == "delete":
                qmp.execute("x-nbdfleece-snapshot-delete", {"name": args.name})
                print(f"snapshot '{args.name}' deleted")
            else:
                for item in qmp.execute("x-nbdfleece-query-snapshots"):
                    state = "\tBROKEN" if item["broken"] else ""
                    print(f"{item['name']}\tof {item['export']}\tcopied {item['copied-bytes']} bytes"
                          f"{state}")
    except QmpClientError as exc:
        print(f"nbdfleece: {exc}", file=sys.stderr)
        return 1
    return 0


def resolve_config(args: argparse.Namespace, argv: Sequence[str]) -> ServerConfig:
    """Merge the config file, the flags and the embedded default."""
    cfg = load_file(args.config) if args.config else ServerConfig()
    listen = list(cfg.listen) + list(args.listen)
    exports = list(cfg.exports) + [parse_export_spec(s) for s in args.export]
    bitmaps = list(cfg.bitmaps) + [parse_bitmap_spec(s) for s in args.bitmap]
    data_dir = args.data_dir or os.environ.get("NBDFLEECE_DATA") or DEFAULT_DATA_DIR
    default_qmp = "unix:" + os.path.join(data_dir, "qmp.sock")
    qmp = list(cfg.qmp) + [a or default_qmp for a in args.qmp]
    if not exports and not listen and not qmp and not args.config and not bitmaps:
        # The embedded default (options like --data-dir or --log-level aside):
        # a demo disk, its QMP monitor in the data folder.
        exports = [ExportConfig(
            DEMO_EXPORT, os.path.join(data_dir, "demo.raw"),
            description="nbdfleece demo disk", create=DEMO_SIZE,
        )]
        qmp = [default_qmp]
    names = [e.name for e in exports]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"export names used twice: {sorted(duplicates)}")
    if not listen and "LISTEN_FDS" not in os.environ and (exports or not qmp):
        # As qemu-storage-daemon: with only --qmp, NBD waits for nbd-server-start.
        listen = [DEFAULT_LISTEN]
    overrides = {
        k: v for k, v in {
            "handshake_timeout": args.handshake_timeout,
            "request_timeout": args.request_timeout,
            "idle_timeout": args.idle_timeout,
        }.items() if v is not None
    }
    for key, value in overrides.items():
        if value < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative")
    limits: Limits = dataclasses.replace(cfg.limits, **overrides)
    faults = list(cfg.faults) + [parse_fault_spec(s) for s in args.fault]
    tls = cfg.tls.merged(TlsSettings(
        mode=parse_tls_mode(args.tls) if args.tls else None, cert=args.tls_cert, key=args.tls_key,
        ca=args.tls_ca, creds_dir=args.tls_creds_dir, psk=args.tls_psk,
    ))
    return ServerConfig(tuple(listen), tuple(exports), limits, tuple(bitmaps), tuple(qmp), data_dir,
                        faults=tuple(faults), tls=tls,
                        allow_plaintext_network=cfg.allow_plaintext_network or args.allow_plaintext_network)


def open_exports(daemon: Daemon, cfg: ServerConfig) -> None:
    """Build one file node per export (named after it), its bitmaps, and the exports."""
    graph = daemon.graph
    for ec in cfg.exports:
        if ec.create is not None and not os.path.exists(ec.path):
            os.makedirs(os.path.dirname(os.path.abspath(ec.path)), exist_ok=True)
            with open(ec.path, "xb") as f:
                f.truncate(ec.create)
            log.info("created sparse image %s (%d bytes)", ec.path, ec.create)
        try:
            graph.add_file(ec.name, ec.path, read_only=ec.readonly)
        except ControlError as exc:
            raise ConfigError(f"export '{ec.name}': {exc.desc}") from None
    for fc in cfg.faults:
        fault_node = graph.nodes.get(fc.node)
        if fault_node is None:
            raise ConfigError(f"fault on '{fc.node}': no export named '{fc.node}'")
        graph.insert_fault(fault_node, fc.spec)
    wanted = list(cfg.bitmaps) + [
        BitmapConfig(ec.name, b) for ec in cfg.exports for b in ec.bitmaps
    ]
    for bc in wanted:
        node = graph.nodes.get(bc.node)
        if node is None:
            raise ConfigError(f"bitmap {bc.node}:{bc.name}: no export named '{bc.node}'")
        if bc.name in node.bitmaps:
            continue  # persisted from an earlier run
        try:
            graph.bitmap_add(bc.node, bc.name, granularity=bc.granularity,
                             persistent=bc.persistent, disabled=bc.disabled)
        except ControlError as exc:
            raise ConfigError(f"bitmap {bc.node}:{bc.name}: {exc.desc}") from None
    for ec in cfg.exports:
        try:
            daemon.add_export(ec.name, ec.name, name=ec.name, description=ec.description,
                              writable=not ec.readonly, bitmaps=list(ec.bitmaps),
                              allocation_depth=ec.allocation_depth)
        except ControlError as exc:
            raise ConfigError(f"export '{ec.name}': {exc.desc}") from None


async def run(cfg: ServerConfig) -> None:
    server_tls = load_server_tls(
        cfg.tls,
        tls_only=[ec.name for ec in cfg.exports if ec.tls_only],
        allow={ec.name: ec.tls_allow for ec in cfg.exports if ec.tls_allow},
    )
    listeners = systemd_listeners()
    for spec in cfg.listen:
        try:
            listeners.append(open_listener(spec))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot listen on {spec}: {exc}") from None
    server = Server(ExportRegistry(), cfg.limits, tls=server_tls,
                    allow_plaintext_network=cfg.allow_plaintext_network)
    for lsock in listeners:
        try:
            server.check_listener(lsock)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if server_tls is not None:
        log.info("TLS %s: %s", server_tls.policy.mode.value, server_tls.description)
    daemon = Daemon(server, cfg.data_dir)
    try:
        daemon.recover_interrupted()
        open_exports(daemon, cfg)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners)
                daemon.job_nursery = nursery
                for lsock in listeners:
                    log.info("listening on %s", describe_listener(lsock))
                for record in daemon.exports.values():
                    export = record.export
                    log.info(
                        "export '%s': %s (%d bytes%s)", export.name,
                        getattr(record.node.image(), "path", record.node.name), export.node.size,
                        ", read-only" if export.read_only else "",
                    )
                async with trio.open_nursery() as monitors:
                    if any(a == "unix:" + os.path.join(cfg.data_dir, "qmp.sock") for a in cfg.qmp):
                        os.makedirs(cfg.data_dir, exist_ok=True)
                    for address in cfg.qmp:
                        await monitors.start(serve_qmp, daemon, address)
                    async for signum in signals:
                        log.info("%s received: stopping gracefully", signal.Signals(signum).name)
                        server.shutdown()  # serve() drains NBD connections, then returns
                        daemon.cancel_all_jobs()  # their tasks run in ``nursery``
                        monitors.cancel_scope.cancel()
                        break
    finally:
        await daemon.close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    if args.command == "snapshot":
        return snapshot_command(args)
    if args.command == "probe":
        return probe_command(args)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = resolve_config(args, argv[1:])
        trio.run(run, cfg)
    except ConfigError as exc:
        print(f"nbdfleece: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised inside a nursery (QMP listener set-up)
        config_errors, rest = group.split(ConfigError)
        if config_errors is None or rest is not None:
            raise
        first: BaseException = config_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"nbdfleece: {first}", file=sys.stderr)
        return 2
    return 0
