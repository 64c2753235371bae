"""Shared fixtures: the real server process, started the way libnbd tests do.

``start_server`` pre-binds a TCP socket on 127.0.0.1:0 and hands it to the
server as fd 3 with systemd-style socket activation (LISTEN_PID/LISTEN_FDS),
so there is no port race, and also makes it listen on a Unix socket.  At
teardown every server must still be alive (a dead server is a crash) and must
exit 0 on SIGTERM (graceful shutdown).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's Python: the only one where libnbd's ``nbd`` module imports."""


_ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    unix_path: Path
    log_path: Path
    workdir: Path
    _stopped: bool = field(default=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def unix_uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.unix_path}"

    def connect(self) -> socket.socket:
        """A raw TCP connection to the server."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, path: Path, timeout: float = 15) -> None:
        """Wait until this server accepts connections on Unix socket ``path`` (a QMP monitor)."""
        wait_listening(path, self.proc, log=self.log_path, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if not self._stopped:
            self._stopped = True
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not stop within {timeout}s:\n{self.log()}") from None
        rc = self.proc.returncode
        assert rc is not None
        return rc


def start_server(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec: object = None,
) -> ServerProcess:
    """Start ``nbdfleece serve ARGS`` with a pre-bound TCP socket and a Unix socket."""
    workdir.mkdir(parents=True, exist_ok=True)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    unix_path = workdir / f"nbd-{port}.sock"
    log_path = workdir / f"server-{port}.log"
    fd = lsock.fileno()

    def child_setup() -> None:
        if callable(preexec):
            preexec()

    # The wrapper moves the socket to fd 3; exec keeps its pid for LISTEN_PID.
    cmd = [
        PYTHON, "-c", _ACTIVATE, str(fd), PYTHON, "-m", "nbdfleece", "serve", "--listen", f"unix:{unix_path}",
        "--log-level", "debug", *args,
    ]
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=child_setup, pass_fds=(fd,), env=full_env,
        )
    lsock.close()
    server = ServerProcess(proc, port, unix_path, log_path, workdir)
    try:
        server.wait_listening(unix_path)
    except AssertionError:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return server


def unix_listening(path: Path) -> bool:
    """Whether Unix socket ``path`` accepts a connection now."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def tcp_listening(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_listening(address: Path | int, proc: subprocess.Popen[bytes] | None = None, *,
                   log: Path | None = None, timeout: float = 15) -> None:
    """Wait until Unix socket ``address`` (a path), or TCP port ``address`` on
    127.0.0.1, accepts a connection.

    The socket file appears at bind(), before listen(): a connect in between is
    refused, so the file existing is not enough.  A QEMU process opens its QMP
    socket before its NBD server, so one is no sign of the other.  Fails (with
    ``log``, when given) if ``proc`` exits or ``timeout`` seconds pass.
    """
    def output() -> str:
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def listening() -> bool:
        return tcp_listening(address) if isinstance(address, int) else unix_listening(address)

    where = f"127.0.0.1:{address}" if isinstance(address, int) else str(address)
    deadline = time.monotonic() + timeout
    while not listening():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{where} did not accept connections within {timeout}s:\n{output()}")
        time.sleep(0.01)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """``server_factory(*args)`` starts a server; all are checked at teardown."""
    servers: list[ServerProcess] = []

    def factory(*args: str, **kwargs: object) -> ServerProcess:
        server = start_server(tmp_path / f"srv{len(servers)}", *args, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server._stopped:
            continue
        assert server.alive(), f"server died during the test:\n{server.log()}"
        rc = server.stop()
        assert rc == 0, f"server exited with {rc} on SIGTERM:\n{server.log()}"


def make_image(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    """A sparse raw image of ``size`` bytes with ``data`` written at offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


@pytest.fixture
def live_server(server_factory: object, tmp_path: Path) -> ServerProcess:
    """Scenario S0 without bitmaps: a zeroed 64 MiB ``live`` and a read-only ``snap``."""
    make_image(tmp_path / "live.raw", 64 << 20)
    make_image(tmp_path / "snap.raw", 64 << 20)
    return server_factory(  # type: ignore[operator, no-any-return]
        "--export", f"live={tmp_path / 'live.raw'},description=live disk",
        "--export", f"snap={tmp_path / 'snap.raw'},readonly",
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nbdfleece", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def libnbd() -> ModuleType:
    """libnbd's Python binding (Debian's python3-libnbd), or skip."""
    nbd: ModuleType = pytest.importorskip("nbd")
    return nbd


def require(*tools: str) -> None:
    """Skip unless every command-line tool is installed (nbdkit's exit 77)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(cmd: list[str], *, check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool; on failure show its output."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout,
        input=input.decode() if input is not None else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def qemu_io(uri: str, commands: list[str]) -> None:
    """Run qemu-io commands on a raw NBD export; every one must report its bytes."""
    require("qemu-io")
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    out = run([*cmd, uri]).stdout
    assert out.count("bytes at offset") == len(commands), out


@contextmanager
def qmp_only_server(workdir: Path) -> Iterator[Path]:
    """``nbdfleece serve --qmp`` alone (no NBD listener until nbd-server-start).

    Yields the QMP socket; at exit the server is stopped with SIGTERM and must exit 0.
    """
    sock = workdir / "qmp.sock"
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([PYTHON, "-m", "nbdfleece", "serve", "--qmp", f"unix:{sock}"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        wait_listening(sock, server, log=workdir / "server.log")
        yield sock
    finally:
        server.terminate()
        rc = server.wait(30)
        log.close()
    assert rc == 0, (workdir / "server.log").read_text()
