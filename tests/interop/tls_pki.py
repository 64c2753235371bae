"""Certificates for the TLS tests, made at run time with the ``openssl`` command.

Shared by ``test_tls.py`` and ``test_backup_agent.py`` (each has a module-scoped
``pki`` fixture calling :func:`make_pki`).  Folders use the layout libnbd's
``tls-certificates`` and QEMU's ``tls-creds-x509`` share (``ca-cert.pem``,
``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``):

* ``server``: the server's certificate, SAN 127.0.0.1 and localhost;
* ``agent``: CN=backup-agent, signed by the CA (the allowed client);
* ``intruder``: CN=intruder, signed by the CA (valid, but not allow-listed);
* ``nocert``: the CA only, no client certificate;
* ``rogue``: CN=backup-agent signed by another CA.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require, run


@dataclass(frozen=True)
class Pki:
    root: Path
    ca_key: Path
    server: Path
    agent: Path
    intruder: Path
    nocert: Path
    rogue: Path

    @property
    def ca_cert(self) -> Path:
        return self.server / "ca-cert.pem"

    def context(self, client: str | None = "agent") -> ssl.SSLContext:
        """A Python client context trusting the CA, with ``client``'s certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if client is not None:
            folder = getattr(self, client)
            ctx.load_cert_chain(folder / "client-cert.pem", folder / "client-key.pem")
        return ctx


def openssl(*args: str | Path) -> None:
    run(["openssl", *map(str, args)])


def new_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def issue(ca_key: Path, ca_cert: Path, folder: Path, role: str, subject: str, extensions: str) -> None:
    """``folder/{role}-cert.pem`` and ``-key.pem``, signed by the CA, with ``extensions``."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert, csr = folder / f"{role}-key.pem", folder / f"{role}-cert.pem", folder / f"{role}.csr"
    ext = folder / f"{role}.ext"
    ext.write_text(extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", subject)
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)
    csr.unlink()
    ext.unlink()


SERVER_EXT = ("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
              "extendedKeyUsage=clientAuth\n")


def make_pki(root: Path) -> Pki:
    """A CA and the folders of the module docstring under ``root`` (skips without openssl)."""
    require("openssl")
    ca_key, ca_cert = new_ca(root, "nbdfleece-test-ca")
    rogue_key, rogue_cert = new_ca(root, "rogue-ca")
    pki = Pki(root, ca_key, root / "server", root / "agent", root / "intruder", root / "nocert",
              root / "rogue")
    issue(ca_key, ca_cert, pki.server, "server", "/O=nbdfleece test/CN=localhost", SERVER_EXT)
    issue(ca_key, ca_cert, pki.agent, "client", "/O=nbdfleece test/CN=backup-agent", CLIENT_EXT)
    issue(ca_key, ca_cert, pki.intruder, "client", "/O=nbdfleece test/CN=intruder", CLIENT_EXT)
    issue(rogue_key, rogue_cert, pki.rogue, "client", "/O=nbdfleece test/CN=backup-agent", CLIENT_EXT)
    pki.nocert.mkdir()
    for folder in (pki.server, pki.agent, pki.intruder, pki.nocert, pki.rogue):
        (folder / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    return pki
