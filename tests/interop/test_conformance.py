"""The public conformance checks (shared/conformance, P1-P10) against the real server.

Each test asserts the lines of the "Expected" section of the folder's README.
The first tests run on ``live_server`` (no bitmap: P1-P4, P7, P9, P10, and
P8's error cases on a read-only export), with the bitmap lines removed.  The
``s0_server`` tests run scenario S0 itself (``live`` carries the bitmap
``bm0``, recording from the start) and check the bitmap lines: P1, P3, P5,
P6 and P8's bitmap window (run against ``live``, which offers ``bm0``; the
read-only-specific lines stay with ``snap`` above).

The folder sits next to the repository checkout (``<root>/shared/conformance``
beside ``<root>/main``); the tests skip when it is absent.  Its scripts need
libnbd's ``nbd`` module, so they run under Debian's ``/usr/bin/python3``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SYSTEM_PYTHON, ServerProcess, make_image, require, run

pytestmark = pytest.mark.interop

CONFORMANCE = Path(__file__).resolve().parents[3] / "shared" / "conformance"
SIZE = 64 << 20

# P4's writes, as qemu-io commands, and the reads that verify them.
P4_WRITES = [
    "write -P 0x11 0 1M",
    "write -P 0x22 1M 64k",
    "write -P 0x33 4M 128k",
    "write -z 8M 64k",
    "write -P 0x44 10485860 1",
]
P4_READS = [
    "read -P 0x11 0 1M",
    "read -P 0x22 1M 64k",
    "read -P 0x33 4M 128k",
    "read -P 0 8M 64k",
    "read -P 0x44 10485860 1",
    "read -P 0 10485861 1",
]
# The image P4 leaves behind (write -z on zeroes adds no data).
P4_DATA = {
    0: b"\x11" * (1 << 20),
    1 << 20: b"\x22" * (64 << 10),
    4 << 20: b"\x33" * (128 << 10),
    10485860: b"\x44",
}


def script(name: str) -> Path:
    path = CONFORMANCE / name
    if not path.is_file():
        pytest.skip(f"conformance checks not found at {CONFORMANCE}")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot import libnbd's nbd module")
    return path


def run_script(name: str, *args: str) -> list[str]:
    return run([SYSTEM_PYTHON, str(script(name)), *args], timeout=60).stdout.splitlines()


def qemu_io(uri: str, commands: list[str], *, readonly: bool = False) -> list[str]:
    require("qemu-io")
    cmd = ["qemu-io", *(["-r"] if readonly else []), "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    out = run([*cmd, uri]).stdout
    assert "Pattern verification failed" not in out
    return out.splitlines()


def p4_writes(uri: str) -> None:
    lines = qemu_io(uri, P4_WRITES)
    assert sum(ln.startswith("wrote") for ln in lines) == 5


@pytest.fixture(autouse=True)
def _conformance_present() -> None:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"conformance checks not found at {CONFORMANCE}")


def test_p1_list(live_server: ServerProcess) -> None:
    require("nbdinfo", "nbd-client", "qemu-nbd")
    out = run(["nbdinfo", "--list", live_server.uri()]).stdout
    picked = [
        ln for ln in out.splitlines()
        if ln.startswith("export=") or any(k in ln for k in ("contexts", "qemu:", "base:"))
    ]
    assert picked == [
        'export="live":', "\tcontexts:", "\t\tbase:allocation",
        'export="snap":', "\tcontexts:", "\t\tbase:allocation",
    ]

    out = run(["nbd-client", "-l", "127.0.0.1", str(live_server.port)]).stdout
    assert out.splitlines()[1:] == ["live: live disk", "snap"]

    out = run(["qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(live_server.port)]).stdout
    lines = [ln.strip() for ln in out.splitlines()]
    picked = [ln for ln in lines if ln.startswith(("export:", "available meta", "base:", "qemu:"))]
    assert picked == [
        "export: 'live'", "available meta contexts: 1", "base:allocation",
        "export: 'snap'", "available meta contexts: 1", "base:allocation",
    ]
    # Reference flags and block sizes.
    assert [ln for ln in lines if ln.startswith("flags:")] == [
        "flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )",
        "flags: 0x58f ( readonly flush fua df multi cache )",
    ]
    for prefix, value in (("min block:", "1"), ("opt block:", "4096"), ("max block:", "33554432")):
        assert [ln.split(":")[1].strip() for ln in lines if ln.startswith(prefix)] == [value] * 2


def test_p2_info(live_server: ServerProcess) -> None:
    require("nbdinfo", "qemu-io")
    live = live_server.uri("live")

    def rc(*args: str) -> int:
        return run(["nbdinfo", *args], check=False).returncode

    assert run(["nbdinfo", "--size", live]).stdout.strip() == "67108864"
    assert rc("--can", "write", live) == 0
    assert rc("--can", "flush", live) == 0
    assert rc("--is", "read-only", live) == 2
    assert rc("--is", "read-only", live_server.uri("snap")) == 0
    proc = run(["nbdinfo", live_server.uri("nosuch")], check=False)
    assert proc.returncode == 1
    assert "server replied with error to opt_go request: No such file or directory" in proc.stderr
    proc = run(["qemu-io", "-f", "raw", "-c", "read 0 1", live_server.uri("nosuch")], check=False)
    assert proc.returncode != 0
    assert "Requested export not available" in proc.stderr


def test_p3_meta_contexts(live_server: ServerProcess) -> None:
    lines = run_script("ctx_list.py", live_server.uri("live"))
    assert lines == [
        "[] -> 1 ['base:allocation']",
        "['qemu:dirty-bitmap:'] -> 0 []",
        "['qemu:'] -> 0 []",
        "['base:allocation'] -> 1 ['base:allocation']",
        "['qemu:dirty-bitmap:nosuch'] -> 0 []",
    ]


def test_p4_data_round_trip(live_server: ServerProcess, tmp_path: Path) -> None:
    uri = live_server.uri("live")
    p4_writes(uri)
    lines = qemu_io(uri, P4_READS, readonly=True)
    assert sum(ln.startswith("read") for ln in lines) == 6
    # And the image file holds exactly P4's data.
    expected = bytearray(SIZE)
    for offset, chunk in P4_DATA.items():
        expected[offset : offset + len(chunk)] = chunk
    assert (tmp_path / "live.raw").read_bytes() == expected


def test_p7_bulk_copy(live_server: ServerProcess, tmp_path: Path) -> None:
    require("nbdcopy", "qemu-img")
    uri = live_server.uri("live")
    p4_writes(uri)
    copy = tmp_path / "c.raw"
    run(["nbdcopy", "--connections=4", uri, str(copy)])
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy), uri])
    assert res.stdout.strip() == "Images are identical."
    assert copy.read_bytes() == (tmp_path / "live.raw").read_bytes()
    qcow2 = tmp_path / "c.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(qcow2)])
    res = run(["qemu-img", "compare", "-F", "raw", str(qcow2), uri])
    assert res.stdout.strip() == "Images are identical."


def test_p8_errors_read_only(server_factory: Any, tmp_path: Path) -> None:
    """P8 on a read-only export holding what ``live`` holds after P4."""
    make_image(tmp_path / "live.raw", SIZE, P4_DATA)
    make_image(tmp_path / "snap.raw", SIZE, P4_DATA)
    server: ServerProcess = server_factory(
        "--export", f"live={tmp_path / 'live.raw'}",
        "--export", f"snap={tmp_path / 'snap.raw'},readonly",
    )
    base = server.uri().rstrip("/")
    lines = run_script("errors_check.py", base, "snap")
    assert lines == [
        "structured_reply True can_meta bm0 False",
        "read-only True can_multi_conn True can_flush True can_fua True",
        "pread past EOF: nbd.Error errno=EINVAL",
        "block_status past EOF: nbd.Error errno=EINVAL",
        "pwrite on read-only export: nbd.Error errno=EPERM",
        "still usable after errors: 22222222",
        "REQ_ONE from 0: {'base:allocation': [1114112, 0]}",
        "REQ_ONE 64k@1M: {'base:allocation': [65536, 0]}",
        # No bitmap yet: base:allocation only, the same boundaries as bm0's.
        "unaligned window 2M@3M+512: {'base:allocation': [1048064, 3, 131072, 0, 918016, 3]}",
        "unknown export: nbd.Error errno=ENOENT",
        "unknown meta ctx requested (ignored): False",
    ]
    # The refused write changed nothing.
    with open(tmp_path / "snap.raw", "rb") as f:
        assert os.pread(f.fileno(), 512, 0) == b"\x11" * 512


def test_p9_multi_conn(live_server: ServerProcess, tmp_path: Path) -> None:
    lines = run_script("multiconn_check.py", live_server.uri("live"))
    assert lines == [
        "can_multi_conn [True, True, True]",
        "cross-connection read-after-flush ok: True",
    ]
    with open(tmp_path / "live.raw", "rb") as f:
        assert f.read(1 << 20) == b"\x03" * (1 << 20)


def test_p10_base_allocation_sanity(live_server: ServerProcess, tmp_path: Path) -> None:
    require("nbdinfo")
    uri = live_server.uri("live")
    p4_writes(uri)
    rows = [ln.split() for ln in run(["nbdinfo", "--map", uri]).stdout.splitlines()]
    image = (tmp_path / "live.raw").read_bytes()
    pos = 0
    for start, length, flags, *_ in rows:
        assert int(start) == pos, rows  # contiguous, in order
        pos += int(length)
        if int(flags) & 2:  # ZERO bit: the range must really read as zeroes
            assert image[int(start) : pos].count(0) == int(length), (start, length, flags)
    assert pos == SIZE
    # Every data write of P4 lies in a range without the ZERO bit.
    for offset in P4_DATA:
        covering = [r for r in rows if int(r[0]) <= offset < int(r[0]) + int(r[1])]
        assert len(covering) == 1 and not int(covering[0][2]) & 2, (offset, covering)
    assert rows[0][:3] == ["0", "1114112", "0"]


# -- scenario S0: live carries bm0 ---------------------------------------------------------

# P5's table: (start, length, flags) of qemu:dirty-bitmap:bm0 after P4.
P5_MAP = [
    (0, 1114112, 1),
    (1114112, 3080192, 0),
    (4194304, 131072, 1),
    (4325376, 4063232, 0),
    (8388608, 65536, 1),  # write-zeroes dirties too
    (8454144, 2031616, 0),
    (10485760, 65536, 1),  # a 1-byte write dirties its whole granule
    (10551296, 56557568, 0),
]


@pytest.fixture
def s0_server(server_factory: Any, tmp_path: Path) -> ServerProcess:
    """Scenario S0: a zeroed 64 MiB ``live`` with ``bm0`` (64 KiB) and a read-only ``snap``."""
    make_image(tmp_path / "live.raw", SIZE)
    make_image(tmp_path / "snap.raw", SIZE)
    server: ServerProcess = server_factory(
        "--export", f"live={tmp_path / 'live.raw'},bitmap=bm0,description=live disk",
        "--export", f"snap={tmp_path / 'snap.raw'},readonly",
    )
    return server


def nbdinfo_rows(uri: str, *args: str) -> list[tuple[int, int, int, str]]:
    require("nbdinfo")
    out = run(["nbdinfo", *args, uri]).stdout
    rows = []
    for ln in out.splitlines():
        start, length, flags, desc = ln.split(maxsplit=3)
        rows.append((int(start), int(length), int(flags), desc))
    return rows


def test_s0_p1_list(s0_server: ServerProcess) -> None:
    require("nbdinfo", "nbd-client", "qemu-nbd")
    out = run(["nbdinfo", "--list", s0_server.uri()]).stdout
    picked = [
        ln for ln in out.splitlines()
        if ln.startswith("export=") or any(k in ln for k in ("contexts", "qemu:", "base:"))
    ]
    assert picked == [
        'export="live":', "\tcontexts:", "\t\tbase:allocation", "\t\tqemu:dirty-bitmap:bm0",
        'export="snap":', "\tcontexts:", "\t\tbase:allocation",
    ]
    out = run(["nbd-client", "-l", "127.0.0.1", str(s0_server.port)]).stdout
    assert out.splitlines()[1:] == ["live: live disk", "snap"]
    out = run(["qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(s0_server.port)]).stdout
    lines = [ln.strip() for ln in out.splitlines()]
    picked = [ln for ln in lines if ln.startswith(("export:", "available meta", "base:", "qemu:"))]
    assert picked == [
        "export: 'live'", "available meta contexts: 2", "base:allocation", "qemu:dirty-bitmap:bm0",
        "export: 'snap'", "available meta contexts: 1", "base:allocation",
    ]
    assert [ln for ln in lines if ln.startswith("flags:")] == [
        "flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )",
        "flags: 0x58f ( readonly flush fua df multi cache )",
    ]


def test_s0_p3_meta_contexts(s0_server: ServerProcess) -> None:
    lines = run_script("ctx_list.py", s0_server.uri("live"))
    assert lines == [
        "[] -> 2 ['base:allocation', 'qemu:dirty-bitmap:bm0']",
        "['qemu:dirty-bitmap:'] -> 1 ['qemu:dirty-bitmap:bm0']",
        "['qemu:'] -> 1 ['qemu:dirty-bitmap:bm0']",
        "['base:allocation'] -> 1 ['base:allocation']",
        "['qemu:dirty-bitmap:nosuch'] -> 0 []",
    ]
    # The read-only export offers no bitmap.
    assert run_script("ctx_list.py", s0_server.uri("snap"))[:3] == [
        "[] -> 1 ['base:allocation']",
        "['qemu:dirty-bitmap:'] -> 0 []",
        "['qemu:'] -> 0 []",
    ]


def test_s0_p5_dirty_bitmap(s0_server: ServerProcess) -> None:
    uri = s0_server.uri("live")
    # Freshly started: all clean.
    assert nbdinfo_rows(uri, "--map=qemu:dirty-bitmap:bm0") == [(0, SIZE, 0, "clean")]
    p4_writes(uri)
    rows = nbdinfo_rows(uri, "--map=qemu:dirty-bitmap:bm0")
    assert rows == [(s, n, f, "dirty" if f else "clean") for s, n, f in P5_MAP]
    # P4's reads change nothing; the Unix socket sees the same map.
    qemu_io(uri, P4_READS, readonly=True)
    assert nbdinfo_rows(s0_server.unix_uri("live"), "--map=qemu:dirty-bitmap:bm0") == rows
    # run_public.sh also prints --totals: bytes, percentage, flags, description.
    out = run(["nbdinfo", "--map=qemu:dirty-bitmap:bm0", "--totals", uri]).stdout
    dirty = sum(n for _, n, f in P5_MAP if f)
    assert [ln.split() for ln in out.splitlines()] == [
        [str(SIZE - dirty), "97.9%", "0", "clean"],
        [str(dirty), "2.1%", "1", "dirty"],
    ]
    assert dirty == 1376256


def test_s0_p6_qemu_img_inverted(s0_server: ServerProcess) -> None:
    require("qemu-img")
    p4_writes(s0_server.uri("live"))
    opts = (
        "driver=nbd,export=live,server.type=inet,server.host=127.0.0.1,"
        f"server.port={s0_server.port},x-dirty-bitmap=qemu:dirty-bitmap:bm0"
    )
    entries = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout)
    expected = []
    for start, length, flags in P5_MAP:
        if flags:  # dirty: QEMU shows it as unallocated
            expected.append({"start": start, "length": length, "depth": 0, "present": False,
                             "zero": False, "data": False})
        else:
            expected.append({"start": start, "length": length, "depth": 0, "present": True,
                             "zero": False, "data": True, "offset": start})
    assert entries == expected


def test_s0_p8_bitmap_window(s0_server: ServerProcess) -> None:
    """errors_check.py against ``live`` (it offers bm0) after P4: the bitmap lines."""
    p4_writes(s0_server.uri("live"))
    lines = run_script("errors_check.py", s0_server.uri().rstrip("/"), "live")
    assert lines == [
        "structured_reply True can_meta bm0 True",
        "read-only False can_multi_conn True can_flush True can_fua True",
        "pread past EOF: nbd.Error errno=EINVAL",
        "block_status past EOF: nbd.Error errno=EINVAL",
        "pwrite on read-only export: ok",  # live is writable: the script's write lands
        "still usable after errors: 22222222",
        "REQ_ONE from 0: {'base:allocation': [1114112, 0], 'qemu:dirty-bitmap:bm0': [1114112, 1]}",
        "REQ_ONE 64k@1M: {'base:allocation': [65536, 0], 'qemu:dirty-bitmap:bm0': [65536, 1]}",
        "unaligned window 2M@3M+512: {'base:allocation': [1048064, 3, 131072, 0, 918016, 3], "
        "'qemu:dirty-bitmap:bm0': [1048064, 0, 131072, 1, 918016, 0]}",
        "unknown export: nbd.Error errno=ENOENT",
        "unknown meta ctx requested (ignored): False",
    ]
    # The script's 512-byte write at 0 lay in an already dirty granule: P5's map stands.
    rows = nbdinfo_rows(s0_server.uri("live"), "--map=qemu:dirty-bitmap:bm0")
    assert [(s, n, f) for s, n, f, _ in rows] == P5_MAP
