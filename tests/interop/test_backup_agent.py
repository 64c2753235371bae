"""The backup agent (``nbdfleece-backup``) against the real server and qemu-storage-daemon.

Expected contents come from copies of the snapshot exports taken by another
client (``nbdcopy``, run by ``--on-snapshot`` while the agent's snapshot is
exported), never from the agent's code; images are checked with
``qemu-img check``/``convert``/``compare``.  Writers (libnbd, in threads) keep
writing to the live export while each backup runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdfleece_backup.cli import main
from tests.conftest import PYTHON, ServerProcess, libnbd, make_image, qemu_io, require, run, wait_listening
from tests.interop.tls_pki import Pki, make_pki

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
Factory = Callable[..., ServerProcess]


def agent(*args: str, check: bool = True, preexec: Callable[[], None] | None = None
          ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PYTHON, "-m", "nbdfleece_backup", *args], capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec)
    if check and proc.returncode != 0:
        raise AssertionError(f"nbdfleece-backup {args} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def agent_here(*args: str) -> tuple[int, str, str]:
    """The same command line in this process (no interpreter start-up): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def backup(kind: str, server: str, qmp: Path, folder: Path, copy: Path | None = None, *extra: str,
           check: bool = True, process: bool = False, preexec: Callable[[], None] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """``nbdfleece-backup KIND``: in this process, or as its own ``process`` (to kill it, limit it)."""
    args = [kind, "--server", server, "--qmp", str(qmp), "--export", "live", "--to", str(folder), *extra]
    if copy is not None:  # the expected content: another client's copy of the same snapshot
        args += ["--on-snapshot", f'nbdcopy "$NBDFLEECE_SNAPSHOT_URI" {copy}']
    if process:
        return agent(*args, check=check, preexec=preexec)
    status, out, err = agent_here(*args)
    if check and status != 0:
        raise AssertionError(f"nbdfleece-backup {args} exited {status}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(args, status, out, err)


def manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data


class Writers:
    """Random writes and zeroing through the live export from threads (libnbd) until stopped."""

    def __init__(self, uri: str, size: int, count: int = 2, seed: int = 1) -> None:
        self.nbd = libnbd()
        self.uri, self.size = uri, size
        self.stop = threading.Event()
        self.writes = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(seed * 100 + i,)) for i in range(count)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            h = self.nbd.NBD()
            h.set_uri_allow_local_file(True)  # nbds:// URIs name their tls-certificates folder
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                length = rng.choice([512, 4096, 65536, 70000])
                offset = rng.randrange(0, self.size - length) // 512 * 512
                if rng.random() < 0.15:
                    h.zero(length, offset)
                else:
                    h.pwrite(rng.randbytes(length), offset)
                self.writes += 1
                time.sleep(0.005)
            h.shutdown()
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


def restore_and_compare(folder: Path, seq: int, expected: Path, work: Path) -> None:
    """Our restore, qemu-img convert and the snapshot copy all agree; qemu-img check passes."""
    image = folder / f"point-{seq:04d}.qcow2"
    check = run(["qemu-img", "check", str(image)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    ours = work / f"restored-{seq}.raw"
    status, _, err = agent_here("restore", "--from", str(folder), "--point", str(seq), "--to", str(ours),
                                "--force", "--quiet")
    assert status == 0, err
    assert ours.read_bytes() == expected.read_bytes(), f"point {seq} differs from its snapshot"
    theirs = work / f"converted-{seq}.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(theirs)])
    assert theirs.read_bytes() == ours.read_bytes()


def nbdfleece_server(server_factory: Factory, image: Path, qmp: Path, *extra: str) -> ServerProcess:
    server = server_factory("--export", f"live={image}", "--qmp", f"unix:{qmp}", *extra)
    server.wait_listening(qmp)  # the monitor opens just after the NBD listeners
    return server


def served_with_a_full_backup(server_factory: Factory, tmp_path: Path, short_dir: Path
                              ) -> tuple[ServerProcess, str, Path, Path]:
    """A server with a 1 MiB-filled ``live`` and a backup folder holding its full backup:
    ``(server, its NBD URI, its QMP socket, the folder)``."""
    require("qemu-img", "qemu-io", "nbdcopy")
    image = make_image(tmp_path / "live.raw", SIZE, {0: os.urandom(MiB)})
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp)
    server, folder = f"nbd://127.0.0.1:{srv.port}", tmp_path / "backups"
    backup("full", server, qmp, folder)
    return srv, server, qmp, folder


def test_full_and_three_incrementals_with_writers(server_factory: Factory, tmp_path: Path,
                                                  short_dir: Path) -> None:
    require("qemu-img", "qemu-io", "nbdcopy")
    image = make_image(tmp_path / "live.raw", SIZE, {0: os.urandom(6 * MiB), 40 * MiB: b"\x5a" * MiB})
    make_image(tmp_path / "target.raw", SIZE, {0: b"\xff" * (8 * MiB)})
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp, "--export", f"target={tmp_path / 'target.raw'}")
    folder = tmp_path / "backups"
    copies = []
    for i, kind in enumerate(["full", "incremental", "incremental", "incremental"]):
        if i:  # writes between backups: data, zeroes, a partial cluster, the last cluster
            qemu_io(srv.uri("live"), [f"write -P {0x30 + i} {i * 3}M 1M", f"write -z {i}M 256k",
                                      f"write -P {0x40 + i} {20 * i}M 700",
                                      f"write -P {i} {SIZE - 4096} 4096"])
        copy = tmp_path / f"snapshot-{i + 1}.raw"
        with Writers(srv.uri("live"), SIZE, seed=i) as writers:
            before = writers.writes
            out = backup(kind, f"nbd://127.0.0.1:{srv.port}", qmp, folder, copy)
            assert writers.writes > before  # the disk kept changing during the backup
        assert f"{kind} backup: point {i + 1}" in out.stdout, out.stdout
        copies.append(copy)
    points = manifest(folder)["points"]
    assert [p["kind"] for p in points] == ["full", "incremental", "incremental", "incremental"]
    for p in points:  # the data path is timed on its own, within the whole backup
        assert 0 < p["copy_seconds"] <= p["seconds"], p
    for p in points[1:]:
        # An incremental reads only what its frozen bitmap reported dirty (whole 64 KiB clusters).
        assert 0 < p["bytes_read"] <= p["dirty_bytes"] < SIZE, p
        assert p["read_bitmap"] == points[p["seq"] - 2]["bitmap"]
    for seq, copy in enumerate(copies, start=1):
        restore_and_compare(folder, seq, copy, tmp_path)
    status, verify, _ = agent_here("verify", "--from", str(folder))
    assert status == 0 and verify.count(": ok (") == 4, verify
    listing = agent_here("list", "--from", str(folder))[1]
    assert [ln.split()[1] for ln in listing.splitlines()[2:6]] == ["full"] + ["incremental"] * 3
    # Restore onto an NBD export (this project's client, several connections), checked with nbdcopy.
    assert agent_here("restore", "--from", str(folder), "--to", srv.uri("target"), "--quiet")[0] == 0
    run(["nbdcopy", srv.uri("target"), str(tmp_path / "target-copy.raw")])
    assert (tmp_path / "target-copy.raw").read_bytes() == copies[-1].read_bytes()
    # The bitmaps of older backups were removed; the newest one keeps recording.
    status, pruned, _ = agent_here("prune", "--from", str(folder), "--keep", "2")
    assert status == 0 and "removed point(s) 1, 2" in pruned
    for seq in (3, 4):
        restore_and_compare(folder, seq, copies[seq - 1], tmp_path)
    assert srv.alive()


def test_kill_9_between_backups_makes_the_next_one_full(server_factory: Factory, tmp_path: Path,
                                                        short_dir: Path) -> None:
    require("qemu-img", "qemu-io", "nbdcopy")
    image = make_image(tmp_path / "live.raw", SIZE, {0: os.urandom(2 * MiB)})
    folder = tmp_path / "backups"
    srv = nbdfleece_server(server_factory, image, short_dir / "q0.sock")
    backup("full", f"nbd://127.0.0.1:{srv.port}", short_dir / "q0.sock", folder, process=True)
    qemu_io(srv.uri("live"), ["write -P 0x77 8M 1M"])
    srv.stop(signal.SIGKILL)
    srv = nbdfleece_server(server_factory, image, short_dir / "q1.sock")
    qemu_io(srv.uri("live"), ["write -P 0x78 16M 1M"])
    copy = tmp_path / "snapshot-2.raw"
    out = backup("incremental", f"nbd://127.0.0.1:{srv.port}", short_dir / "q1.sock", folder, copy)
    first = manifest(folder)["points"][0]
    assert (f"cannot take an incremental backup: bitmap '{first['bitmap']}' is inconsistent: the server "
            "stopped without saving it (killed or crashed)") in out.stderr, out.stderr
    assert "taking a full backup instead" in out.stderr
    second = manifest(folder)["points"][1]
    assert second["kind"] == "full" and second["backing"] is None
    assert "inconsistent" in second["note"]
    restore_and_compare(folder, 2, copy, tmp_path)
    # The chain goes on from the new full backup.
    qemu_io(srv.uri("live"), ["write -P 0x79 24M 64k"])
    copy3 = tmp_path / "snapshot-3.raw"
    backup("incremental", f"nbd://127.0.0.1:{srv.port}", short_dir / "q1.sock", folder, copy3)
    third = manifest(folder)["points"][2]
    assert third["kind"] == "incremental" and third["dirty_bytes"] == 64 * KiB
    restore_and_compare(folder, 3, copy3, tmp_path)


def test_killed_agent_is_recovered_by_the_next_run(server_factory: Factory, tmp_path: Path,
                                                   short_dir: Path) -> None:
    srv, server, qmp, folder = served_with_a_full_backup(server_factory, tmp_path, short_dir)
    before = (folder / "manifest.json").read_text()
    qemu_io(srv.uri("live"), ["write -P 0x61 4M 64k"])
    # kill -9 of the agent while its snapshot is exported and the old bitmap frozen.
    killed = backup("incremental", server, qmp, folder, None, "--on-snapshot", "kill -9 $PPID", check=False,
                    process=True)
    assert killed.returncode == -signal.SIGKILL
    assert (folder / "manifest.json").read_text() == before  # the chain is as it was
    qemu_io(srv.uri("live"), ["write -P 0x62 12M 64k"])
    copy = tmp_path / "snapshot-2.raw"
    out = backup("incremental", server, qmp, folder, copy)
    assert "recovered: removed export nbdfleece-" in out.stderr, out.stderr
    assert "re-enabled bitmap" in out.stderr
    point = manifest(folder)["points"][1]
    # Both windows' writes (before and after the killed run) are in this incremental.
    assert point["kind"] == "incremental" and point["dirty_bytes"] == 128 * KiB
    restore_and_compare(folder, 2, copy, tmp_path)
    assert not list((folder / ".scratch").iterdir())


def test_failed_write_keeps_the_chain_and_the_bitmap(server_factory: Factory, tmp_path: Path,
                                                     short_dir: Path) -> None:
    srv, server, qmp, folder = served_with_a_full_backup(server_factory, tmp_path, short_dir)
    qemu_io(srv.uri("live"), ["write -P 0x61 20M 8M"])

    def small_files() -> None:  # the backup folder "fills up" after 1 MiB of image
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

    failed = backup("incremental", server, qmp, folder, None, check=False, process=True,
                    preexec=small_files)
    assert failed.returncode == 1, failed.stderr
    assert "nbdfleece-backup: cannot write" in failed.stderr and "File too large" in failed.stderr
    assert len(manifest(folder)["points"]) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".lock", ".scratch", "manifest.json",
                                                        "point-0001.qcow2"]
    qemu_io(srv.uri("live"), ["write -P 0x62 40M 64k"])
    copy = tmp_path / "snapshot-2.raw"
    backup("incremental", server, qmp, folder, copy)
    assert manifest(folder)["points"][1]["dirty_bytes"] == 8 * MiB + 64 * KiB
    restore_and_compare(folder, 2, copy, tmp_path)


