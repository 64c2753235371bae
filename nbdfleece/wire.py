"""Every NBD wire structure, declared once with construct.

The declarations below are the single source of truth for byte layouts
(``protocol/nbd.md`` cites them by name).  Fixed-size headers that sit on
the hot path (one per request and per reply) are additionally exposed as
``struct.Struct`` codecs *derived* from the construct declaration by
:func:`fixed_codec`, so the layout is still written down only once while a
request costs a single ``unpack_from`` instead of a construct parse.

Variable-length option payloads come from untrusted clients; they are
parsed with construct only after the handshake has buffered the complete
option, and every ``ConstructError`` is turned into ``NBD_REP_ERR_INVALID``
by :func:`parse_option_payload`.
"""

from __future__ import annotations

import struct
from typing import Any

from construct import (
    Bytes,
    Const,
    ConstructError,
    FormatField,
    GreedyBytes,
    GreedyRange,
    Int16ub,
    Int32ub,
    Int64ub,
    PrefixedArray,
    Struct,
    Terminated,
)
from construct import Prefixed as _Prefixed

from nbdfleece.constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Rep,
)
from nbdfleece.errors import OptionError, ProtocolError

# ==========================================================================
# Handshake
# ==========================================================================

greeting = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)

client_flags = Struct("flags" / Int32ub)

option_request_header = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "length" / Int32ub,
)

option_reply_header = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "type" / Int32ub,
    "length" / Int32ub,
)

export_name_reply = Struct(
    "size" / Int64ub,
    "flags" / Int16ub,
)
export_name_padding = Bytes(EXPORT_NAME_PADDING)

# -- NBD_REP_INFO payloads --------------------------------------------------
info_export = Struct("type" / Const(0, Int16ub), "size" / Int64ub, "flags" / Int16ub)
info_name = Struct("type" / Const(1, Int16ub), "name" / GreedyBytes)
info_description = Struct("type" / Const(2, Int16ub), "description" / GreedyBytes)
info_block_size = Struct(
    "type" / Const(3, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)

# -- other option reply payloads ------------------------------------------
rep_server = Struct("name" / _Prefixed(Int32ub, GreedyBytes), "description" / GreedyBytes)
rep_meta_context = Struct("context_id" / Int32ub, "name" / GreedyBytes)

# -- option request payloads ----------------------------------------------
go_request = Struct(
    "name" / _Prefixed(Int32ub, GreedyBytes),
    "info_requests" / PrefixedArray(Int16ub, Int16ub),
    Terminated,
)
meta_context_request = Struct(
    "name" / _Prefixed(Int32ub, GreedyBytes),
    "queries" / PrefixedArray(Int32ub, _Prefixed(Int32ub, GreedyBytes)),
    Terminated,
)

# ==========================================================================
# Transmission
# ==========================================================================

request_header = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)

simple_reply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)

structured_reply_header = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)

# -- structured reply chunk payloads --------------------------------------
offset_data_prefix = Struct("offset" / Int64ub)
offset_hole = Struct("offset" / Int64ub, "length" / Int32ub)
block_descriptor = Struct("length" / Int32ub, "flags" / Int32ub)
block_status_payload = Struct("context_id" / Int32ub, "extents" / GreedyRange(block_descriptor))
error_payload = Struct("error" / Int32ub, "message" / _Prefixed(Int16ub, GreedyBytes))
error_offset_payload = Struct(
    "error" / Int32ub,
    "message" / _Prefixed(Int16ub, GreedyBytes),
    "offset" / Int64ub,
)

# -- fixed prefixes the client reads before a payload's variable part -----
info_type = Struct("type" / Int16ub)
block_status_prefix = Struct("context_id" / Int32ub)
error_prefix = Struct("error" / Int32ub, "message_length" / Int16ub)


# ==========================================================================
# Fast codecs derived from the declarations above
# ==========================================================================


