"""The pure transmission core: validation, reply layouts, extent shaping."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfleece import wire
from nbdfleece.constants import MAX_BLOCK_SIZE, Cmd, CmdFlag, Errno, ReplyType
from nbdfleece.errors import ProtocolError, RequestError
from nbdfleece.transmission import (
    ExportState,
    Request,
    check_magic,
    error_reply,
    parse_request,
    read_reply,
    shape_extents,
    validate,
)

SIZE = 1 << 20
RW = ExportState(SIZE, False, True, {1: "base:allocation"})
RO = ExportState(SIZE, True, True, {1: "base:allocation"})
SIMPLE = ExportState(SIZE, False, False, {})
NOCTX = ExportState(SIZE, False, True, {})


def req(type_: int, offset: int = 0, length: int = 512, flags: int = 0) -> Request:
    return Request(flags, type_, 7, offset, length)


CASES = [
    # (state, request, errno or None)
    (RW, req(Cmd.READ), None),
    (RW, req(Cmd.READ, SIZE - 512), None),
    (RW, req(Cmd.READ, SIZE - 511), Errno.EINVAL),
    (RW, req(Cmd.READ, length=0), None),
    (RW, req(Cmd.READ, length=MAX_BLOCK_SIZE + 1), Errno.EINVAL),
    (RW, req(Cmd.READ, flags=CmdFlag.DF | CmdFlag.FUA), None),
    (SIMPLE, req(Cmd.READ, flags=CmdFlag.DF), Errno.EINVAL),
    (RW, req(Cmd.READ, flags=CmdFlag.REQ_ONE), Errno.EINVAL),
    (RW, req(Cmd.READ, flags=0x8000), Errno.EINVAL),
    (RW, req(Cmd.READ, flags=0x20), Errno.EINVAL),
    (RW, req(Cmd.WRITE, SIZE - 1, 2), Errno.ENOSPC),
    (RW, req(Cmd.WRITE, flags=CmdFlag.FUA), None),
    (RW, req(Cmd.WRITE, flags=CmdFlag.NO_HOLE), Errno.EINVAL),
    (RO, req(Cmd.WRITE), Errno.EPERM),
    (RO, req(Cmd.WRITE, SIZE, 10), Errno.EPERM),
    (RO, req(Cmd.TRIM), Errno.EPERM),
    (RO, req(Cmd.WRITE_ZEROES), Errno.EPERM),
    (RO, req(Cmd.READ), None),
    (RO, req(Cmd.CACHE), None),
    (RO, req(Cmd.FLUSH, 0, 0), None),
    (RW, req(Cmd.WRITE_ZEROES, SIZE, 1), Errno.ENOSPC),
    (RW, req(Cmd.WRITE_ZEROES, flags=CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO), None),
    (RW, req(Cmd.WRITE_ZEROES, 0, 0xFFFFFFFF), Errno.ENOSPC),
    (RW, req(Cmd.TRIM, SIZE, 1), Errno.EINVAL),
    (RW, req(Cmd.TRIM, 0, SIZE), None),
    (RW, req(Cmd.FLUSH, 1, 0), Errno.EINVAL),
    (RW, req(Cmd.FLUSH, 0, 1), Errno.EINVAL),
    (RW, req(Cmd.BLOCK_STATUS, flags=CmdFlag.REQ_ONE), None),
    (RW, req(Cmd.BLOCK_STATUS, SIZE, 1), Errno.EINVAL),
    (NOCTX, req(Cmd.BLOCK_STATUS), Errno.EINVAL),
    (SIMPLE, req(Cmd.BLOCK_STATUS), Errno.EINVAL),
    (RW, req(Cmd.CACHE, SIZE, 1), Errno.EINVAL),
    (RW, req(99), Errno.EINVAL),
    (RW, req(8), Errno.EINVAL),
]


@pytest.mark.parametrize(("state", "request_", "errno"), CASES)
def test_validate(state: ExportState, request_: Request, errno: Errno | None) -> None:
    if errno is None:
        validate(state, request_)
    else:
        with pytest.raises(RequestError) as info:
            validate(state, request_)
        assert info.value.errno == errno


def test_parse_request_and_magic() -> None:
    raw = struct.pack(">IHHQQI", 0x25609513, 1, Cmd.WRITE, 0xDEADBEEF, 4096, 512)
    r = parse_request(raw)
    assert r == Request(1, Cmd.WRITE, 0xDEADBEEF, 4096, 512)
    assert r.payload_length == 512
    assert parse_request(raw[:6] + struct.pack(">H", Cmd.TRIM) + raw[8:]).payload_length == 0
    with pytest.raises(ProtocolError):
        parse_request(b"IHAV" + raw[4:])
    with pytest.raises(ProtocolError):
        check_magic(b"IHAVEOPT")
    check_magic(raw[:4])


def test_error_replies() -> None:
    assert error_reply(False, 9, Errno.EIO, "x") == struct.pack(">IIQ", 0x67446698, 5, 9)
    chunk = error_reply(True, 9, Errno.EIO, "boom")
    magic, flags, type_, cookie, length = wire.STRUCTURED_REPLY_HEADER.unpack_from(chunk)
    assert (magic, flags, type_, cookie, length) == (0x668E33EF, 1, ReplyType.ERROR, 9, 10)
    assert chunk[20:] == struct.pack(">IH", 5, 4) + b"boom"
    long_chunk = error_reply(True, 9, Errno.EIO, "é" * 5000)
    (msglen,) = struct.unpack_from(">H", long_chunk, 24)
    assert msglen <= 4096


def test_read_reply_chunks() -> None:
    data = memoryview(bytearray(b"a" * 100))
    parts = read_reply(True, 3, 1000, data, [(0, 40, False), (40, 20, True), (60, 40, False)])
    joined = b"".join(bytes(p) for p in parts)
    # chunk 1: OFFSET_DATA 40 bytes at 1000, not done
    assert joined[:28] == struct.pack(">IHHQIQ", 0x668E33EF, 0, 1, 3, 48, 1000)
    assert joined[28:68] == b"a" * 40
    # chunk 2: OFFSET_HOLE 20 at 1040
    assert joined[68:100] == struct.pack(">IHHQIQI", 0x668E33EF, 0, 2, 3, 12, 1040, 20)
    # chunk 3: OFFSET_DATA with DONE
    assert joined[100:128] == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 3, 48, 1060)
    assert len(joined) == 128 + 40
    simple = read_reply(False, 3, 0, data)
    assert bytes(simple[0]) == struct.pack(">IIQ", 0x67446698, 0, 3) and simple[1] is data
    empty = read_reply(True, 3, 0, memoryview(b""))
    assert b"".join(bytes(p) for p in empty) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 3, 0)


def naive_shape(extents: list[tuple[int, int]], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Byte-by-byte reference: expand, clip, re-run-length-encode."""
    flags = [f for n, f in extents for _ in range(n)][:length]
    out: list[tuple[int, int]] = []
    for f in flags:
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + 1, f)
        else:
            out.append((1, f))
    return out[:1] if req_one else out


@settings(max_examples=300, deadline=None)
@given(
    extents=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 3)), min_size=1, max_size=20),
    length=st.integers(1, 600),
    req_one=st.booleans(),
)
def test_shape_extents_matches_reference(
    extents: list[tuple[int, int]], length: int, req_one: bool
) -> None:
    total = sum(n for n, _ in extents)
    length = min(length, total)
    assert shape_extents(extents, length, req_one=req_one) == naive_shape(extents, length, req_one)


def test_shape_extents_edges() -> None:
    assert shape_extents([(4096, 3)], 1000, req_one=True) == [(1000, 3)]
    assert shape_extents([(0, 0), (10, 1)], 5, req_one=False) == [(5, 1)]
    with pytest.raises(ValueError):
        shape_extents([], 5, req_one=False)
