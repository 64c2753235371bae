"""TLS for NBD: the policy the handshake enforces, and the credentials the edge loads.

Two halves, kept apart so the protocol core stays free of I/O:

* **policy** (pure): :class:`TlsMode`, :class:`DistinguishedName` (client
  certificate subjects and the allow-list patterns matched against them) and
  :class:`TlsPolicy`, which the sans-I/O handshake consults;
* **credentials** (reads files, once): :class:`TlsSettings` as the command
  line and the config file give them, and :func:`load_server_tls`, which
  turns them into a :class:`ServerTls` -- an :class:`ssl.SSLContext` plus its
  policy -- at start-up or at QMP ``object-add``, never per connection.

Certificate folders use the layout QEMU's ``tls-creds-x509`` and libnbd's
``tls-certificates`` share: ``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem`` (and ``ca-crl.pem`` when present).
"""

from __future__ import annotations

import enum
import os
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbdfleece.errors import ConfigError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
PSK_FILE = "keys.psk"


class TlsMode(enum.Enum):
    """The spec's server modes: NOTLS, SELECTIVETLS and FORCEDTLS."""

    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


# -- distinguished names ---------------------------------------------------------------

_LONG_TO_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
    "serialNumber": "SERIALNUMBER",
    "surname": "SN",
    "givenName": "GN",
    "title": "TITLE",
}
_ALIASES = {
    **{long.upper(): short for long, short in _LONG_TO_SHORT.items()},
    **{short: short for short in _LONG_TO_SHORT.values()},
    "E": "EMAIL",
    "S": "ST",
}
_SPECIAL = ',+"\\<>;='


def _attribute(name: str) -> str:
    """Canonical attribute type: ``commonName``, ``cn`` and ``CN`` are all ``CN``."""
    return _ALIASES.get(name.strip().upper(), name.strip().upper())


