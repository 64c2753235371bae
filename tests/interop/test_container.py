"""The container image, and ``nbdfleece probe``, its health check.

The probe tests run everywhere: they point ``nbdfleece probe`` at the real server process
and at hostile listeners (silent, not NBD, hanging up after the greeting).

``test_container_image`` runs ``tools/container.sh``: it builds the image with podman (from a
Debian base made with debootstrap, cached), runs it with a volume, and drives it from the host
with nbdinfo, qemu-io and QMP; see the script for the list of checks. Building the base image
from scratch takes about a minute and the image build needs PyPI, so the test runs only when
podman and runc are installed and either the base image is already cached (any earlier
``tools/container.sh`` run on this machine) or ``NBDFLEECE_CONTAINER_TESTS=1`` asks for the
full build; ``NBDFLEECE_CONTAINER_TESTS=0`` skips it. With the base cached it takes 10-40 s
(longer when the code changed and the image layer is rebuilt).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ServerProcess, require, run

pytestmark = pytest.mark.interop

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "tools" / "container.sh"


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-m", "nbdfleece", "probe", *args], check=False, timeout=60)


@contextmanager
def hostile_listener(behaviour: Callable[[socket.socket], None] | None) -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that treats each connection with ``behaviour``.

    ``None`` never accepts: the kernel completes the connection and nothing is ever sent.
    """
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    stop = threading.Event()

    def serve() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            with conn:
                assert behaviour is not None
                behaviour(conn)

    thread = threading.Thread(target=serve, daemon=True) if behaviour else None
    if thread:
        thread.start()
    try:
        yield f"127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        if thread:
            thread.join(5)
        lsock.close()


def test_probe_lists_exports(live_server: ServerProcess) -> None:
    out = probe(live_server.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"nbdfleece probe: {live_server.address}: NBD server up, exports: 'live', 'snap'"
    )


def test_probe_over_unix_socket(live_server: ServerProcess) -> None:
    out = probe(f"unix:{live_server.unix_path}", "--export", "snap")
    assert out.returncode == 0, out.stderr
    assert "export 'snap' (67108864 bytes)" in out.stdout


def test_probe_unknown_export_fails(live_server: ServerProcess) -> None:
    out = probe(live_server.address, "--export", "nosuch")
    assert out.returncode == 1
    assert "ERR_UNKNOWN" in out.stderr
    # The probe left cleanly: the server goes on serving.
    assert probe(live_server.address, "--export", "live", "--quiet").returncode == 0


def test_probe_leaves_no_trace_in_the_server(live_server: ServerProcess) -> None:
    assert probe(live_server.address).returncode == 0
    assert live_server.alive()
    log = live_server.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_probe_tls_required_server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """With --tls required, LIST is refused before STARTTLS: still a live server; INFO is not."""
    require("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"])
    server = server_factory("--tls", "required", "--tls-cert", str(cert), "--tls-key", str(key),
                            "--export", f"live={tmp_path / 'live.raw'},create=1M")
    out = probe(server.address)
    assert out.returncode == 0, out.stderr
    assert "NBD_OPT_LIST refused: ERR_TLS_REQD" in out.stdout
    out = probe(server.address, "--export", "live")
    assert out.returncode == 1
    assert "ERR_TLS_REQD" in out.stderr


def test_probe_refused_port() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = probe(f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert "Connection refused" in out.stderr


def test_probe_silent_listener_times_out() -> None:
    with hostile_listener(None) as address:
        out = probe(address, "--timeout", "0.5")
    assert out.returncode == 1
    assert "timed out" in out.stderr


def test_probe_not_nbd() -> None:
    def http(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with hostile_listener(http) as address:
        out = probe(address)
    assert out.returncode == 1
    assert "not a fixed-newstyle NBD greeting" in out.stderr


def test_probe_greeting_then_hang_up() -> None:
    greeting = bytes.fromhex("4e42444d41474943 49484156454f5054 0003".replace(" ", ""))

    def greet_and_close(conn: socket.socket) -> None:
        conn.sendall(greeting)
        received = b""
        while len(received) < 4 + 16:  # client flags and NBD_OPT_LIST: read, so close sends FIN
            chunk = conn.recv(64)
            if not chunk:
                break
            received += chunk
        # then hang up without any option reply

    with hostile_listener(greet_and_close) as address:
        out = probe(address)
    assert out.returncode == 1
    assert "connection closed while reading the option reply header" in out.stderr


def test_probe_bad_address() -> None:
    out = probe("no-port-here")
    assert out.returncode == 1
    assert "HOST:PORT" in out.stderr


def _container_skip_reason() -> str | None:
    wanted = os.environ.get("NBDFLEECE_CONTAINER_TESTS")
    if wanted == "0":
        return "NBDFLEECE_CONTAINER_TESTS=0"
    missing = [t for t in ("podman", "runc") if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install podman runc debootstrap)"
    if wanted == "1":
        return None
    cached = subprocess.run([str(SCRIPT), "has-base"], capture_output=True, timeout=120)
    if cached.returncode != 0:
        return ("no cached base image: run tools/container.sh once (about a minute with "
                "debootstrap), or set NBDFLEECE_CONTAINER_TESTS=1")
    return None


@pytest.mark.slow
def test_container_image() -> None:
    reason = _container_skip_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([str(SCRIPT), "check"], capture_output=True, text=True, timeout=1200)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "FAIL" not in proc.stdout, report
    assert "checks passed" in proc.stdout, report
    for check in ("podman healthcheck run: healthy", "qemu-io: write 1 MiB", "snapshot create",
                  "graceful stop logged, exit code 0", "data persisted in the volume"):
        assert check in proc.stdout, report
