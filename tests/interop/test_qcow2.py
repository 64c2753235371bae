"""qcow2 images exchanged with QEMU's own tools.

* images this driver writes pass ``qemu-img check`` (no errors, no leaks)
  and read back in QEMU exactly as a bytearray model (``qemu-img compare``,
  ``qemu-img convert -O raw``);
* images ``qemu-img create`` makes and ``qemu-io`` fills read back here as
  QEMU reads them, with matching allocation (``qemu-img map``);
* a fleecing overlay made by ``qemu-img create -f qcow2 -b live.raw -F raw``
  opens here with its backing file from the header.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nbdfleece.block.node import BlockNode
from nbdfleece.block.qcow2 import Qcow2Node, create_qcow2, open_qcow2
from nbdfleece.constants import AllocationState
from tests.conftest import make_image, require, run

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("qemu-img", "qemu-io")


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


async def read_all(node: BlockNode) -> bytes:
    buf = bytearray(node.size)
    view = memoryview(buf)
    for off in range(0, node.size, MiB):
        await node.read(off, view[off : off + MiB])
    return bytes(buf)


def qemu_check(path: Path) -> dict[str, object]:
    """``qemu-img check``: must find no corruption and no leak."""
    proc = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    assert proc.returncode == 0, f"qemu-img check exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    report: dict[str, object] = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    assert report.get("check-errors", 0) == 0
    return report


def qemu_raw(path: Path, tmp_path: Path, fmt: str = "qcow2") -> bytes:
    out = tmp_path / f"{path.name}.converted.raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def qemu_compare(path: Path, model: bytes, tmp_path: Path) -> None:
    model_path = tmp_path / "model.raw"
    model_path.write_bytes(model)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(model_path)])


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for cmd in commands:
        args += ["-c", cmd]
    proc = run([*args, str(path)])
    assert "error" not in proc.stdout.lower() + proc.stderr.lower(), proc.stdout + proc.stderr


# -- our images in QEMU ------------------------------------------------------------------------


async def apply_random_ops(node: Qcow2Node, model: bytearray, seed: int, count: int) -> None:
    rng = random.Random(seed)
    size, cs = node.size, node.cluster_size
    for i in range(count):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 4 * cs + 2), size - offset)
        kind = rng.random()
        if kind < 0.6:
            data = pattern(seed * 1000 + i, length)
            await node.write(offset, memoryview(data))
            model[offset : offset + length] = data
        elif kind < 0.8:
            await node.write_zeroes(offset, length, may_trim=rng.random() < 0.5)
            model[offset : offset + length] = bytes(length)
        else:
            await node.trim(offset, length)
            first = -(-offset // cs)
            for c in range(first, -(-size // cs)):
                lo, hi = c * cs, min((c + 1) * cs, size)
                if hi <= offset + length:
                    model[lo:hi] = bytes(hi - lo)


@pytest.mark.parametrize(
    ("cluster_size", "size"), [(512, 3 * MiB + 512), (4096, 8 * MiB), (65536, 5 * MiB + 1536)]
)
async def test_our_image_passes_qemu_check(tmp_path: Path, cluster_size: int, size: int) -> None:
    path = tmp_path / "ours.qcow2"
    create_qcow2(path, size, cluster_size=cluster_size)
    qemu_check(path)
    model = bytearray(size)
    node = open_qcow2(path)
    try:
        await apply_random_ops(node, model, cluster_size, 150)
    finally:
        await node.close()
    qemu_check(path)
    assert qemu_raw(path, tmp_path) == model
    qemu_compare(path, bytes(model), tmp_path)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == "1.1"


async def test_our_grown_refcount_table_passes_qemu_check(tmp_path: Path) -> None:
    path = tmp_path / "grow.qcow2"
    size = 20 * MiB
    create_qcow2(path, size, cluster_size=512)
    node = open_qcow2(path)
    data = pattern(1, size)
    try:
        first = node.header.refcount_table_offset
        for off in range(0, size, 2 * MiB):
            await node.write(off, memoryview(data[off : off + 2 * MiB]))
        assert node.header.refcount_table_offset != first
    finally:
        await node.close()
    qemu_check(path)
    assert qemu_raw(path, tmp_path) == data


async def test_our_overlay_with_backing(tmp_path: Path) -> None:
    base = pattern(2, 4 * MiB)
    make_image(tmp_path / "base.raw", 4 * MiB, {0: base})
    path = tmp_path / "top.qcow2"
    create_qcow2(path, 4 * MiB, backing_file="base.raw", backing_format="raw")
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    model = bytearray(base)
    node = open_qcow2(path)
    try:
        await apply_random_ops(node, model, 3, 80)
    finally:
        await node.close()
    qemu_check(path)
    qemu_compare(path, bytes(model), tmp_path)
    assert (tmp_path / "base.raw").read_bytes() == base


async def test_round_trip_with_qemu_io(tmp_path: Path) -> None:
    """We write, qemu-io writes on top, we read it all back (and QEMU agrees)."""
    path = tmp_path / "rt.qcow2"
    create_qcow2(path, 8 * MiB, cluster_size=65536)
    model = bytearray(8 * MiB)
    node = open_qcow2(path)
    try:
        await apply_random_ops(node, model, 4, 60)
    finally:
        await node.close()
    qemu_io(path, "write -P 0x5a 100000 300000", "write -z 2M 1M", "discard 4M 1M", "write -P 0x11 7M 4k")
    model[100000:400000] = b"\x5a" * 300000
    model[2 * MiB : 3 * MiB] = bytes(MiB)
    model[4 * MiB : 5 * MiB] = bytes(MiB)
    model[7 * MiB : 7 * MiB + 4096] = b"\x11" * 4096
    qemu_check(path)
    node = open_qcow2(path)
    try:
        assert await read_all(node) == model
        await node.write(7 * MiB + 10, memoryview(b"again"))
        model[7 * MiB + 10 : 7 * MiB + 15] = b"again"
        errors, _leaks = await node.check()
        assert errors == []
    finally:
        await node.close()
    qemu_check(path)
    qemu_compare(path, bytes(model), tmp_path)


# -- QEMU's images here ---------------------------------------------------------------------------


def qemu_map(path: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(
        run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)]).stdout)
    return out


async def assert_status_matches_qemu_map(node: Qcow2Node, path: Path) -> None:
    """Our base:allocation flags agree with ``qemu-img map`` byte for byte."""
    expected = []
    for ext in qemu_map(path):
        flags = AllocationState(0)
        if not ext["data"]:
            flags |= AllocationState.HOLE
        if ext["zero"]:
            flags |= AllocationState.ZERO
        expected.append((int(ext["start"]), int(ext["length"]), flags))  # type: ignore[call-overload]
    pos = 0
    ours = []
    while pos < node.size:
        for e in await node.block_status(pos, node.size - pos):
            ours.append((pos, e.length, e.flags))
            pos += e.length

    def per_byte_runs(runs: list[tuple[int, int, AllocationState]]) -> list[tuple[int, AllocationState]]:
        merged: list[tuple[int, AllocationState]] = []
        for start, _length, flags in runs:
            if merged and merged[-1][1] == flags:
                continue
            merged.append((start, flags))
        return merged

    assert per_byte_runs(ours) == per_byte_runs(expected)


async def test_qemu_created_image_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "q.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(path), "16M"])
    qemu_io(
        path,
        "write -P 0xab 0 64k",
        "write -P 0xcd 100k 3k",
        "write -P 0xef 1M 2M",
        "write -z 1536k 128k",
        "discard 2560k 128k",
        "write -z -u 3M 256k",
        "write -P 0x42 15M 1M",
    )
    node = open_qcow2(path, read_only=True)
    try:
        assert node.cluster_size == 65536
        assert await read_all(node) == qemu_raw(path, tmp_path)
        await assert_status_matches_qemu_map(node, path)
    finally:
        await node.close()
    # Then written here, still consistent and equal for QEMU.
    model = bytearray(qemu_raw(path, tmp_path))
    node = open_qcow2(path)
    try:
        await apply_random_ops(node, model, 5, 60)
    finally:
        await node.close()
    qemu_check(path)
    qemu_compare(path, bytes(model), tmp_path)


@pytest.mark.parametrize("cluster_size", ["512", "4k", "2M"])
async def test_qemu_cluster_sizes(tmp_path: Path, cluster_size: str) -> None:
    path = tmp_path / "c.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(path), "12M"])
    qemu_io(path, "write -P 0x33 1000 70000", "write -P 0x44 5M 3M", "write -z 6M 64k")
    node = open_qcow2(path)
    try:
        assert await read_all(node) == qemu_raw(path, tmp_path)
        await node.write(5 * MiB + 3, memoryview(b"x" * 100000))
    finally:
        await node.close()
    qemu_check(path)


async def test_fleece_overlay_from_qemu_img(tmp_path: Path) -> None:
    """``qemu-img create -f qcow2 -b live.raw -F raw fleece.qcow2``: backing from the header."""
    live = pattern(6, 8 * MiB)
    make_image(tmp_path / "live.raw", 8 * MiB, {0: live})
    fleece = tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", "live.raw", "-F", "raw", str(fleece)])
    node = open_qcow2(fleece)
    try:
        assert node.size == 8 * MiB
        assert node.backing is not None and node.backing.size == 8 * MiB
        assert await read_all(node) == live
        # Copy-before-write style: old data goes into the overlay, whole clusters and partial ones.
        await node.write(MiB, memoryview(live[MiB : 2 * MiB]))
        await node.write(3 * MiB + 100, memoryview(b"new" * 1000))
        model = bytearray(live)
        model[3 * MiB + 100 : 3 * MiB + 3100] = b"new" * 1000
        assert await read_all(node) == model
        depth = await node.allocation_depth(0, 8 * MiB)
        assert depth == [(MiB, 2), (MiB, 1), (MiB, 2), (65536, 1), (5 * MiB - 65536, 2)]
    finally:
        await node.close()
    assert (tmp_path / "live.raw").read_bytes() == live
    qemu_check(fleece)
    assert qemu_raw(fleece, tmp_path) == model
    node = open_qcow2(fleece, read_only=True)
    try:
        await assert_status_matches_qemu_map(node, fleece)
    finally:
        await node.close()


async def test_qemu_chain_from_header(tmp_path: Path) -> None:
    """raw <- qcow2 <- qcow2, made and written by QEMU, read here through the chain."""
    make_image(tmp_path / "base.raw", 4 * MiB, {0: pattern(7, 4 * MiB)})
    run(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(tmp_path / "mid.qcow2")])
    run(["qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2")])
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x77 512k 64k", "write -z 2M 64k")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x88 520k 8k", "write -P 0x99 3M 1k")
    node = open_qcow2(tmp_path / "top.qcow2", read_only=True)
    try:
        assert await read_all(node) == qemu_raw(tmp_path / "top.qcow2", tmp_path)
        depth = await node.allocation_depth(0, 4 * MiB)
        assert depth == [
            (512 * KiB, 3), (64 * KiB, 1), (2 * MiB - 576 * KiB, 3), (64 * KiB, 2),
            (MiB - 64 * KiB, 3), (64 * KiB, 1), (MiB - 64 * KiB, 3),
        ]
        await assert_status_matches_qemu_map(node, tmp_path / "top.qcow2")
    finally:
        await node.close()


def test_qemu_rejects_nothing_we_create(tmp_path: Path) -> None:
    """A bare created image with every option is valid for qemu-img check and info."""
    make_image(tmp_path / "b.raw", MiB)
    for i, (cs, backing) in enumerate([(512, None), (65536, "b.raw"), (2 * MiB, None)]):
        path = tmp_path / f"{i}.qcow2"
        create_qcow2(path, 3 * MiB, cluster_size=cs, backing_file=backing,
                     backing_format="raw" if backing else None)
        qemu_check(path)