def test_clear_errors(server_factory: Factory, tmp_path: Path, short_dir: Path) -> None:
    image = make_image(tmp_path / "live.raw", SIZE)
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp)
    folder = tmp_path / "b"
    out = backup("full", f"nbd://127.0.0.1:{srv.port}", short_dir / "none.sock", folder, check=False)
    assert out.returncode == 1
    assert "nbdfleece-backup: cannot reach the QMP monitor at " in out.stderr
    out = agent("full", "--server", f"nbd://127.0.0.1:{srv.port}", "--qmp", str(qmp), "--export", "nope",
                "--to", str(folder), check=False)
    assert out.returncode == 2
    assert out.stderr == "nbdfleece-backup: the server has no block export 'nope' (exports: live)\n"
    # A wrong NBD address: the snapshot is made, cannot be read, and is undone.
    with socket_on_free_port() as port:
        out = backup("full", f"nbd://127.0.0.1:{port}", qmp, folder, check=False)
    assert out.returncode == 1
    assert "cannot connect to NBD export 'nbdfleece-" in out.stderr, out.stderr
    assert not (folder / "manifest.json").exists()
    backup("full", f"nbd://127.0.0.1:{srv.port}", qmp, folder)  # no leftover is in the way
    status, _, err = agent_here("restore", "--from", str(folder), "--point", "5", "--to", str(tmp_path / "r"))
    assert (status, err) == (2, "nbdfleece-backup: there is no point 5 (points: 1)\n")


