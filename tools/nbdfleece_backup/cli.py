"""``nbdfleece-backup``: the command line of the backup agent.

Exit status: 0 done, 1 the operation failed (message on stderr), 2 bad usage
or a folder that is not what the command expects; ``verify`` exits 1 when it
finds a problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from nbdfleece_backup import __version__
from nbdfleece_backup.agent import BackupOptions, backup, summary
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.plan import CHECKSUMS, DEFAULT_CHECKSUM
from nbdfleece_backup.progress import Progress, human, rate
from nbdfleece_backup.prune import prune
from nbdfleece_backup.report import listing, verify
from nbdfleece_backup.restore import restore

TLS_HELP = ("for an nbds:// address: the folder with ca-cert.pem (the CA that signed the server's "
            "certificate), and client-cert.pem and client-key.pem when the server checks client "
            "certificates (the layout of libnbd's tls-certificates and QEMU's tls-creds-x509)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdfleece-backup",
        description="Full and incremental backups of an NBD export (nbdfleece or qemu-storage-daemon) "
        "into a folder holding a qcow2 chain and a manifest.",
    )
    parser.add_argument("--version", action="version", version=f"nbdfleece-backup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("full", "take a full backup"),
                       ("incremental", "back up what changed since the last backup "
                                       "(a full one when that cannot be trusted)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--server", required=True, metavar="URI",
                       help="the NBD server: nbd://HOST[:PORT] or nbd+unix:///?socket=PATH; "
                       "nbds:// and nbds+unix:// for TLS (with --tls-certificates)")
        p.add_argument("--tls-certificates", type=Path, metavar="DIR", help=TLS_HELP)
        p.add_argument("--qmp", required=True, metavar="PATH",
                       help="the server's QMP monitor: a Unix socket path (or unix:PATH, HOST:PORT)")
        p.add_argument("--export", required=True, metavar="NAME", help="the block export (its id) to back up")
        p.add_argument("--to", required=True, metavar="DIR", type=Path, help="the backup folder")
        p.add_argument("--connections", type=int, default=4, metavar="N",
                       help="NBD connections read in parallel (default 4)")
        p.add_argument("--scratch", type=Path, metavar="DIR",
                       help="where the server keeps the snapshot's copy-before-write overlay "
                       "(default DIR/.scratch; the server must be able to open it)")
        p.add_argument("--on-snapshot", metavar="CMD",
                       help="shell command run while the snapshot is exported, before it is read; "
                       "its environment has NBDFLEECE_SNAPSHOT_URI")
        p.add_argument("--checksum", choices=CHECKSUMS, default=DEFAULT_CHECKSUM,
                       help=f"checksum of each 4 MiB piece of the image (default {DEFAULT_CHECKSUM}: "
                       "fast, 128 bits, not cryptographic; sha256 is cryptographic but costs ~30x the CPU; "
                       "crc32 ~10x and has only 32 bits); each image keeps its own, so chains may mix them")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    p = sub.add_parser("restore", help="rebuild the disk at a point into a raw file or an NBD export")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", type=Path)
    p.add_argument("--point", type=int, metavar="N", help="the point to restore (default: the newest)")
    p.add_argument("--to", dest="target", required=True, metavar="FILE|URI",
                   help="a new raw file, a block device, or nbd://HOST[:PORT]/EXPORT "
                   "(nbds:// for TLS, with --tls-certificates)")
    p.add_argument("--tls-certificates", type=Path, metavar="DIR", help=TLS_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums of the chain's images")
    p.add_argument("--connections", type=int, default=4, metavar="N")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("verify", help="recompute the checksums and check the chain")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", type=Path)
    p = sub.add_parser("list", help="the points of the folder, with sizes and times")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", type=Path)
    p = sub.add_parser("prune", help="keep the newest N points, merging older incrementals into the full")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", type=Path)
    p.add_argument("--keep", required=True, type=int, metavar="N")
    p.add_argument("--quiet", action="store_true")
    return parser


async def run(args: argparse.Namespace) -> int:
    progress = Progress(quiet=getattr(args, "quiet", False))
    if args.command in ("full", "incremental"):
        if args.connections < 1:
            raise BackupError("--connections must be at least 1", 2)
        opts = BackupOptions(server=args.server, qmp=args.qmp, export=args.export, folder=args.to,
                             incremental=args.command == "incremental", scratch=args.scratch,
                             connections=args.connections, on_snapshot=args.on_snapshot,
                             checksum=args.checksum, tls_certificates=args.tls_certificates)
        point = await backup(opts, progress)
        print(summary(point), flush=True)
    elif args.command == "restore":
        stats = await restore(args.source, args.point, args.target, connections=args.connections,
                              force=args.force, verify=not args.no_verify, progress=progress,
                              tls_certificates=args.tls_certificates)
        print(f"restored point {stats.point.seq} ({stats.point.snapshot_time}) to {args.target}: "
              f"{human(stats.data_bytes)} of data, {human(stats.point.disk_size)} disk, "
              f"{stats.seconds:.2f} s ({rate(stats.data_bytes, stats.seconds)})", flush=True)
    elif args.command == "verify":
        lines, problems = await verify(args.source)
        print("\n".join(lines + problems), flush=True)
        if problems:
            print(f"nbdfleece-backup: {len(problems)} problem(s) in {args.source}", file=sys.stderr)
            return 1
        print(f"{args.source}: every point verified", flush=True)
    elif args.command == "list":
        print(await listing(args.source), flush=True)
    elif args.command == "prune":
        for line in await prune(args.source, args.keep, progress):
            print(line, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # SIGPIPE stays ignored (Python's default): with SIG_DFL a server that
    # drops a connection mid-write would kill the agent instead of raising.
    try:
        return trio.run(run, args)
    except BrokenPipeError:  # stdout closed (`| head`): nothing left to tell
        return 1
    except KeyboardInterrupt:
        print("nbdfleece-backup: interrupted; the next run cleans up", file=sys.stderr)
        return 130
    except BaseException as raised:  # the one place errors become messages
        leaves = _leaves(raised)
        failures = [e for e in leaves if isinstance(e, BackupError)]
        if failures and all(isinstance(e, BackupError | trio.Cancelled) for e in leaves):
            print(f"nbdfleece-backup: {failures[0]}", file=sys.stderr)  # parallel workers: the first
            return failures[0].status
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print("nbdfleece-backup: interrupted; the next run cleans up", file=sys.stderr)
            return 130
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
