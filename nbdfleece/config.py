"""Server configuration: command-line flags and TOML files, validated, no I/O.

A config file looks like::

    listen = ["127.0.0.1:10809", "unix:/run/nbdfleece.sock"]

    [limits]
    handshake_timeout = 10
    request_timeout = 30
    idle_timeout = 0

    [[export]]
    name = "live"
    path = "live.raw"          # relative to the config file
    readonly = false
    description = "the live disk"
    create = "64M"              # create a sparse image of this size if missing
    bitmaps = ["bm0"]           # offered as qemu:dirty-bitmap:bm0 (created if missing)
    allocation-depth = false    # offer qemu:allocation-depth

    tls-only = false            # with [tls] mode = "optional": refuse plaintext clients
    tls-allow = ["CN=backup-agent"]  # only clients whose certificate subject matches one

    [tls]                       # paths relative to the config file, as export paths
    mode = "required"           # off | optional | required
    creds-dir = "pki"           # ca-cert.pem, server-cert.pem, server-key.pem (QEMU/libnbd)
    # cert = "server-cert.pem", key = "server-key.pem", ca = "ca-cert.pem", psk = "keys.psk"

    [[fault]]                   # fault injection on the node of an export (tests, drills)
    node = "live"
    ops = ["write"]
    errno = "ENOSPC"
    probability = 0.01
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from nbdfleece.block.faults import FaultSpec, FaultSpecError, spec_from_options
from nbdfleece.constants import MAX_STRING
from nbdfleece.errors import ConfigError
from nbdfleece.server import Limits
from nbdfleece.tls import DistinguishedName, TlsMode, TlsSettings

DEFAULT_LISTEN = "127.0.0.1:10809"
DEFAULT_DATA_DIR = "nbdfleece-data"
DEMO_EXPORT = "demo"
DEMO_SIZE = 1 << 30

_SIZE_RE = re.compile(r"^(\d+)([KMGTP]?)(i?B)?$", re.IGNORECASE)


@dataclass(frozen=True)
class ExportConfig:
    name: str
    path: str
    readonly: bool = False
    description: str = ""
    create: int | None = None
    """Create a sparse image of this many bytes when ``path`` is missing."""
    bitmaps: tuple[str, ...] = ()
    """Bitmaps offered as ``qemu:dirty-bitmap:NAME`` (created recording if missing)."""
    allocation_depth: bool = False
    tls_only: bool = False
    """With ``--tls optional``: INFO/GO before STARTTLS are refused TLS_REQD."""
    tls_allow: tuple[str, ...] = ()
    """Client certificate subject patterns allowed to use the export (TLS-only too)."""

    def __post_init__(self) -> None:
        for pattern in self.tls_allow:
            try:
                DistinguishedName.parse(pattern)
            except ValueError as exc:
                raise ConfigError(f"export '{self.name}': tls-allow: {exc}") from None
        if len(self.name.encode()) > MAX_STRING or "\0" in self.name:
            raise ConfigError(f"export name {self.name[:40]!r}... is not a valid NBD string")
        if len(self.description.encode()) > MAX_STRING:
            raise ConfigError(f"description of export '{self.name}' is longer than 4096 bytes")
        if not self.path:
            raise ConfigError(f"export '{self.name}' has no path")


@dataclass(frozen=True)
class BitmapConfig:
    """A bitmap declared at start-up on the node of an export."""

    node: str
    name: str
    granularity: int | None = None
    persistent: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class FaultConfig:
    """A fault-injection rule on the node of an export (``--fault``, ``[[fault]]``)."""

    node: str
    spec: FaultSpec


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ()
    exports: tuple[ExportConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    bitmaps: tuple[BitmapConfig, ...] = ()
    qmp: tuple[str, ...] = ()
    data_dir: str = DEFAULT_DATA_DIR
    """Where snapshot overlays (and the default QMP socket) live."""
    faults: tuple[FaultConfig, ...] = ()
    tls: TlsSettings = field(default_factory=TlsSettings)
    allow_plaintext_network: bool = False
    """Serve without TLS on non-loopback TCP addresses (refused otherwise)."""


def parse_bitmap_spec(spec: str) -> BitmapConfig:
    """``NODE:NAME[,granularity=SIZE][,persistent][,disabled]`` (NODE: an export name)."""
    head, *options = spec.split(",")
    node, sep, name = head.partition(":")
    if not sep or not node or not name:
        raise ConfigError(f"--bitmap wants NODE:NAME[,options], not {spec!r}")
    granularity, persistent, disabled = None, False, False
    for option in options:
        key, _, value = option.partition("=")
        if key == "granularity" and value:
            granularity = parse_size(value)
        elif key == "persistent" and not value:
            persistent = True
        elif key == "disabled" and not value:
            disabled = True
        else:
            raise ConfigError(f"unknown bitmap option {option!r} in {spec!r}")
    return BitmapConfig(node, name, granularity, persistent, disabled)


def parse_range(text: str) -> tuple[int, int]:
    """``START-END`` (sizes, END exclusive) or ``START+LENGTH`` -> ``(start, end)``."""
    for sep in ("+", "-"):
        start, found, rest = text.partition(sep)
        if found:
            first, second = parse_size(start), parse_size(rest)
            return (first, first + second) if sep == "+" else (first, second)
    raise ConfigError(f"a range is START-END or START+LENGTH, not {text!r}")


def parse_fault_spec(spec: str) -> FaultConfig:
    """``NODE:OPS[,errno=E][,p=P][,range=START-END]...[,after=N][,once|count=N][,delay=S]
    [,partial][,seed=N]``; OPS joined with ``+`` (``write+flush``, ``all``)."""
    head, *options = spec.split(",")
    node, sep, ops = head.partition(":")
    if not sep or not node or not ops:
        raise ConfigError(f"--fault wants NODE:OPS[,options], not {spec!r}")
    values: dict[str, object] = {"ops": ops.split("+")}
    ranges: list[tuple[int, int]] = []
    aliases = {"p": "probability", "probability": "probability", "errno": "errno", "after": "after",
               "count": "count", "delay": "delay", "seed": "seed"}
    for option in options:
        key, eq, value = option.partition("=")
        if key == "range" and value:
            ranges.append(parse_range(value))
        elif key in ("once", "partial") and not eq:
            values[key] = True
        elif key in aliases and value and aliases[key] not in values:
            values[aliases[key]] = value if key == "errno" else _number(value, option)
        else:
            raise ConfigError(f"unknown or repeated fault option {option!r} in {spec!r}")
    values["ranges"] = ranges
    try:
        return FaultConfig(node, spec_from_options(values))
    except FaultSpecError as exc:
        raise ConfigError(f"--fault {spec!r}: {exc}") from None


def _number(text: str, option: str) -> float | int:
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"not a number in fault option {option!r}") from None


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ConfigError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number << (10 * " KMGTP".index(unit or " "))


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME=PATH[,readonly][,create=SIZE][,bitmap=NAME]...[,allocation-depth][,tls-only]
    [,tls-allow=SUBJECT]...[,description=TEXT]``.

    ``description=`` must come last: its text runs to the end, commas included.
    A ``tls-allow`` subject of several attributes is written in OpenSSL's slash
    form (``/O=Example/CN=agent``), since commas separate the options.
    """
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(f"--export wants NAME=PATH[,options], not {spec!r}")
    description = ""
    head, sep, tail = rest.partition(",description=")
    if sep:
        description = tail
    path, *options = head.split(",")
    readonly, create, depth, tls_only = False, None, False, False
    bitmaps: list[str] = []
    tls_allow: list[str] = []
    for option in options:
        key, _, value = option.partition("=")
        if key in ("readonly", "ro") and not value:
            readonly = True
        elif key == "create" and value:
            create = parse_size(value)
        elif key == "bitmap" and value:
            bitmaps.append(value)
        elif key == "allocation-depth" and not value:
            depth = True
        elif key == "tls-only" and not value:
            tls_only = True
        elif key == "tls-allow" and value:
            tls_allow.append(value)
        else:
            raise ConfigError(f"unknown export option {option!r} in {spec!r}")
    return ExportConfig(name, path, readonly, description, create, tuple(bitmaps), depth,
                        tls_only=tls_only, tls_allow=tuple(tls_allow))