@contextlib.contextmanager
def socket_on_free_port() -> Iterator[int]:
    """A port nothing listens on (bound, never listening) while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class CuttingProxy:
    """A TCP forwarder to the server that drops the first ``cuts`` connections once each has
    carried ``after`` bytes from the server (a network that fails in the middle of reads)."""

    def __init__(self, port: int, after: int, cuts: int) -> None:
        self.target, self.after, self.cuts = port, after, cuts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.dropped = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                cut = self.cuts > 0
                self.cuts -= cut
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.after if cut else None),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        carried = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                carried += len(data)
                if limit is not None and carried >= limit:
                    with self.lock:
                        self.dropped += 1
                    break
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_dropped_connections_are_reopened_and_reads_retried(server_factory: Factory, tmp_path: Path,
                                                            short_dir: Path) -> None:
    require("qemu-img", "nbdcopy")
    image = make_image(tmp_path / "live.raw", SIZE, {0: os.urandom(16 * MiB)})
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp)
    proxy = CuttingProxy(srv.port, after=MiB, cuts=4)  # every first connection that reads 1 MiB
    try:
        copy = tmp_path / "snapshot.raw"
        hook = f'nbdcopy "nbd://127.0.0.1:{srv.port}/$NBDFLEECE_SNAPSHOT_EXPORT" {copy}'  # not cut
        out = backup("full", f"nbd://127.0.0.1:{proxy.port}", qmp, tmp_path / "b", None,
                     "--on-snapshot", hook)
    finally:
        proxy.close()
    assert proxy.dropped >= 1, out.stderr
    assert out.stderr.count("NBD connection dropped") >= proxy.dropped, out.stderr
    assert manifest(tmp_path / "b")["points"][0]["bytes_read"] == 16 * MiB
    restore_and_compare(tmp_path / "b", 1, copy, tmp_path)


def test_qemu_storage_daemon_full_and_incremental(tmp_path: Path, short_dir: Path) -> None:
    """The same QMP commands and NBD contexts against QEMU 7.2, with a persistent bitmap."""
    require("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdcopy")
    live = tmp_path / "live.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(live), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 30M 1M", str(live)])
    qmp = short_dir / "qsd.sock"
    with socket_on_free_port() as port:
        pass
    proc = subprocess.Popen([
        "qemu-storage-daemon", "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
        "--monitor", "chardev=qmp0",
        "--blockdev", f"driver=file,node-name=proto,filename={live}",
        "--blockdev", "driver=qcow2,node-name=live,file=proto",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=live,node-name=live,name=live,writable=on",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(qmp, proc)
        wait_listening(port, proc)
        uri, folder = f"nbd://127.0.0.1:{port}", tmp_path / "backups"
        copies = [tmp_path / "snapshot-1.raw", tmp_path / "snapshot-2.raw"]
        with Writers(f"{uri}/live", SIZE):
            backup("full", uri, qmp, folder, copies[0])
        qemu_io(f"{uri}/live", ["write -P 0x21 8M 2M", "write -z 30M 64k"])
        with Writers(f"{uri}/live", SIZE, seed=7):
            out = backup("incremental", uri, qmp, folder, copies[1])
        assert "incremental backup: point 2" in out.stdout
        assert "persistent" not in out.stderr  # qcow2 nodes hold persistent bitmaps
        points = manifest(folder)["points"]
        assert points[1]["kind"] == "incremental" and 0 < points[1]["bytes_read"] <= points[1]["dirty_bytes"]
        for seq, copy in enumerate(copies, start=1):
            restore_and_compare(folder, seq, copy, tmp_path)
    finally:
        proc.terminate()
        proc.wait(30)
    # QEMU stores persistent bitmaps in the qcow2 image when it closes it.
    info = run(["qemu-img", "info", "--output=json", str(live)]).stdout
    bitmaps = json.loads(info)["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == [points[1]["bitmap"]]  # the newest only


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def nbd_writes(uri: str, writes: list[tuple[int, bytes | int]]) -> None:
    """``(offset, data)`` writes and ``(offset, length)`` zeroing through libnbd (nbds:// too)."""
    h = libnbd().NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    for offset, what in writes:
        if isinstance(what, int):
            h.zero(what, offset)
        else:
            h.pwrite(what, offset)
    h.flush()
    h.shutdown()


def test_full_and_incremental_over_tls(server_factory: Factory, tmp_path: Path, short_dir: Path,
                                       pki: Pki) -> None:
    """``--tls required`` with client certificates checked: the backups (TCP, then a Unix socket),
    the hook's URI (nbdcopy takes the expected copies through it) and a restore onto an nbds://
    export all go over TLS."""
    require("qemu-img", "nbdcopy")
    image = make_image(tmp_path / "live.raw", SIZE, {0: os.urandom(4 * MiB), 40 * MiB: b"\x5a" * MiB})
    target = make_image(tmp_path / "target.raw", SIZE, {0: b"\xff" * (8 * MiB)})
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp, "--tls", "required",
                           "--tls-creds-dir", str(pki.server), "--export", f"target={target}")
    tcp, unix = f"nbds://127.0.0.1:{srv.port}", f"nbds+unix:///?socket={srv.unix_path}"
    live = f"{tcp}/live?tls-certificates={pki.agent}"
    certs = ("--tls-certificates", str(pki.agent))
    folder = tmp_path / "backups"
    copies = [tmp_path / "snapshot-1.raw", tmp_path / "snapshot-2.raw"]
    with Writers(live, SIZE):
        backup("full", tcp, qmp, folder, copies[0], *certs)
    nbd_writes(live, [(3 * MiB, b"\x31" * MiB), (MiB, 256 * KiB), (20 * MiB + 512, b"\x41" * 700)])
    with Writers(live, SIZE, seed=2):
        out = backup("incremental", unix, qmp, folder, copies[1], *certs)
    assert "incremental backup: point 2" in out.stdout, out.stdout + out.stderr
    points = manifest(folder)["points"]
    assert [p["kind"] for p in points] == ["full", "incremental"]
    assert 0 < points[1]["bytes_read"] <= points[1]["dirty_bytes"] < SIZE
    for seq, copy in enumerate(copies, start=1):
        restore_and_compare(folder, seq, copy, tmp_path)
    status, _, err = agent_here("restore", "--from", str(folder), "--to", f"{tcp}/target", *certs, "--quiet")
    assert status == 0, err
    assert target.read_bytes() == copies[1].read_bytes()
    assert "client certificate: CN=backup-agent,O=nbdfleece test" in srv.log()