def fixed_codec(fmt: Any) -> struct.Struct:
    """Derive a ``struct.Struct`` from a construct ``Struct`` of fixed fields.

    Only ``FormatField`` members (possibly wrapped in ``Const``) are allowed,
    so anything variable-length is rejected here rather than mis-encoded.
    """
    codes = []
    for sub in fmt.subcons:
        inner = sub.subcon
        if isinstance(inner, Const):
            inner = inner.subcon
        if not isinstance(inner, FormatField):
            raise TypeError(f"{sub.name} is not a fixed-size field")
        codes.append(inner.fmtstr[1:])
    endian = fmt.subcons[0].subcon
    endian = endian.subcon if isinstance(endian, Const) else endian
    return struct.Struct(endian.fmtstr[0] + "".join(codes))


GREETING = fixed_codec(greeting)
CLIENT_FLAGS = fixed_codec(client_flags)
OPTION_REQUEST_HEADER = fixed_codec(option_request_header)
OPTION_REPLY_HEADER = fixed_codec(option_reply_header)
EXPORT_NAME_REPLY = fixed_codec(export_name_reply)
REQUEST_HEADER = fixed_codec(request_header)
SIMPLE_REPLY = fixed_codec(simple_reply)
STRUCTURED_REPLY_HEADER = fixed_codec(structured_reply_header)
OFFSET_DATA_PREFIX = fixed_codec(offset_data_prefix)
OFFSET_HOLE = fixed_codec(offset_hole)
BLOCK_DESCRIPTOR = fixed_codec(block_descriptor)
INFO_EXPORT = fixed_codec(info_export)
INFO_BLOCK_SIZE = fixed_codec(info_block_size)
INFO_TYPE = fixed_codec(info_type)
BLOCK_STATUS_PREFIX = fixed_codec(block_status_prefix)
ERROR_PREFIX = fixed_codec(error_prefix)

# One reply chunk header plus the OFFSET_DATA offset, packed in one call.
STRUCTURED_DATA_HEADER = struct.Struct(
    STRUCTURED_REPLY_HEADER.format + OFFSET_DATA_PREFIX.format.lstrip("<>!=@")
)


def parse_option_payload(fmt: Any, data: bytes) -> Any:
    """Parse an untrusted, complete option payload or refuse it as INVALID."""
    try:
        return fmt.parse(data)
    except ConstructError as exc:
        raise OptionError(Rep.ERR_INVALID, f"malformed option payload: {exc}") from None


def utf8_prefix(text: str, limit: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``limit`` bytes on a character boundary.

    Error messages on the wire must be valid UTF-8: a plain byte slice could
    split a multi-byte character (found by ``tests/fuzz/fuzz_handshake.py``).
    """
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def parse_reply_payload(fmt: Any, data: bytes, what: str) -> Any:
    """Client side: parse an untrusted, complete payload from a server.

    A malformed one is a :class:`ProtocolError` (the server broke a MUST).
    """
    try:
        return fmt.parse(data)
    except ConstructError as exc:
        raise ProtocolError(f"malformed {what} from the server: {exc}") from None


__all__ = [
    "BLOCK_DESCRIPTOR",
    "BLOCK_STATUS_PREFIX",
    "CLIENT_FLAGS",
    "ERROR_PREFIX",
    "EXPORT_NAME_REPLY",
    "GREETING",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "INFO_TYPE",
    "OFFSET_DATA_PREFIX",
    "OFFSET_HOLE",
    "OPTION_REPLY_HEADER",
    "OPTION_REQUEST_HEADER",
    "REQUEST_HEADER",
    "SIMPLE_REPLY",
    "STRUCTURED_DATA_HEADER",
    "STRUCTURED_REPLY_HEADER",
    "block_descriptor",
    "block_status_payload",
    "block_status_prefix",
    "client_flags",
    "error_offset_payload",
    "error_payload",
    "error_prefix",
    "export_name_padding",
    "export_name_reply",
    "fixed_codec",
    "go_request",
    "greeting",
    "info_block_size",
    "info_description",
    "info_export",
    "info_name",
    "info_type",
    "meta_context_request",
    "offset_data_prefix",
    "offset_hole",
    "option_reply_header",
    "option_request_header",
    "parse_option_payload",
    "parse_reply_payload",
    "rep_meta_context",
    "rep_server",
    "request_header",
    "simple_reply",
    "structured_reply_header",
    "utf8_prefix",
]
