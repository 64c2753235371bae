"""Interop with real NBD clients: QEMU, libnbd (tools and Python binding), nbd-client.

Every test talks to the real server process (see ``tests/conftest.py``) and
checks exact results: byte contents (often straight from the image file the
server writes), extent lists, exit codes and the lines the clients print.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, libnbd, make_image, require, run

pytestmark = pytest.mark.interop

MiB = 1 << 20
KiB = 1 << 10
LIVE_SIZE = 64 * MiB
MAX_BLOCK = 32 * MiB

# A 16 MiB sparse image with two data runs: 1 MiB at 1 MiB, 1 MiB at 5 MiB.
SPARSE_SIZE = 16 * MiB
SPARSE_DATA = {
    1 * MiB: bytes(range(256)) * (MiB // 256),
    5 * MiB: b"\x5a" * MiB,
}
# (start, length, data) of that image as base:allocation must describe it.
SPARSE_RUNS = [
    (0, 1 * MiB, False),
    (1 * MiB, 1 * MiB, True),
    (2 * MiB, 3 * MiB, False),
    (5 * MiB, 1 * MiB, True),
    (6 * MiB, 10 * MiB, False),
]


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def expected_sparse_bytes() -> bytes:
    image = bytearray(SPARSE_SIZE)
    for offset, chunk in SPARSE_DATA.items():
        image[offset : offset + len(chunk)] = chunk
    return bytes(image)


def uri_for(server: ServerProcess, transport: str, export: str) -> str:
    return server.uri(export) if transport == "tcp" else server.unix_uri(export)


@pytest.fixture
def sparse_server(server_factory: Any, tmp_path: Path) -> ServerProcess:
    """Export ``disk`` = the sparse 16 MiB image, ``scratch`` = 16 MiB of 0xff (rw)."""
    make_image(tmp_path / "disk.raw", SPARSE_SIZE, SPARSE_DATA)
    make_image(tmp_path / "scratch.raw", SPARSE_SIZE, {0: b"\xff" * SPARSE_SIZE})
    server: ServerProcess = server_factory(
        "--export", f"disk={tmp_path / 'disk.raw'}",
        "--export", f"scratch={tmp_path / 'scratch.raw'}",
    )
    return server


def qemu_io(uri: str, *commands: str, readonly: bool = False,
            check: bool = True) -> list[str]:
    """Run qemu-io commands on ``uri``; the result lines that report an operation."""
    require("qemu-io")
    cmd = ["qemu-io", "-f", "raw"]
    if readonly:
        cmd.append("-r")
    for c in commands:
        cmd += ["-c", c]
    proc = run([*cmd, uri], check=check)
    return proc.stdout.splitlines()


def op_lines(lines: list[str]) -> list[str]:
    """Only the "wrote/read/discard N/N bytes at offset O" lines."""
    return [ln for ln in lines if ln.startswith(("wrote ", "read ", "discard "))]


# -- qemu-img ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_img_info(live_server: ServerProcess, transport: str) -> None:
    require("qemu-img")
    uri = uri_for(live_server, transport, "live")
    out = run(["qemu-img", "info", "--output=json", uri]).stdout
    info = json.loads(out)
    assert info["virtual-size"] == LIVE_SIZE
    assert info["format"] == "raw"
    human = run(["qemu-img", "info", uri]).stdout
    assert "virtual size: 64 MiB (67108864 bytes)" in human


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_img_map_exact(sparse_server: ServerProcess, transport: str) -> None:
    require("qemu-img")
    uri = uri_for(sparse_server, transport, "disk")
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout
    got = [
        {k: e[k] for k in ("start", "length", "data", "zero")} for e in json.loads(out)
    ]
    expected = [
        {"start": s, "length": n, "data": data, "zero": not data} for s, n, data in SPARSE_RUNS
    ]
    assert got == expected


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_img_convert_and_compare(
    sparse_server: ServerProcess, tmp_path: Path, transport: str
) -> None:
    require("qemu-img")
    uri = uri_for(sparse_server, transport, "disk")
    src = tmp_path / "disk.raw"
    out_raw = tmp_path / "out.raw"
    out_qcow2 = tmp_path / "out.qcow2"

    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out_raw)])
    assert out_raw.read_bytes() == expected_sparse_bytes()
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out_raw), str(src)])
    assert res.stdout.strip() == "Images are identical."

    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(out_qcow2)])
    res = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out_qcow2), uri])
    assert res.stdout.strip() == "Images are identical."
    res = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out_qcow2), str(src)])
    assert res.stdout.strip() == "Images are identical."

    # nbd vs file, both ways round, and a mismatch is really seen.
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(src)])
    assert res.stdout.strip() == "Images are identical."
    with open(out_raw, "r+b") as f:
        f.seek(5 * MiB + 12800)
        f.write(b"\x00")
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(out_raw)], check=False)
    assert res.returncode == 1, res
    assert res.stdout.strip() == f"Content mismatch at offset {5 * MiB + 12800}!"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_img_convert_into_server(
    sparse_server: ServerProcess, tmp_path: Path, transport: str
) -> None:
    """``convert -n`` into an export full of 0xff: data written, holes zeroed."""
    require("qemu-img")
    uri = uri_for(sparse_server, transport, "scratch")
    src = tmp_path / "disk.raw"
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    assert (tmp_path / "scratch.raw").read_bytes() == expected_sparse_bytes()
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(src)])
    assert res.stdout.strip() == "Images are identical."


# -- qemu-io -----------------------------------------------------------------


def test_qemu_io_patterns_and_unaligned(live_server: ServerProcess, tmp_path: Path) -> None:
    uri = live_server.uri("live")
    image = tmp_path / "live.raw"
    lines = qemu_io(
        uri,
        "write -P 0xab 0 64k",
        "write -P 0xcd 1M 128k",
        "write -P 0x01 10485861 1",
        "write -P 0x02 10485863 1",
        "write -P 0x03 4095 3",
        "flush",
    )
    assert op_lines(lines) == [
        "wrote 65536/65536 bytes at offset 0",
        "wrote 131072/131072 bytes at offset 1048576",
        "wrote 1/1 bytes at offset 10485861",
        "wrote 1/1 bytes at offset 10485863",
        "wrote 3/3 bytes at offset 4095",
    ]
    # The image file itself, after the server flushed.
    assert read_file(image, 0, 4095) == b"\xab" * 4095
    assert read_file(image, 4095, 4) == b"\x03\x03\x03\xab"
    assert read_file(image, 4098, 64 * KiB - 4098) == b"\xab" * (64 * KiB - 4098)
    assert read_file(image, 64 * KiB, 16) == bytes(16)
    assert read_file(image, MiB, 128 * KiB) == b"\xcd" * (128 * KiB)
    assert read_file(image, 10485860, 5) == b"\x00\x01\x00\x02\x00"

    lines = qemu_io(
        uri,
        "read -P 0xab 0 4095",
        "read -P 0x03 4095 3",
        "read -P 0xcd 1M 128k",
        "read -P 0 10485860 1",
        "read -P 0x01 10485861 1",
        "read -P 0 10485862 1",
        "read -P 0x02 10485863 1",
        "read -P 0 10485864 1",
        readonly=True,
    )
    assert "Pattern verification failed" not in "\n".join(lines)
    assert op_lines(lines) == [
        "read 4095/4095 bytes at offset 0",
        "read 3/3 bytes at offset 4095",
        "read 131072/131072 bytes at offset 1048576",
        "read 1/1 bytes at offset 10485860",
        "read 1/1 bytes at offset 10485861",
        "read 1/1 bytes at offset 10485862",
        "read 1/1 bytes at offset 10485863",
        "read 1/1 bytes at offset 10485864",
    ]

    # read -P really verifies: a wrong pattern is reported and fails.
    require("qemu-io")
    proc = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 10485861 1", uri], check=False)
    assert "Pattern verification failed at offset 10485861, 1 bytes" in proc.stdout
    assert proc.returncode == 1


def test_qemu_io_zero_discard_fua(live_server: ServerProcess, tmp_path: Path) -> None:
    uri = live_server.uri("live")
    image = tmp_path / "live.raw"
    make_image(image, LIVE_SIZE, {0: b"\x77" * (8 * MiB)})  # same size: the server's fd stays valid
    lines = qemu_io(
        uri,
        "write -z 1M 64k",          # WRITE_ZEROES with NO_HOLE
        "write -z -u 2M 1M",        # WRITE_ZEROES, may deallocate
        "discard 4M 1M",            # TRIM
        "write -f -P 0x5e 6M 4k",   # WRITE with FUA
        "write -z -f 7M 4k",        # WRITE_ZEROES with FUA
        "flush",
    )
    assert op_lines(lines) == [
        "wrote 65536/65536 bytes at offset 1048576",
        "wrote 1048576/1048576 bytes at offset 2097152",
        "discard 1048576/1048576 bytes at offset 4194304",
        "wrote 4096/4096 bytes at offset 6291456",
        "wrote 4096/4096 bytes at offset 7340032",
    ]
    assert read_file(image, 0, MiB) == b"\x77" * MiB
    assert read_file(image, MiB, 64 * KiB) == bytes(64 * KiB)
    assert read_file(image, MiB + 64 * KiB, 64 * KiB) == b"\x77" * (64 * KiB)
    assert read_file(image, 2 * MiB, MiB) == bytes(MiB)
    assert read_file(image, 3 * MiB, MiB) == b"\x77" * MiB
    # The server implements TRIM by punching a hole: it reads back as zeroes.
    assert read_file(image, 4 * MiB, MiB) == bytes(MiB)
    assert read_file(image, 5 * MiB, MiB) == b"\x77" * MiB
    assert read_file(image, 6 * MiB, 4 * KiB) == b"\x5e" * (4 * KiB)
    assert read_file(image, 6 * MiB + 4 * KiB, 4 * KiB) == b"\x77" * (4 * KiB)
    assert read_file(image, 7 * MiB, 4 * KiB) == bytes(4 * KiB)
    assert read_file(image, 7 * MiB + 4 * KiB, MiB - 4 * KiB) == b"\x77" * (MiB - 4 * KiB)

    lines = qemu_io(
        uri,
        "read -P 0 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0 4M 1M",
        "read -P 0x5e 6M 4k",
        "read -P 0 7M 4k",
        "read -P 0x77 8388607 1",
        "read -P 0 8M 1",
        readonly=True,
    )
    assert "Pattern verification failed" not in "\n".join(lines)
    assert len(op_lines(lines)) == 7

    # What -u and discard deallocated, base:allocation reports as a hole.
    require("nbdinfo")
    rows = [ln.split() for ln in run(["nbdinfo", "--map", uri]).stdout.splitlines()]
    holes = [(int(r[0]), int(r[1])) for r in rows if r[2] == "3"]
    for start, length in ((2 * MiB, MiB), (4 * MiB, MiB)):
        assert any(s <= start and start + length <= s + n for s, n in holes), rows


def test_qemu_io_unknown_export(live_server: ServerProcess) -> None:
    require("qemu-io")
    proc = run(["qemu-io", "-f", "raw", "-c", "read 0 1", live_server.uri("nosuch")], check=False)
    assert proc.returncode == 1
    assert "Requested export not available" in proc.stderr


# -- nbdinfo -----------------------------------------------------------------


def parse_nbdinfo_list(text: str) -> dict[str, dict[str, str]]:
    exports: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("export="):
            current = exports.setdefault(json.loads(line[len("export=") :].rstrip(":")), {})
        elif current is not None and line.startswith("\t\t"):
            current["context-list"] = current.get("context-list", "") + line.strip() + " "
        elif current is not None and line.startswith("\t") and ":" in line:
            key, _, value = line.strip().partition(":")
            current[key] = value.strip()
    return exports


def test_nbdinfo_list(live_server: ServerProcess) -> None:
    require("nbdinfo")
    out = run(["nbdinfo", "--list", live_server.uri()]).stdout
    exports = parse_nbdinfo_list(out)
    assert sorted(exports) == ["live", "snap"]
    live, snap = exports["live"], exports["snap"]
    assert live["description"] == "live disk"
    assert "description" not in snap
    assert "\t\tbase:allocation" in out
    for e in (live, snap):
        assert e["export-size"] == "67108864 (64M)"
        assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
            "1", "4096", "33554432",
        )
        assert e["context-list"].split() == ["base:allocation"]
    assert live["is_read_only"] == "false"
    assert snap["is_read_only"] == "true"
    for key in ("can_cache", "can_df", "can_flush", "can_fua", "can_multi_conn"):
        assert (live[key], snap[key]) == ("true", "true"), key
    for key in ("can_trim", "can_zero", "can_fast_zero"):
        assert (live[key], snap[key]) == ("true", "false"), key
    assert live["uri"] == live_server.uri("live")


def test_nbdinfo_map_exact(sparse_server: ServerProcess) -> None:
    require("nbdinfo")
    out = run(["nbdinfo", "--map", sparse_server.uri("disk")]).stdout
    rows = [ln.split() for ln in out.splitlines()]
    assert rows == [
        [str(s), str(n), "0", "data"] if data else [str(s), str(n), "3", "hole,zero"]
        for s, n, data in SPARSE_RUNS
    ]
    totals = run(["nbdinfo", "--map", "--totals", sparse_server.uri("disk")]).stdout
    assert [ln.split() for ln in totals.splitlines()] == [
        ["2097152", "12.5%", "0", "data"],
        ["14680064", "87.5%", "3", "hole,zero"],
    ]


CAN_LIVE = ["write", "flush", "trim", "zero", "fast-zero", "cache", "df", "multi-conn", "fua"]


def test_nbdinfo_can_and_is(live_server: ServerProcess) -> None:
    require("nbdinfo")
    live, snap = live_server.uri("live"), live_server.uri("snap")

    def rc(*args: str) -> int:
        return run(["nbdinfo", *args], check=False).returncode

    for what in CAN_LIVE:
        assert rc("--can", what, live) == 0, what
    for what in ("flush", "cache", "df", "multi-conn", "fua"):
        assert rc("--can", what, snap) == 0, what
    for what in ("write", "trim", "zero", "fast-zero"):
        assert rc("--can", what, snap) == 2, what
    assert rc("--is", "read-only", snap) == 0
    assert rc("--is", "read-only", live) == 2
    assert rc("--is", "rotational", live) == 2
    assert rc(live_server.uri("nosuch")) == 1
    assert rc("--size", live_server.uri("nosuch")) == 1
    assert run(["nbdinfo", "--size", live]).stdout == "67108864\n"
    assert run(["nbdinfo", "--size", snap]).stdout == "67108864\n"
    proc = run(["nbdinfo", live_server.uri("nosuch")], check=False)
    assert "No such file or directory" in proc.stderr


# -- nbdcopy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "opts", [["--connections=4"], ["--connections=1", "--requests=1"]], ids=["conn4", "conn1-req1"]
)
def test_nbdcopy_random_both_ways(
    server_factory: Any, tmp_path: Path, opts: list[str]
) -> None:
    require("nbdcopy")
    src_data = os.urandom(LIVE_SIZE)
    make_image(tmp_path / "src.raw", LIVE_SIZE, {0: src_data})
    make_image(tmp_path / "dst.raw", LIVE_SIZE)
    server: ServerProcess = server_factory(
        "--export", f"src={tmp_path / 'src.raw'},readonly",
        "--export", f"dst={tmp_path / 'dst.raw'}",
    )
    # server -> file
    out = tmp_path / "out.raw"
    run(["nbdcopy", *opts, server.uri("src"), str(out)])
    assert out.stat().st_size == LIVE_SIZE
    assert out.read_bytes() == src_data
    # file -> server
    upload = os.urandom(LIVE_SIZE)
    make_image(tmp_path / "upload.raw", LIVE_SIZE, {0: upload})
    run(["nbdcopy", *opts, "--flush", str(tmp_path / "upload.raw"), server.uri("dst")])
    assert (tmp_path / "dst.raw").read_bytes() == upload


def test_nbdcopy_sparse(sparse_server: ServerProcess, tmp_path: Path) -> None:
    require("nbdcopy")
    expected = expected_sparse_bytes()
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=4", sparse_server.uri("disk"), str(out)])
    assert out.read_bytes() == expected
    # Sparse file into an export full of 0xff: the holes must become zeroes.
    run(["nbdcopy", "--connections=4", str(tmp_path / "disk.raw"), sparse_server.uri("scratch")])
    assert (tmp_path / "scratch.raw").read_bytes() == expected
    # And server -> server.
    make_image(tmp_path / "scratch.raw", SPARSE_SIZE, {0: b"\xee" * SPARSE_SIZE})
    run(["nbdcopy", sparse_server.uri("disk"), sparse_server.uri("scratch")])
    assert (tmp_path / "scratch.raw").read_bytes() == expected


# -- nbd-client and qemu-nbd listings ------------------------------------------


def test_nbd_client_list(live_server: ServerProcess) -> None:
    require("nbd-client")
    proc = run(["nbd-client", "-l", "127.0.0.1", str(live_server.port)])
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Negotiation: ")
    assert lines[1:] == ["live: live disk", "snap"]


def test_qemu_nbd_list(live_server: ServerProcess) -> None:
    require("qemu-nbd")
    out = run(["qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(live_server.port)]).stdout
    lines = [ln.strip() for ln in out.splitlines()]
    assert lines[0] == "exports available: 2"
    live_at, snap_at = lines.index("export: 'live'"), lines.index("export: 'snap'")
    live, snap = lines[live_at:snap_at], lines[snap_at:]
    assert live == [
        "export: 'live'",
        "description: live disk",
        "size:  67108864",
        "flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "available meta contexts: 1",
        "base:allocation",
    ]
    assert snap == [
        "export: 'snap'",
        "size:  67108864",
        "flags: 0x58f ( readonly flush fua df multi cache )",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "available meta contexts: 1",
        "base:allocation",
    ]


# -- libnbd Python binding ---------------------------------------------------


def connect(uri: str, *, contexts: tuple[str, ...] = (), strict: int | None = None) -> Any:
    nbd = libnbd()
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h


def extents_of(h: Any, count: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}

    def cb(ctx: str, off: int, entries: list[int], err: Any) -> int:
        assert off == offset
        seen[ctx] = list(entries)
        return 0

    h.block_status(count, offset, cb, flags)
    return seen


def errnum_of(call: Any) -> int:
    nbd = libnbd()
    with pytest.raises(nbd.Error) as info:
        call()
    return int(info.value.errnum)


def test_libnbd_data_commands(live_server: ServerProcess, tmp_path: Path) -> None:
    nbd = libnbd()
    image = tmp_path / "live.raw"
    h = connect(live_server.uri("live"), contexts=("base:allocation",))
    try:
        assert h.get_size() == LIVE_SIZE
        assert not h.is_read_only()
        assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
        assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_multi_conn()
        assert h.can_meta_context("base:allocation")

        data = bytes((i * 7) & 0xFF for i in range(4 * MiB))
        h.pwrite(data, 0)
        assert h.pread(4 * MiB, 0) == data
        assert h.pread(3, 4095) == data[4095:4098]
        h.pwrite(b"\xfe", 12345, nbd.CMD_FLAG_FUA)
        h.flush()
        expected = bytearray(data)
        expected[12345] = 0xFE
        assert read_file(image, 0, 4 * MiB) == expected

        # TRIM of 1 MiB: punched, reads zero, base:allocation says hole+zero.
        h.trim(MiB, MiB)
        assert h.pread(MiB, MiB) == bytes(MiB)
        assert extents_of(h, MiB, MiB) == {"base:allocation": [MiB, 3]}

        # Zeroing without deallocation, with fast zero, with both.
        h.zero(64 * KiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.zero(64 * KiB, 2 * MiB + 128 * KiB, nbd.CMD_FLAG_FAST_ZERO)
        h.zero(64 * KiB, 2 * MiB + 256 * KiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
        h.zero(1, 3 * MiB + 1, nbd.CMD_FLAG_FUA)  # unaligned, 1 byte
        for off, n in ((2 * MiB, 64 * KiB), (2 * MiB + 128 * KiB, 64 * KiB),
                       (2 * MiB + 256 * KiB, 64 * KiB), (3 * MiB + 1, 1)):
            expected[off : off + n] = bytes(n)
        expected[MiB : 2 * MiB] = bytes(MiB)
        assert h.pread(4 * MiB, 0) == expected
        h.flush()
        assert read_file(image, 0, 4 * MiB) == expected

        # CACHE is accepted; a DF read comes back as exactly one data chunk.
        h.cache(4 * MiB, 0)
        chunks: list[tuple[int, int, int]] = []

        def chunk_cb(subbuf: bytes, offset: int, status: int, err: Any) -> int:
            chunks.append((offset, len(subbuf), status))
            return 0

        window = (MiB - 64 * KiB, 256 * KiB)  # data, then the trimmed hole
        got = h.pread_structured(window[1], window[0], chunk_cb, nbd.CMD_FLAG_DF)
        assert got == bytes(expected[window[0] : window[0] + window[1]])
        assert chunks == [(window[0], window[1], nbd.READ_DATA)]
        chunks.clear()
        got = h.pread_structured(window[1], window[0], chunk_cb)
        assert got == bytes(expected[window[0] : window[0] + window[1]])
        assert sorted(chunks) == [
            (window[0], 64 * KiB, nbd.READ_DATA),
            (MiB, 192 * KiB, nbd.READ_HOLE),
        ]
        # A sparse read (holes sent as OFFSET_HOLE) of the same region.
        assert h.pread(8 * MiB, 0) == bytes(expected) + bytes(4 * MiB)
    finally:
        h.shutdown()


def test_libnbd_block_status_exact(sparse_server: ServerProcess) -> None:
    nbd = libnbd()
    h = connect(sparse_server.uri("disk"), contexts=("base:allocation",))
    try:
        flat: list[int] = []
        for _, n, data in SPARSE_RUNS:
            flat += [n, 0 if data else 3]
        assert extents_of(h, SPARSE_SIZE, 0) == {"base:allocation": flat}
        # Unaligned window, clipped to the request.
        assert extents_of(h, 2 * MiB, MiB + 512) == {
            "base:allocation": [MiB - 512, 0, MiB + 512, 3]
        }
        # REQ_ONE: exactly one extent starting at the offset.
        assert extents_of(h, SPARSE_SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == {
            "base:allocation": [MiB, 3]
        }
        assert extents_of(h, 4 * MiB, 5 * MiB + 4096, nbd.CMD_FLAG_REQ_ONE) == {
            "base:allocation": [MiB - 4096, 0]
        }
        assert extents_of(h, 1, SPARSE_SIZE - 1) == {"base:allocation": [1, 3]}
        # Past the end is EINVAL (strict off so the server judges).
        h.set_strict_mode(0)
        assert errnum_of(lambda: h.block_status(4096, SPARSE_SIZE, lambda *a: 0)) == 22
        assert h.pread(4, MiB) == b"\x00\x01\x02\x03"
    finally:
        h.shutdown()


def test_libnbd_aio_pipelining(live_server: ServerProcess, tmp_path: Path) -> None:
    nbd = libnbd()
    h = connect(live_server.uri("live"))
    chunk = 64 * KiB
    count = 64
    try:
        blocks = [os.urandom(chunk) for _ in range(count)]
        offsets = [i * (chunk + 1) for i in range(count)]  # unaligned, adjacent
        cookies = [
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), off)
            for b, off in zip(blocks, offsets, strict=True)
        ]
        assert h.aio_in_flight() > 1  # really pipelined, not one at a time
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        bufs = [nbd.Buffer(chunk) for _ in range(count)]
        cookies = [h.aio_pread(buf, off) for buf, off in zip(bufs, offsets, strict=True)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        for buf, b in zip(bufs, blocks, strict=True):
            assert bytes(buf.to_bytearray()) == b
        h.flush()
        for off, b in zip(offsets, blocks, strict=True):
            assert read_file(tmp_path / "live.raw", off, chunk) == b
    finally:
        h.shutdown()


def test_libnbd_opt_mode(live_server: ServerProcess) -> None:
    nbd = libnbd()
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(live_server.uri("live"))
    try:
        listed: list[tuple[str, str]] = []
        assert h.opt_list(lambda name, desc: listed.append((name, desc))) == 2
        assert listed == [("live", "live disk"), ("snap", "")]

        h.set_export_name("live")
        h.opt_info()
        assert h.get_size() == LIVE_SIZE
        assert h.get_export_description() == "live disk"
        assert h.get_canonical_export_name() == "live"
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 33554432
        assert not h.is_read_only()

        h.set_export_name("snap")
        h.opt_info()
        assert h.is_read_only()
        assert h.get_canonical_export_name() == "snap"

        h.set_export_name("nosuch")
        assert errnum_of(h.opt_info) == 2  # ENOENT

        h.set_export_name("live")
        ctxs: list[str] = []
        assert h.opt_list_meta_context(lambda name: ctxs.append(name)) == 1
        assert ctxs == ["base:allocation"]
        h.add_meta_context("base:allocation")
        h.opt_go()
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context("base:allocation")
        assert h.pread(16, 0) == bytes(16)
    finally:
        h.shutdown()


def test_libnbd_simple_replies(live_server: ServerProcess, tmp_path: Path) -> None:
    nbd = libnbd()
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(live_server.uri("live"))
    try:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()
        assert h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
        data = os.urandom(MiB)
        h.pwrite(data, 7 * MiB + 3)
        assert h.pread(MiB, 7 * MiB + 3) == data
        assert h.pread(2 * MiB, 6 * MiB)[MiB + 3 : 2 * MiB] == data[: MiB - 3]
        h.zero(4096, 7 * MiB + 3, nbd.CMD_FLAG_NO_HOLE)
        h.flush()
        assert read_file(tmp_path / "live.raw", 7 * MiB, 4099 + 8) == (
            bytes(4099) + data[4096 : 4096 + 8]
        )
        # An error through a simple reply leaves the connection usable.
        h.set_strict_mode(0)
        assert errnum_of(lambda: h.pread(4096, LIVE_SIZE - 2048)) == 22
        assert h.pread(8, 7 * MiB + 4099) == data[4096 : 4096 + 8]
    finally:
        h.shutdown()


def test_libnbd_multi_conn(live_server: ServerProcess) -> None:
    cs = [connect(live_server.uri("live")) for _ in range(3)]
    try:
        assert [c.can_multi_conn() for c in cs] == [True, True, True]
        payload = os.urandom(MiB)
        cs[1].pwrite(payload, 3 * MiB)
        cs[2].flush()
        assert cs[0].pread(MiB, 3 * MiB) == payload
        cs[0].pwrite(b"\x42" * 4096, 3 * MiB)
        cs[1].flush()
        assert cs[2].pread(4096, 3 * MiB) == b"\x42" * 4096
    finally:
        for c in cs:
            c.shutdown()


def test_libnbd_maximum_request_size(live_server: ServerProcess, tmp_path: Path) -> None:
    h = connect(live_server.uri("live"))
    try:
        data = os.urandom(MAX_BLOCK)
        h.pwrite(data, MiB)
        assert h.pread(MAX_BLOCK, MiB) == data
        h.flush()
        assert read_file(tmp_path / "live.raw", MiB, MAX_BLOCK) == data
        h.set_strict_mode(0)
        assert errnum_of(lambda: h.pread(MAX_BLOCK + 1, 0)) == 22
        assert errnum_of(lambda: h.pwrite(b"\x01" * (MAX_BLOCK + 1), 0)) == 22
        # Still usable, and the refused write changed nothing.
        assert h.pread(MAX_BLOCK, MiB) == data
        assert h.pread(MiB, 0) == bytes(MiB)
    finally:
        h.shutdown()


# -- raw socket: NBD_OPT_EXPORT_NAME and simple replies --------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def send_request(
    sock: socket.socket, type_: int, cookie: int, offset: int, length: int, payload: bytes = b""
) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, type_, cookie, offset, length) + payload)


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC
    return error, cookie


@pytest.mark.parametrize(
    ("export", "client_flags", "tflags"),
    [("live", 1, 0x0D6D), ("live", 3, 0x0D6D), ("snap", 1, 0x050F)],
    ids=["live-zeroes", "live-no-zeroes", "snap-zeroes"],
)
def test_raw_export_name(
    live_server: ServerProcess, tmp_path: Path, export: str, client_flags: int, tflags: int
) -> None:
    make_image(tmp_path / f"{export}.raw", LIVE_SIZE, {MiB: b"fleece!!"})
    with live_server.connect() as sock:
        magic, opt_magic, hflags = struct.unpack(">QQH", recv_exact(sock, 18))
        assert (magic, opt_magic, hflags) == (NBDMAGIC, IHAVEOPT, 0x0003)
        name = export.encode()
        sock.sendall(struct.pack(">I", client_flags) + struct.pack(">QII", IHAVEOPT, 1, len(name))
                     + name)
        size, flags = struct.unpack(">QH", recv_exact(sock, 10))
        assert size == LIVE_SIZE
        assert flags == tflags
        if not client_flags & 2:
            assert recv_exact(sock, 124) == bytes(124)
        # READ with a simple reply (no structured replies were negotiated).
        send_request(sock, 0, 0x1111, MiB - 4, 16)
        assert simple_reply(sock) == (0, 0x1111)
        assert recv_exact(sock, 16) == bytes(4) + b"fleece!!" + bytes(4)
        # WRITE: ok on live, EPERM on snap; then an out-of-range READ is EINVAL.
        send_request(sock, 1, 0x2222, 100, 4, b"abcd")
        assert simple_reply(sock) == ((0 if export == "live" else 1), 0x2222)
        send_request(sock, 0, 0x3333, LIVE_SIZE - 2, 4)
        assert simple_reply(sock) == (22, 0x3333)
        send_request(sock, 0, 0x4444, 98, 8)
        assert simple_reply(sock) == (0, 0x4444)
        expected = bytes(2) + b"abcd" + bytes(2) if export == "live" else bytes(8)
        assert recv_exact(sock, 8) == expected
        send_request(sock, 2, 0x5555, 0, 0)  # NBD_CMD_DISC: the server closes
        sock.settimeout(10)
        assert sock.recv(1) == b""


def test_raw_export_name_unknown(live_server: ServerProcess) -> None:
    """A failed EXPORT_NAME can only be answered by closing the connection."""
    with live_server.connect() as sock:
        recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, 6) + b"nosuch")
        assert sock.recv(1) == b""
    assert "EXPORT_NAME refused" in live_server.log()


def test_backup_tool_export_names(server_factory: Any, tmp_path: Path) -> None:
    """Names backup tools use work with QEMU's and libnbd's clients alike."""
    require("nbdinfo", "qemu-img")
    names = ["sda", "vda", "backup-sda", "virtnbdbackup.0"]
    args: list[str] = []
    for i, name in enumerate(names):
        make_image(tmp_path / f"{i}.raw", (i + 1) * MiB)
        args += ["--export", f"{name}={tmp_path / f'{i}.raw'}"]
    server: ServerProcess = server_factory(*args)
    for i, name in enumerate(names):
        assert run(["nbdinfo", "--size", server.uri(name)]).stdout == f"{(i + 1) * MiB}\n"
        info = json.loads(run(["qemu-img", "info", "--output=json", server.unix_uri(name)]).stdout)
        assert info["virtual-size"] == (i + 1) * MiB


@pytest.mark.parametrize("hflags", [0, 2], ids=["oldstyle-flags-0", "no-zeroes-only"])
def test_libnbd_non_fixed_newstyle(live_server: ServerProcess, hflags: int) -> None:
    """Without FIXED_NEWSTYLE libnbd can only use NBD_OPT_EXPORT_NAME: still served."""
    nbd = libnbd()
    h = nbd.NBD()
    h.set_handshake_flags(hflags)
    h.connect_uri(live_server.uri("live"))
    try:
        assert h.get_protocol() == "newstyle"
        assert not h.get_structured_replies_negotiated()
        assert h.get_size() == LIVE_SIZE
        assert h.can_flush() and h.can_multi_conn() and not h.can_df()
        h.pwrite(b"old", 1000)
        assert h.pread(5, 999) == b"\x00old\x00"
    finally:
        h.shutdown()