def test_tls_refusals_are_clear(server_factory: Factory, tmp_path: Path, short_dir: Path, pki: Pki) -> None:
    """Plaintext against ``--tls required``, nbds:// without certificates, a client certificate the
    server refuses, none at all, a server certificate the agent refuses: one clear line each, and
    nothing left behind."""
    image = make_image(tmp_path / "live.raw", SIZE, {0: b"\x11" * MiB})
    qmp = short_dir / "qmp.sock"
    srv = nbdfleece_server(server_factory, image, qmp, "--tls", "required",
                           "--tls-creds-dir", str(pki.server))
    tcp, folder = f"nbds://127.0.0.1:{srv.port}", tmp_path / "b"

    def refused(server: str, certs: Path | None, status: int = 1) -> str:
        extra = ("--tls-certificates", str(certs)) if certs is not None else ()
        out = backup("full", server, qmp, folder, None, *extra, check=False)
        assert out.returncode == status, out.stdout + out.stderr
        assert out.stderr.startswith("nbdfleece-backup: ") and out.stderr.count("\n") == 1, out.stderr
        return out.stderr

    err = refused(f"nbd://127.0.0.1:{srv.port}", None)
    assert err.endswith(": the server requires TLS: use an nbds:// (or nbds+unix://) server address and "
                        "--tls-certificates DIR\n"), err
    err = refused(tcp, None, status=2)
    assert "asks for TLS: --tls-certificates DIR must name the folder holding ca-cert.pem" in err, err
    err = refused(f"nbd://127.0.0.1:{srv.port}", pki.agent, status=2)
    assert "is a plaintext NBD address: TLS certificates need an nbds://" in err, err
    err = refused(tcp, pki.rogue)
    assert ("the server closed the connection right after the TLS handshake: it probably refused the "
            f"client certificate ({pki.rogue / 'client-cert.pem'} is not signed by a CA the server trusts, "
            "or is revoked); its log says why\n") in err, err
    err = refused(tcp, pki.nocert)
    assert f"({pki.nocert} has no client-cert.pem, and the server requires one)" in err, err
    untrusting = tmp_path / "other-ca"
    untrusting.mkdir()
    (untrusting / "ca-cert.pem").write_bytes((pki.root / "rogue-ca-cert.pem").read_bytes())
    err = refused(tcp, untrusting)
    assert "the server's TLS certificate was refused (certificate verify failed: " in err, err
    assert f"): it must be signed by the CA in {untrusting / 'ca-cert.pem'} and name the host" in err, err
    assert not (folder / "manifest.json").exists()
    backup("full", tcp, qmp, folder, None, "--tls-certificates", str(pki.agent))  # nothing in the way
    assert [p["kind"] for p in manifest(folder)["points"]] == ["full"]
    assert srv.alive()