def _split_unescaped(text: str, separators: str) -> list[str]:
    """Split at separators not preceded by a backslash; escapes stay in the parts."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in separators:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(value: str) -> str:
    """RFC 4514 value escapes: ``\\,`` and friends, and ``\\HH`` hex bytes."""
    raw = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c != "\\":
            raw += c.encode()
            i += 1
            continue
        if i + 1 >= len(value):
            raise ValueError(f"dangling backslash in {value!r}")
        pair = value[i + 1 : i + 3]
        if len(pair) == 2 and all(h in "0123456789abcdefABCDEF" for h in pair):
            raw.append(int(pair, 16))
            i += 3
        else:
            raw += value[i + 1].encode()
            i += 2
    return raw.decode("utf-8")


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in _SPECIAL else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


@dataclass(frozen=True, slots=True)
class DistinguishedName:
    """A certificate subject, or an allow-list pattern, as (attribute, value) pairs.

    Pairs are kept in RFC 4514 order (the most specific, usually ``CN``,
    first), which is how QEMU and GnuTLS print subjects.  A subject
    *matches* a pattern when it has every pair of the pattern: ``CN=agent``
    matches any certificate whose common name is ``agent``;
    ``CN=agent,O=Example`` also requires the organisation.
    """

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> DistinguishedName:
        """``CN=agent,O=Example`` (RFC 4514) or ``/O=Example/CN=agent`` (OpenSSL's ``-subj``)."""
        text = text.strip()
        slashed = text.startswith("/")
        parts = _split_unescaped(text[1:], "/") if slashed else _split_unescaped(text, ",+")
        pairs = []
        for part in parts:
            pieces = _split_unescaped(part, "=")
            if len(pieces) < 2 or not pieces[0].strip():
                raise ValueError(f"subject {text!r}: {part.strip()!r} is not ATTRIBUTE=VALUE")
            value = _unescape(part[len(pieces[0]) + 1 :].strip())  # may hold an unescaped '='
            if not value:
                raise ValueError(f"subject {text!r}: {part.strip()!r} has an empty value")
            pairs.append((_attribute(pieces[0]), value))
        if slashed:
            pairs.reverse()  # OpenSSL's one-line form lists the least specific first
        return cls(tuple(pairs))

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> DistinguishedName | None:
        """The subject of :meth:`ssl.SSLObject.getpeercert`'s dictionary (None: no certificate)."""
        if not cert or "subject" not in cert:
            return None
        pairs = [(_attribute(k), str(v)) for rdn in cert["subject"] for k, v in rdn]
        pairs.reverse()
        return cls(tuple(pairs))

    def matches(self, pattern: DistinguishedName) -> bool:
        return all(pair in self.pairs for pair in pattern.pairs)

    def __str__(self) -> str:
        return ",".join(f"{k}={_escape(v)}" for k, v in self.pairs)


# -- policy (what the handshake enforces) ---------------------------------------------


@dataclass(frozen=True)
class TlsPolicy:
    """Which exports need TLS, and which client subjects may use which export.

    An export with an allow-list is TLS-only (a plaintext client has no
    certificate to match).  Exports are named as configured; the handshake
    applies the policy to the export a name *resolves* to.
    """

    mode: TlsMode = TlsMode.OFF
    tls_only: frozenset[str] = frozenset()
    allow: Mapping[str, tuple[DistinguishedName, ...]] = field(default_factory=dict)

    def needs_tls(self, export: str) -> bool:
        return self.mode is TlsMode.REQUIRED or export in self.tls_only or export in self.allow

    def permits(self, export: str, peer: DistinguishedName | None) -> bool:
        """Whether a client with subject ``peer`` (None: no certificate) may use ``export``."""
        patterns = self.allow.get(export)
        if patterns is None:
            return True
        return peer is not None and any(peer.matches(p) for p in patterns)

    def with_mode(self, mode: TlsMode) -> TlsPolicy:
        return TlsPolicy(mode, self.tls_only, self.allow)


# -- credentials (what the edge loads) ------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """A listener's TLS: the context every connection's handshake uses, and the policy."""

    context: ssl.SSLContext
    policy: TlsPolicy
    verify_peer: bool
    """Client certificates are required and checked against a CA."""
    description: str
    """For the logs: where the credentials came from."""

    def with_policy(self, policy: TlsPolicy) -> ServerTls:
        return ServerTls(self.context, policy, self.verify_peer, self.description)


@dataclass(frozen=True)
class TlsSettings:
    """TLS as configured (flags, ``[tls]`` in the config file); nothing loaded yet."""

    mode: TlsMode | None = None
    """None: ``required`` when credentials are given, else ``off``."""
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    """Verify client certificates against this CA (and require one)."""
    creds_dir: str | None = None
    """QEMU/libnbd layout; explicit cert/key/ca override its files."""
    psk: str | None = None
    """A ``keys.psk`` file of ``identity:hexkey`` lines (psktool's format)."""

    def has_credentials(self) -> bool:
        return any((self.cert, self.key, self.ca, self.creds_dir, self.psk))

    def effective_mode(self) -> TlsMode:
        if self.mode is not None:
            return self.mode
        return TlsMode.REQUIRED if self.has_credentials() else TlsMode.OFF

    def merged(self, override: TlsSettings) -> TlsSettings:
        """``override``'s fields where set (flags over the config file)."""
        return TlsSettings(**{
            name: getattr(override, name) if getattr(override, name) is not None else getattr(self, name)
            for name in ("mode", "cert", "key", "ca", "creds_dir", "psk")
        })


def x509_server_context(cert: str, key: str, ca: str | None = None, crl: str | None = None
                        ) -> ssl.SSLContext:
    """TLS >= 1.2 server context; with ``ca``, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {_reason(exc)}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA certificate {ca}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if crl is not None:
            try:
                ctx.load_verify_locations(cafile=crl)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS CRL {crl}: {_reason(exc)}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def read_psk_file(path: str) -> dict[str, bytes]:
    """``identity:hexkey`` per line, as psktool, nbdkit and QEMU's ``keys.psk``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read PSK file {path}: {_reason(exc)}") from None
    keys: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        identity, sep, hexkey = line.strip().rpartition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not identity or not key:
            raise ConfigError(f"{path}:{number}: expected IDENTITY:HEXKEY")
        keys[identity] = key
    if not keys:
        raise ConfigError(f"PSK file {path} has no keys")
    return keys


def psk_supported() -> str | None:
    """None when this Python can serve TLS-PSK, else why not."""
    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        version = ".".join(map(str, sys.version_info[:3]))
        return (f"TLS-PSK needs Python 3.13 or later (ssl.SSLContext.set_psk_server_callback); "
                f"this is Python {version}. Use X.509 certificates instead")
    if not getattr(ssl, "HAS_PSK", False):
        return "this Python's OpenSSL was built without PSK support"
    return None


def psk_server_context(keys: Mapping[str, bytes]) -> ssl.SSLContext:
    """A context that accepts exactly the identities in ``keys`` (Python >= 3.13)."""
    problem = psk_supported()
    if problem is not None:
        raise ConfigError(problem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("PSK")

    def lookup(identity: str | None) -> bytes:
        return keys.get(identity or "", b"")  # empty: unknown identity, handshake fails

    # The stubs for this project's Python (3.11) do not have the 3.13 method.
    ctx.set_psk_server_callback(lookup)  # type: ignore[attr-defined,unused-ignore]
    return ctx


def creds_dir_files(directory: str) -> tuple[str, str, str | None, str | None]:
    """(cert, key, ca or None, crl or None) of a QEMU/libnbd server credentials folder."""
    def path(name: str) -> str:
        return os.path.join(directory, name)

    for name in (SERVER_CERT, SERVER_KEY):
        if not os.path.exists(path(name)):
            raise ConfigError(f"Unable to access credentials {path(name)}: No such file or directory")
    ca = path(CA_CERT) if os.path.exists(path(CA_CERT)) else None
    crl = path(CA_CRL) if ca is not None and os.path.exists(path(CA_CRL)) else None
    return path(SERVER_CERT), path(SERVER_KEY), ca, crl


def load_server_tls(
    settings: TlsSettings,
    *,
    tls_only: Iterable[str] = (),
    allow: Mapping[str, Sequence[str]] | None = None,
) -> ServerTls | None:
    """Check the settings against the exports' TLS options and load the credentials.

    Returns None for ``off``.  Every inconsistency is a :class:`ConfigError`
    at start-up rather than a surprise at the first connection.
    """
    mode = settings.effective_mode()
    tls_only = frozenset(tls_only)
    allow = {name: patterns for name, patterns in (allow or {}).items() if patterns}
    if mode is TlsMode.OFF:
        if settings.has_credentials():
            raise ConfigError("TLS credentials are given but --tls is off")
        for name in sorted(tls_only | set(allow)):
            raise ConfigError(f"export '{name}': tls-only and tls-allow need --tls optional or required")
        return None
    patterns: dict[str, tuple[DistinguishedName, ...]] = {}
    for name, texts in allow.items():
        try:
            patterns[name] = tuple(DistinguishedName.parse(t) for t in texts)
        except ValueError as exc:
            raise ConfigError(f"export '{name}': tls-allow: {exc}") from None
    policy = TlsPolicy(mode, tls_only, patterns)
    x509 = (settings.cert, settings.key, settings.ca, settings.creds_dir)
    if settings.psk is not None:
        if any(x509):
            raise ConfigError("--tls-psk cannot be combined with X.509 credentials")
        if patterns:
            raise ConfigError("tls-allow needs client certificates; PSK clients have none")
        context = psk_server_context(read_psk_file(settings.psk))
        return ServerTls(context, policy, False, f"PSK keys {settings.psk}")
    cert, key, ca, crl = settings.cert, settings.key, settings.ca, None
    if settings.creds_dir is not None:
        d_cert, d_key, d_ca, crl = creds_dir_files(settings.creds_dir)
        cert, key = cert or d_cert, key or d_key
        if ca is None:
            ca = d_ca
        else:
            crl = None
    if not cert or not key:
        raise ConfigError(f"--tls {mode.value} needs a certificate and its key "
                          "(--tls-cert and --tls-key, or --tls-creds-dir), or --tls-psk")
    if patterns and ca is None:
        raise ConfigError("tls-allow needs client certificate verification (--tls-ca, or "
                          f"{CA_CERT} in --tls-creds-dir)")
    context = x509_server_context(cert, key, ca, crl)
    verified = f", client certificates verified against {ca}" if ca else ""
    return ServerTls(context, policy, ca is not None, f"X.509 {cert}{verified}")


CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


def client_context(directory: str, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context from a libnbd/QEMU client folder, for ``nbdfleece.client`` and agents.

    ``ca-cert.pem`` (required) verifies the server; ``client-cert.pem`` and
    ``client-key.pem``, when present, are presented to servers that want a
    client certificate.  Over a Unix socket there is no host name to check:
    pass ``check_hostname=False`` (the CA still vouches for the server).
    """
    ca = os.path.join(directory, CA_CERT)
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS CA certificate {ca}: {_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    cert, key = os.path.join(directory, CLIENT_CERT), os.path.join(directory, CLIENT_KEY)
    if os.path.exists(cert):
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS client certificate {cert}: {_reason(exc)}") from None
    return ctx


@dataclass(frozen=True)
class TlsCredsObject:
    """A QMP ``tls-creds-x509`` / ``tls-creds-psk`` object, as ``object-add`` made it.

    Server-endpoint credentials are loaded at once (so a bad folder fails
    ``object-add``, as in QEMU); client-endpoint ones are only recorded, for
    ``nbd-server-start`` to refuse them with QEMU's message.
    """

    id: str
    qom_type: str
    endpoint: str
    dir: str
    server: ServerTls | None


def load_creds_object(object_id: str, qom_type: str, directory: str, endpoint: str,
                      verify_peer: bool) -> TlsCredsObject:
    """QEMU's checks and texts: ``ca-cert.pem`` is required for X.509, whatever the endpoint."""
    def path(name: str) -> str:
        return os.path.join(directory, name)

    def need(name: str) -> str:
        if not os.path.exists(path(name)):
            raise ConfigError(f"Unable to access credentials {path(name)}: No such file or directory")
        return path(name)

    server: ServerTls | None = None
    if qom_type == "tls-creds-psk":
        keys = need(PSK_FILE)
        if endpoint == "server":
            server = ServerTls(psk_server_context(read_psk_file(keys)), TlsPolicy(TlsMode.REQUIRED),
                               False, f"PSK keys {keys} (object {object_id})")
        return TlsCredsObject(object_id, qom_type, endpoint, directory, server)
    ca = need(CA_CERT)
    if endpoint == "server":
        cert, key = need(SERVER_CERT), need(SERVER_KEY)
        crl = path(CA_CRL) if verify_peer and os.path.exists(path(CA_CRL)) else None
        context = x509_server_context(cert, key, ca if verify_peer else None, crl)
        verified = f", client certificates verified against {ca}" if verify_peer else ""
        server = ServerTls(context, TlsPolicy(TlsMode.REQUIRED), verify_peer,
                           f"X.509 {cert}{verified} (object {object_id})")
    return TlsCredsObject(object_id, qom_type, endpoint, directory, server)


def queued_alert(stream: object) -> bytes:
    """The TLS alert OpenSSL queued when a server-side handshake failed, or b"".

    trio's ``SSLStream`` (0.35; python-trio/trio#3413) raises on a failed
    handshake without sending what OpenSSL left in its outgoing memory BIO --
    the alert saying why (TLS 1.3 ``certificate_required``, ``unknown_ca``,
    ``certificate_revoked``...) -- so the client would see a bare TCP close.
    The BIO is a private attribute: when it is not there, b"" (a bare close).
    """
    outgoing = getattr(stream, "_outgoing", None)
    if isinstance(outgoing, ssl.MemoryBIO) and outgoing.pending:
        return outgoing.read()
    return b""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library})" if exc.library else str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def describe_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, from trio's wrapper down to OpenSSL's reason."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
