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
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from nbdfleece.constants import MAX_STRING
from nbdfleece.errors import ConfigError
from nbdfleece.server import Limits

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

    def __post_init__(self) -> None:
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
class ServerConfig:
    listen: tuple[str, ...] = ()
    exports: tuple[ExportConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    bitmaps: tuple[BitmapConfig, ...] = ()
    qmp: tuple[str, ...] = ()
    data_dir: str = DEFAULT_DATA_DIR
    """Where snapshot overlays (and the default QMP socket) live."""


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


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ConfigError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number << (10 * " KMGTP".index(unit or " "))


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME=PATH[,readonly][,create=SIZE][,bitmap=NAME]...[,allocation-depth][,description=TEXT]``.

    ``description=`` must come last: its text runs to the end, commas included.
    """
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(f"--export wants NAME=PATH[,options], not {spec!r}")
    description = ""
    head, sep, tail = rest.partition(",description=")
    if sep:
        description = tail
    path, *options = head.split(",")
    readonly, create, depth = False, None, False
    bitmaps: list[str] = []
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
        else:
            raise ConfigError(f"unknown export option {option!r} in {spec!r}")
    return ExportConfig(name, path, readonly, description, create, tuple(bitmaps), depth)


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
    unknown = set(doc) - {"listen", "export", "limits", "qmp"}
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
                             "allocation-depth"}
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
        ))
    limits = Limits()
    raw_limits = doc.get("limits", {})
    known = {f.name for f in fields(Limits)}
    if not isinstance(raw_limits, dict) or set(raw_limits) - known:
        raise ConfigError(f"{path}: [limits] keys must be among {sorted(known)}")
    if raw_limits:
        limits = Limits(**{k: type(getattr(limits, k))(v) for k, v in raw_limits.items()})
    qmp = doc.get("qmp", [])
    if isinstance(qmp, str):
        qmp = [qmp]
    return ServerConfig(tuple(listen), tuple(exports), limits, qmp=tuple(qmp))