def load_file(path: str) -> ServerConfig:
    """Read a TOML config file; paths in it are relative to its folder."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(doc) - {"listen", "export", "limits", "qmp", "fault", "tls", "allow-plaintext-network"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    listen = doc.get("listen", [])
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not all(isinstance(x, str) for x in listen):
        raise ConfigError(f"{path}: listen must be a string or a list of strings")
    exports = []
    for item in doc.get("export", []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{path}: every [[export]] needs a name")
        extra = set(item) - {"name", "path", "readonly", "description", "create", "bitmaps",
                             "allocation-depth", "tls-only", "tls-allow"}
        if extra:
            raise ConfigError(f"{path}: export '{item['name']}': unknown keys {sorted(extra)}")
        create = item.get("create")
        exports.append(ExportConfig(
            name=item["name"],
            path=os.path.join(base, str(item.get("path", ""))) if item.get("path") else "",
            readonly=bool(item.get("readonly", False)),
            description=str(item.get("description", "")),
            create=parse_size(str(create)) if create is not None else None,
            bitmaps=tuple(str(b) for b in item.get("bitmaps", [])),
            allocation_depth=bool(item.get("allocation-depth", False)),
            tls_only=bool(item.get("tls-only", False)),
            tls_allow=_string_list(path, f"export '{item['name']}': tls-allow", item.get("tls-allow", [])),
        ))
    limits = Limits()
    raw_limits = doc.get("limits", {})
    known = {f.name for f in fields(Limits)}
    if not isinstance(raw_limits, dict) or set(raw_limits) - known:
        raise ConfigError(f"{path}: [limits] keys must be among {sorted(known)}")
    if raw_limits:
        try:
            limits = Limits(**{k: type(getattr(limits, k))(v) for k, v in raw_limits.items()})
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"{path}: [limits]: {exc}") from None
    qmp = doc.get("qmp", [])
    if isinstance(qmp, str):
        qmp = [qmp]
    faults = tuple(_fault_table(path, item) for item in doc.get("fault", []))
    return ServerConfig(tuple(listen), tuple(exports), limits, qmp=tuple(qmp), faults=faults,
                        tls=_tls_table(path, base, doc.get("tls", {})),
                        allow_plaintext_network=_flag(path, doc, "allow-plaintext-network"))


def _flag(path: str, table: dict[str, object], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {key} must be true or false")
    return value


def _string_list(path: str, what: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {what} must be a string or a list of strings")
    return tuple(value)


def parse_tls_mode(text: str) -> TlsMode:
    try:
        return TlsMode(text)
    except ValueError:
        raise ConfigError(f"TLS mode must be off, optional or required, not {text!r}") from None


def _tls_table(path: str, base: str, table: object) -> TlsSettings:
    """``[tls]``: mode, and credential paths relative to the config file."""
    keys = {"mode", "cert", "key", "ca", "creds-dir", "psk"}
    if not isinstance(table, dict) or set(table) - keys:
        raise ConfigError(f"{path}: [tls] keys must be among {sorted(keys)}")
    if not all(isinstance(v, str) and v for v in table.values()):
        raise ConfigError(f"{path}: [tls] values must be non-empty strings")
    paths = {k.replace("-", "_"): os.path.join(base, v) for k, v in table.items() if k != "mode"}
    mode = parse_tls_mode(table["mode"]) if "mode" in table else None
    return TlsSettings(mode=mode, **paths)


def _fault_table(path: str, item: object) -> FaultConfig:
    """One ``[[fault]]``: ``node`` plus the rule keys of ``spec_from_options``;
    ``ranges`` are ``"START-END"`` strings, ``errno`` a name or a number."""
    if not isinstance(item, dict) or not isinstance(item.get("node"), str):
        raise ConfigError(f"{path}: every [[fault]] needs a node")
    options = {k: v for k, v in item.items() if k != "node"}
    try:
        ranges = options.get("ranges", [])
        if not isinstance(ranges, list) or not all(isinstance(r, str) for r in ranges):
            raise ConfigError("ranges must be a list of \"START-END\" strings")
        options["ranges"] = [parse_range(r) for r in ranges]
        if isinstance(options.get("ops"), str):
            options["ops"] = [options["ops"]]
        return FaultConfig(item["node"], spec_from_options(options))
    except (ConfigError, FaultSpecError) as exc:
        raise ConfigError(f"{path}: fault on '{item['node']}': {exc}") from None
