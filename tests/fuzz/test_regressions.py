"""What the fuzz targets found, pinned as plain unit tests of the core.

The crashing inputs themselves are in ``regressions/<target>/`` (replayed by
test_corpus_replay.py); these tests state each finding without the targets'
input layouts, so they keep their meaning if a layout changes.
"""

from __future__ import annotations

import struct

from nbdfleece import wire
from nbdfleece.constants import IHAVEOPT, MAX_STRING, Errno, Opt, Rep
from nbdfleece.exports import ExportInfo
from nbdfleece.handshake import NEED_DATA, ServerHandshake
from nbdfleece.transmission import error_reply


class OneExport:
    def lookup(self, name: str) -> ExportInfo | None:
        return ExportInfo("live", 1 << 20, False) if name == "live" else None

    def listing(self) -> list[tuple[str, str]]:
        return [("live", "")]


def test_option_error_for_a_long_multibyte_name_is_utf8() -> None:
    """fuzz_handshake: NBD_REP_ERR_UNKNOWN for a 4095-byte name of 3-byte characters
    carried "export '...' not present" cut at byte 4096, in the middle of a character."""
    name = ("€" * 1365).encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    hs = ServerHandshake(OneExport())
    hs.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO, len(payload)) + payload)
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()[wire.GREETING.size :]
    _, option, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(out)
    assert (option, rep) == (Opt.GO, Rep.ERR_UNKNOWN)
    message = out[wire.OPTION_REPLY_HEADER.size :]
    assert len(message) == length <= MAX_STRING
    assert message.decode("utf-8").startswith("export '€€€")


def test_error_chunk_message_is_cut_on_a_character_boundary() -> None:
    """fuzz_framer: an ERROR chunk's message was cut at 4096 bytes mid-character."""
    for text in ("\ufffd" * 2000, "a" + "€" * 2000, "é" * 3000, "a\udc80" * 3000):
        reply = error_reply(True, 7, Errno.EIO, text)
        payload = wire.error_payload.parse(reply[wire.STRUCTURED_REPLY_HEADER.size :])
        assert payload.error == Errno.EIO
        assert MAX_STRING - 3 < len(payload.message) <= MAX_STRING
        payload.message.decode("utf-8")


def test_utf8_prefix() -> None:
    assert wire.utf8_prefix("abc", 10) == b"abc"
    assert wire.utf8_prefix("a€", 3) == b"a"
    assert wire.utf8_prefix("a€", 4) == "a€".encode()
    assert wire.utf8_prefix("\udc80x", 10) == b"?x"
