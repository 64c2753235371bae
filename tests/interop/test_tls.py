"""TLS (NBD_OPT_STARTTLS) against the real server, with real clients and real certificates.

A CA, a server certificate (SAN 127.0.0.1 and localhost) and client
certificates are made at run time with the ``openssl`` command into folders in
the layout libnbd's ``tls-certificates`` and QEMU's ``tls-creds-x509`` share
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``,
``client-cert.pem``/``client-key.pem``):

* ``agent``: CN=backup-agent, signed by the CA (the allowed client);
* ``intruder``: CN=intruder, signed by the CA (valid, but not allow-listed);
* ``nocert``: the CA only, no client certificate;
* ``rogue``: CN=backup-agent signed by another CA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ServerProcess, libnbd, make_image, qmp_only_server, require, run
from tests.interop.test_golden_exchanges import read_step, recv_exact, send_step
from tests.interop.tls_pki import Pki, make_pki, openssl
from tests.unit.test_tls_handshake import TLS_EXCHANGES, TLS_SCENARIOS

pytestmark = pytest.mark.interop

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_ERR_TLS_REQD = 1, 0x80000005


# -- certificates (made by tls_pki, shared with the backup agent's tests) -----------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- helpers ---------------------------------------------------------------------------


def nbds(server: ServerProcess, export: str, certs: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def nbds_unix(server: ServerProcess, export: str, certs: Path) -> str:
    return f"nbds+unix:///{export}?socket={server.unix_path}&tls-certificates={certs}"


def qemu_tls(server: ServerProcess, export: str, certs: Path) -> list[str]:
    """qemu-img/qemu-io arguments for ``export`` over TLS with the client credentials ``certs``."""
    return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
            f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
            f"file.server.port={server.port},file.export={export},file.tls-creds=tls0"]


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def go_payload(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def read_reply(sock: socket.socket | ssl.SSLSocket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REPLY_MAGIC
    return opt, rep, recv_exact(sock, length)


def greet(server: ServerProcess) -> socket.socket:
    sock = server.connect()
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    return sock


def starttls(server: ServerProcess, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = greet(server)
    sock.sendall(option(OPT_STARTTLS))
    assert read_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def wait_for_log(server: ServerProcess, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := server.log()):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log}"
        time.sleep(0.05)
    return log


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tls_server(server_factory: Any, tmp_path: Path, pki: Pki) -> ServerProcess:
    """``--tls-creds-dir``: TLS required, client certificates verified against the CA."""
    make_image(tmp_path / "live.raw", 16 * MiB, {MiB: b"\xab" * MiB})
    make_image(tmp_path / "ro.raw", MiB)
    server: ServerProcess = server_factory(
        "--tls-creds-dir", str(pki.server),
        "--export", f"live={tmp_path / 'live.raw'},description=live disk",
        "--export", f"ro={tmp_path / 'ro.raw'},readonly",
    )
    return server


# -- required mode with libnbd and QEMU ----------------------------------------------------


def test_nbdinfo_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    require("nbdinfo")
    out = run(["nbdinfo", "--json", nbds(tls_server, "live", pki.agent)]).stdout
    info = json.loads(out)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 16 * MiB
    listing = run(["nbdinfo", "--list", "--json", nbds(tls_server, "", pki.agent)]).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["live", "ro"]
    out = run(["nbdinfo", "--size", nbds_unix(tls_server, "ro", pki.agent)]).stdout
    assert out.strip() == str(MiB)
    log = tls_server.log()
    assert "client certificate: CN=backup-agent,O=nbdfleece test" in log


def test_nbdcopy_in_and_out_over_tls(tls_server: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    require("nbdcopy")
    source = tmp_path / "source.raw"
    source.write_bytes(random.Random(1).randbytes(16 * MiB))
    run(["nbdcopy", str(source), nbds(tls_server, "live", pki.agent)])
    assert sha256(tmp_path / "live.raw") == sha256(source)
    copy = tmp_path / "copy.raw"
    run(["nbdcopy", "--connections=4", nbds(tls_server, "live", pki.agent), str(copy)])
    assert sha256(copy) == sha256(source)


def test_qemu_img_and_qemu_io_over_tls(tls_server: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           *qemu_tls(tls_server, "live", pki.agent)]).stdout)
    assert info["virtual-size"] == 16 * MiB
    out = run(["qemu-io", *qemu_tls(tls_server, "live", pki.agent),
               "-c", "write -P 0x5c 4M 2M", "-c", "read -P 0x5c 4M 2M", "-c", "read -P 0xab 1M 1M"]).stdout
    assert out.count("bytes at offset") == 3, out
    with open(tmp_path / "live.raw", "rb") as f:
        assert os.pread(f.fileno(), 2 * MiB, 4 * MiB) == b"\x5c" * (2 * MiB)
    copy = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-O", "raw", *qemu_tls(tls_server, "live", pki.agent), str(copy)])
    assert sha256(copy) == sha256(tmp_path / "live.raw")


def test_required_mode_gives_plaintext_clients_nothing(tls_server: ServerProcess) -> None:
    require("nbdinfo")
    assert run(["nbdinfo", tls_server.uri("live")], check=False).returncode != 0
    assert run(["nbdinfo", "--list", tls_server.uri("")], check=False).returncode != 0
    with greet(tls_server) as sock:
        received = b""
        for opt, payload in [(OPT_LIST, b""), (OPT_INFO, go_payload(b"live")),
                             (OPT_GO, go_payload(b"live")), (OPT_GO, go_payload(b""))]:
            sock.sendall(option(opt, payload))
            reply = read_reply(sock)
            assert reply[:2] == (opt, REP_ERR_TLS_REQD)
            received += reply[2]
        sock.sendall(option(OPT_EXPORT_NAME, b"live"))
        assert sock.recv(4096) == b""  # closed, nothing sent: no size, no flags
    assert b"live" not in received and b"ro" not in received


def test_clients_without_a_valid_certificate_are_refused_and_logged(
    tls_server: ServerProcess, pki: Pki
) -> None:
    require("nbdinfo")
    nbd = libnbd()
    good = nbd.NBD()
    good.set_tls(nbd.TLS_REQUIRE)
    good.set_tls_certificates(str(pki.agent))
    good.connect_uri(f"nbds://127.0.0.1:{tls_server.port}/live")
    assert good.pread(8, MiB) == b"\xab" * 8
    for certs in (pki.nocert, pki.rogue):
        proc = run(["nbdinfo", nbds(tls_server, "live", certs)], check=False)
        assert proc.returncode != 0, proc.stdout
    log = wait_for_log(tls_server, "certificate verify failed")
    assert "TLS handshake with 127.0.0.1:" in log
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
    # A client that speaks no TLS after STARTTLS is refused the same way.
    with greet(tls_server) as sock:
        sock.sendall(option(OPT_STARTTLS))
        assert read_reply(sock)[:2] == (OPT_STARTTLS, REP_ACK)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + option(OPT_LIST))
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
        assert REPLY_MAGIC.to_bytes(8, "big") not in received  # at most a TLS alert
    deadline = time.monotonic() + 15
    while tls_server.log().count("failed: ") < 3:  # OpenSSL's reason: HTTP_REQUEST here
        assert time.monotonic() < deadline, tls_server.log()
        time.sleep(0.05)
    # ...and the connection established before never noticed.
    assert good.pread(8, MiB + 8) == b"\xab" * 8
    good.shutdown()


def test_client_hello_sent_with_starttls_goes_to_tls(tls_server: ServerProcess, pki: Pki) -> None:
    """A client that does not wait for the ACK: its ClientHello must reach TLS, not the options."""
    ctx = pki.context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    with greet(tls_server) as sock:
        sock.sendall(option(OPT_STARTTLS) + outgoing.read())
        assert read_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")

        def pump() -> None:
            data = outgoing.read()
            if data:
                sock.sendall(data)
            chunk = sock.recv(65536)
            assert chunk, "server closed during TLS"
            incoming.write(chunk)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        sock.sendall(outgoing.read())
        tls.write(option(OPT_LIST))
        sock.sendall(outgoing.read())
        plain = b""
        while plain.count(REPLY_MAGIC.to_bytes(8, "big")) < 3:
            try:
                plain += tls.read(65536)
            except ssl.SSLWantReadError:
                pump()
        assert b"live" in plain and b"ro" in plain
    assert "bytes sent before STARTTLS's reply go to TLS" in tls_server.log()


def test_handshake_timeout_covers_tls(server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    make_image(tmp_path / "d.raw", MiB)
    server: ServerProcess = server_factory("--tls-creds-dir", str(pki.server), "--handshake-timeout", "1",
                                           "--export", f"d={tmp_path / 'd.raw'}")
    with greet(server) as sock:  # STARTTLS acknowledged, then silence: no ClientHello
        sock.sendall(option(OPT_STARTTLS))
        assert read_reply(sock)[:2] == (OPT_STARTTLS, REP_ACK)
        assert sock.recv(4096) == b""
    with starttls(server, pki.context()) as tls, contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert tls.recv(4096) == b""  # TLS up, then no option: closed
    assert wait_for_log(server, "timed out").count("handshake with 127.0.0.1:") >= 2


# -- optional mode, tls-only exports and allow-lists ---------------------------------------


def test_optional_mode_serves_both(server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    require("nbdinfo")
    make_image(tmp_path / "secret.raw", 2 * MiB)
    make_image(tmp_path / "public.raw", MiB)
    server: ServerProcess = server_factory(
        "--tls", "optional", "--tls-creds-dir", str(pki.server),
        "--export", f"secret={tmp_path / 'secret.raw'},tls-only",
        "--export", f"public={tmp_path / 'public.raw'}",
    )
    plain = json.loads(run(["nbdinfo", "--json", server.uri("public")]).stdout)
    assert plain["TLS"] is False and plain["exports"][0]["export-size"] == MiB
    assert run(["nbdinfo", server.uri("secret")], check=False).returncode != 0
    listing = json.loads(run(["nbdinfo", "--list", "--json", server.uri("")]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["public"]
    secure = json.loads(run(["nbdinfo", "--json", nbds(server, "secret", pki.agent)]).stdout)
    assert secure["TLS"] is True and secure["exports"][0]["export-size"] == 2 * MiB
    listing = json.loads(run(["nbdinfo", "--list", "--json", nbds(server, "", pki.agent)]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["secret", "public"]
    assert "export 'secret' requires TLS" in server.log()


def test_allow_lists(server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    require("nbdinfo")
    make_image(tmp_path / "live.raw", 2 * MiB)
    make_image(tmp_path / "pinned.raw", 2 * MiB)
    make_image(tmp_path / "ro.raw", MiB)
    server: ServerProcess = server_factory(
        "--tls-creds-dir", str(pki.server),
        "--export", f"live={tmp_path / 'live.raw'},tls-allow=CN=backup-agent,tls-allow=CN=other",
        "--export", f"pinned={tmp_path / 'pinned.raw'},tls-allow=/O=nbdfleece test/CN=backup-agent",
        "--export", f"ro={tmp_path / 'ro.raw'},readonly",
    )
    for export in ("live", "pinned", "ro"):
        run(["nbdinfo", "--size", nbds(server, export, pki.agent)])
    for export in ("live", "pinned"):
        proc = run(["nbdinfo", nbds(server, export, pki.intruder)], check=False)
        assert proc.returncode != 0, proc.stdout
    assert run(["nbdinfo", "--size", nbds(server, "ro", pki.intruder)]).stdout.strip() == str(MiB)
    listing = json.loads(run(["nbdinfo", "--list", "--json", nbds(server, "", pki.intruder)]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["ro"]
    log = server.log()
    assert "'CN=intruder,O=nbdfleece test' is not allowed to use export 'live'" in log
    # Python's ssl as a raw client: the refusal is NBD_REP_ERR_POLICY with the reason.
    with starttls(server, pki.context("intruder")) as tls:
        tls.sendall(option(OPT_GO, go_payload(b"pinned")))
        opt, rep, message = read_reply(tls)
        assert (opt, rep) == (OPT_GO, 0x80000002) and b"not allowed" in message


def strict_starttls(server: ServerProcess, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """STARTTLS, then TLS that tells a close_notify (recv gives b"") from a bare TCP
    close (SSLEOFError), and raises a TLS alert the server sent as an SSLError."""
    sock = greet(server)
    sock.sendall(option(OPT_STARTTLS))
    assert read_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")
    sock.settimeout(15)
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # set by default with OpenSSL 3
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)


def test_policy_refusal_by_export_name_ends_with_close_notify(
    server_factory: Any, tmp_path: Path, pki: Pki
) -> None:
    """EXPORT_NAME cannot be answered with an error: the refusal of a subject not on
    the allow-list is an orderly TLS shutdown (close_notify), and the log says why."""
    make_image(tmp_path / "live.raw", MiB)
    server: ServerProcess = server_factory(
        "--tls-creds-dir", str(pki.server),
        "--export", f"live={tmp_path / 'live.raw'},tls-allow=CN=backup-agent")
    with strict_starttls(server, pki.context("intruder")) as tls:
        tls.sendall(option(OPT_EXPORT_NAME, b"live"))
        assert tls.recv(4096) == b""  # close_notify; a bare close raises SSLEOFError
    wait_for_log(server, "'CN=intruder,O=nbdfleece test' is not allowed to use export 'live'")


@pytest.mark.parametrize(("client", "alert", "logged"), [
    (None, "CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("rogue", "UNKNOWN_CA", "certificate verify failed"),
])
def test_certificate_refusal_reaches_the_client_as_a_tls_alert(
    tls_server: ServerProcess, pki: Pki, client: str | None, alert: str, logged: str
) -> None:
    """OpenSSL's alert is sent before the server closes, so the client learns why
    instead of seeing the connection drop (TLS 1.3: the client's handshake is
    already over when the server checks its certificate)."""
    with strict_starttls(tls_server, pki.context(client)) as tls:
        tls.sendall(option(OPT_LIST))
        with pytest.raises(ssl.SSLError, match=alert):
            tls.recv(4096)
    wait_for_log(tls_server, logged)


def test_revoked_client_certificate_is_refused(server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    """``ca-crl.pem`` in the credentials folder (QEMU's layout) revokes certificates."""
    require("nbdinfo")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "crlnumber").write_text("01\n")
    config = ca_dir / "ca.cnf"
    config.write_text(f"[ca]\ndefault_ca = ca_default\n[ca_default]\ndatabase = {ca_dir}/index.txt\n"
                      f"crlnumber = {ca_dir}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n")
    base: list[str | Path] = ["ca", "-config", config, "-keyfile", pki.ca_key, "-cert", pki.ca_cert]
    openssl(*base, "-revoke", pki.intruder / "client-cert.pem")
    server_dir = tmp_path / "server-creds"
    server_dir.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (server_dir / name).write_bytes((pki.server / name).read_bytes())
    openssl(*base, "-gencrl", "-out", server_dir / "ca-crl.pem")
    make_image(tmp_path / "d.raw", MiB)
    server: ServerProcess = server_factory("--tls-creds-dir", str(server_dir),
                                           "--export", f"d={tmp_path / 'd.raw'}")
    run(["nbdinfo", "--size", nbds(server, "d", pki.agent)])
    assert run(["nbdinfo", nbds(server, "d", pki.intruder)], check=False).returncode != 0
    wait_for_log(server, "certificate revoked")


def test_config_file_tls(server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    require("nbdinfo")
    make_image(tmp_path / "live.raw", MiB)
    config = tmp_path / "nbdfleece.toml"
    config.write_text(
        f'[tls]\nmode = "required"\ncreds-dir = "{os.path.relpath(pki.server, tmp_path)}"\n\n'
        '[[export]]\nname = "live"\npath = "live.raw"\n'
        'tls-allow = ["CN=backup-agent,O=nbdfleece test"]\n'
    )
    server: ServerProcess = server_factory("--config", str(config))
    assert run(["nbdinfo", "--size", nbds(server, "live", pki.agent)]).stdout.strip() == str(MiB)
    assert run(["nbdinfo", nbds(server, "live", pki.intruder)], check=False).returncode != 0


# -- golden vectors ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", TLS_SCENARIOS, ids=[s["name"] for s in TLS_SCENARIOS])
def test_tls_exchange_against_server(
    server_factory: Any, tmp_path: Path, pki: Pki, scenario: dict[str, Any]
) -> None:
    """protocol/vectors/tls_exchanges.json against the real server, TLS by Python's ssl."""
    policy = scenario["tls"]
    args = ["--tls", policy["mode"], "--tls-creds-dir", str(pki.server)]
    for e in TLS_EXCHANGES["exports"]:
        spec = f"{e['name']}={make_image(tmp_path / (e['name'] + '.raw'), e['size'])}"
        if not e["writable"]:
            spec += ",readonly"
        if e["name"] in policy.get("tls_only", []):
            spec += ",tls-only"
        for pattern in policy.get("allow", {}).get(e["name"], []):
            spec += f",tls-allow={pattern}"
        if e["description"]:
            spec += f",description={e['description']}"
        args += ["--export", spec]
    server: ServerProcess = server_factory(*args)
    assert TLS_EXCHANGES["client_subject"] == "CN=backup-agent,O=nbdfleece test"  # pki.agent's
    rng = random.Random(scenario["name"])
    sock: socket.socket | ssl.SSLSocket = server.connect()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for step in scenario["steps"]:
            if step["dir"] == "tls":
                assert isinstance(sock, socket.socket)
                sock = pki.context().wrap_socket(sock, server_hostname="127.0.0.1")
            elif step["dir"] == "c2s":
                send_step(sock, step, rng)
            else:
                read_step(sock, step)
        assert scenario["end"] == "server_closes"
        with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
            assert sock.recv(1) == b"", "server sent more than the scenario expects"
    finally:
        sock.close()


# -- nbdfleece's own client ------------------------------------------------------------


async def test_own_client_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    client = pytest.importorskip("nbdfleece.client")
    ctx = pki.context()
    async with client.open_client(f"nbds://127.0.0.1:{tls_server.port}/live", tls=ctx) as c:
        assert c.size == 16 * MiB
        assert await c.pread(MiB, 16) == b"\xab" * 16
        await c.pwrite(8 * MiB, b"\x77" * 4096)
        await c.flush()
        assert await c.pread(8 * MiB, 4096) == b"\x77" * 4096
        big = await c.pread(0, 4 * MiB)  # several TLS records per reply
        assert big[MiB : 2 * MiB] == b"\xab" * MiB and big[:MiB] == bytes(MiB)
    unix_ctx = pki.context()
    unix_ctx.check_hostname = False  # no host name over a Unix socket; the CA still vouches
    async with client.open_client(f"nbds+unix:///ro?socket={tls_server.unix_path}",
                                  tls=unix_ctx) as c:
        assert c.read_only and c.size == MiB
    # The same folders libnbd and QEMU use, through nbdfleece.tls.client_context.
    from nbdfleece.tls import client_context

    exports = await client.list_exports(f"nbds://127.0.0.1:{tls_server.port}/",
                                        tls=client_context(str(pki.agent)))
    assert [name for name, _ in exports] == ["live", "ro"]
    with pytest.raises(client.NbdConnectionError):
        async with client.open_client(tls_server.uri("live")):
            pass
    with pytest.raises(client.NbdConnectionError):
        async with client.open_client(f"nbds://127.0.0.1:{tls_server.port}/live",
                                      tls=pki.context(None)):
            pass


# -- start-up checks and QMP -------------------------------------------------------------


def serve(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen([PYTHON, "-m", "nbdfleece", "serve", *args], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def refused(tmp_path: Path, *args: str) -> str:
    proc = serve(tmp_path, *args)
    assert proc.wait(30) == 2
    return (tmp_path / "serve.log").read_text()


def started_then_stopped(tmp_path: Path, *args: str) -> str:
    proc = serve(tmp_path, *args)
    log_path = tmp_path / "serve.log"
    deadline = time.monotonic() + 15
    while "listening on" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    return log_path.read_text()


def test_startup_refusals_and_warnings(tmp_path: Path, pki: Pki) -> None:
    export = f"d={make_image(tmp_path / 'd.raw', MiB)}"
    assert "needs a certificate and its key" in refused(tmp_path, "--tls", "required", "--export", export)
    assert "--tls is off" in refused(tmp_path, "--tls", "off", "--tls-creds-dir", str(pki.server),
                                     "--export", export)
    assert "tls-allow needs client certificate verification" in refused(
        tmp_path, "--tls-cert", str(pki.server / "server-cert.pem"),
        "--tls-key", str(pki.server / "server-key.pem"), "--export", export + ",tls-allow=CN=x")
    if sys.version_info < (3, 13):
        (tmp_path / "keys.psk").write_text("agent:00112233445566778899aabbccddeeff\n")
        assert "TLS-PSK needs Python 3.13" in refused(tmp_path, "--tls-psk", str(tmp_path / "keys.psk"),
                                                      "--export", export)
    log = refused(tmp_path, "--listen", "0.0.0.0:0", "--export", export)
    assert "refusing to serve NBD without TLS on 0.0.0.0:" in log
    log = started_then_stopped(tmp_path, "--listen", "0.0.0.0:0", "--allow-plaintext-network",
                               "--export", export)
    assert "WARNING" in log and "serving NBD without TLS on 0.0.0.0:" in log
    log = started_then_stopped(tmp_path, "--listen", "0.0.0.0:0", "--tls-creds-dir", str(pki.server),
                               "--export", export)
    assert "WARNING" not in log and "TLS required" in log


def test_qmp_tls_creds(tmp_path: Path, pki: Pki) -> None:
    require("nbdinfo")
    pytest.importorskip("qemu.qmp")
    from tests.interop.test_qmp import error_of, with_client

    image = make_image(tmp_path / "d.raw", 2 * MiB)
    nbd_sock = tmp_path / "nbd.sock"
    inet = {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}

    async def body(client: Any) -> None:
        await client.execute("blockdev-add", {"driver": "file", "node-name": "d", "filename": str(image)})
        await client.execute("block-export-add", {"type": "nbd", "id": "d", "node-name": "d"})
        assert await error_of(client, "object-add", {"qom-type": "tls-creds-x509", "id": "c0"}) \
            == "Missing 'dir' property value"
        assert await error_of(client, "object-add", {
            "qom-type": "tls-creds-x509", "id": "c0", "dir": str(pki.nocert), "endpoint": "server",
        }) == f"Unable to access credentials {pki.nocert}/server-cert.pem: No such file or directory"
        assert await error_of(client, "object-add", {"qom-type": "x", "id": "c0"}) \
            == "Parameter 'qom-type' does not accept value 'x'"
        assert await error_of(client, "object-add", {
            "qom-type": "tls-creds-x509", "id": "0c", "dir": str(pki.server)}) \
            == "Parameter 'id' expects an identifier"
        await client.execute("object-add", {"qom-type": "tls-creds-x509", "id": "cli",
                                            "dir": str(pki.agent)})
        await client.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                            "dir": str(pki.server), "endpoint": "server"})
        assert await error_of(client, "object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                                     "dir": str(pki.server), "endpoint": "server"}) \
            == "attempt to add duplicate property 'tls0' to object (type 'container')"
        assert await error_of(client, "nbd-server-start", {"addr": inet, "tls-creds": "nosuch"}) \
            == "No TLS credentials with id 'nosuch'"
        assert await error_of(client, "nbd-server-start", {"addr": inet, "tls-creds": "cli"}) \
            == "Expected TLS credentials for a server endpoint"
        assert "refusing to serve NBD without TLS on 0.0.0.0:" in await error_of(
            client, "nbd-server-start", {"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "0"}}})
        await client.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": str(nbd_sock)}}, "tls-creds": "tls0"})
        await client.execute("object-del", {"id": "tls0"})  # as QEMU: the server keeps them
        assert await error_of(client, "object-del", {"id": "tls0"}) == "object 'tls0' not found"

    with qmp_only_server(tmp_path) as qmp_path:
        with_client(qmp_path, body)
        uri = f"nbds+unix:///d?socket={nbd_sock}&tls-certificates={pki.agent}"
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(2 * MiB)
        assert run(["nbdinfo", f"nbd+unix:///d?socket={nbd_sock}"], check=False).returncode != 0

