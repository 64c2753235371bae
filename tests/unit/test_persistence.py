"""Persistent bitmaps: the ``IMAGE.nbdfleece-bitmaps`` sidecar and the graph using it.

File level: exact round trips, the ``in_use`` crash flag, the atomic
replace, and refusal of files that cannot be used.  Graph level: a clean
``close()`` keeps exact contents for the next graph; a graph that never
closed (a crash) leaves bitmaps that come back inconsistent, which every
bitmap operation but removal refuses with QEMU's wording.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nbdfleece import persistence
from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.graph import BlockGraph, ControlError
from nbdfleece.persistence import BitmapFileError, sidecar_path

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB + 4 * KiB  # not a multiple of 64 KiB: the last granule is partial


def crash(graph: BlockGraph) -> None:
    """What dying does to a graph: its files are closed (their locks go), nothing is saved."""
    for node in graph:
        if node.store is not None:
            node.store.close_sync()


def make_image(path: Path, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def bitmaps_with_contents() -> list[DirtyBitmap]:
    a = DirtyBitmap("a", SIZE, 64 * KiB, persistent=True)
    a.mark(0, 1)
    a.mark(3 * MiB + 100, 200 * KiB)
    a.mark(SIZE - 1, 1)
    b = DirtyBitmap("b", SIZE, 512, recording=False, persistent=True)
    b.mark(4097, 1)
    c = DirtyBitmap("c", SIZE, 1 * MiB, persistent=True, inconsistent=True, recording=False)
    return [a, b, c]


def summary(b: DirtyBitmap) -> tuple[object, ...]:
    return (b.name, b.size, b.granularity, b.recording, b.persistent, b.inconsistent, b.to_bytes())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- file level -------------------------------------------------------------------

def test_round_trip_exact(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    saved = bitmaps_with_contents()
    transient = DirtyBitmap("transient", SIZE)
    transient.mark(0, SIZE)
    persistence.save(image, SIZE, [*saved, transient], in_use=False)
    loaded, crashed = persistence.load(image, SIZE)
    assert crashed is False
    assert [summary(b) for b in loaded] == [summary(b) for b in saved]
    assert [b.dirty_ranges() for b in loaded] == [b.dirty_ranges() for b in saved]
    assert loaded[0].dirty_ranges() == [
        (0, 64 * KiB), (3 * MiB, 256 * KiB), (SIZE - 4 * KiB, 4 * KiB),
    ]
    assert [b.sha256() for b in loaded] == [b.sha256() for b in saved]
    doc = json.loads(sidecar_path(image).read_text())
    assert doc["format"] == "nbdfleece-bitmaps" and doc["version"] == 1
    assert doc["in_use"] is False and doc["image_size"] == SIZE
    assert [item["name"] for item in doc["bitmaps"]] == ["a", "b", "c"], "only persistent ones"
    assert base64.b64decode(doc["bitmaps"][0]["data"]) == saved[0].to_bytes()


def test_no_sidecar_means_no_bitmaps(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    assert persistence.load(image, SIZE) == ([], False)


def test_nothing_persistent_removes_the_sidecar(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=False)
    assert sidecar_path(image).exists()
    persistence.save(image, SIZE, [DirtyBitmap("t", SIZE)], in_use=False)
    assert not sidecar_path(image).exists()
    assert persistence.load(image, SIZE) == ([], False)


def test_in_use_file_comes_back_inconsistent(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=True)
    doc = json.loads(sidecar_path(image).read_text())
    assert doc["in_use"] is True
    loaded, crashed = persistence.load(image, SIZE)
    assert crashed is True
    assert [b.name for b in loaded] == ["a", "b", "c"]
    for b in loaded:
        assert b.inconsistent, b.name
        assert not b.recording, b.name
        assert b.persistent, b.name
        assert b.count() == 0, "no contents survive a crash"


def test_write_is_atomic_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_image(tmp_path / "disk.raw")
    path = sidecar_path(image)
    replaced: list[tuple[str, str]] = []
    fsynced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src: Any, dst: Any) -> None:
        replaced.append((str(src), str(dst)))
        # The new contents are complete in the temporary file before the rename.
        doc = json.loads(Path(src).read_text())
        assert doc["bitmaps"][0]["name"] == "a"
        real_replace(src, dst)

    def spy_fsync(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=True)
    assert len(replaced) == 1
    src, dst = replaced[0]
    assert dst == str(path)
    assert Path(src).parent == path.parent and src != dst
    assert len(fsynced) == 2, "the file, then the folder"
    assert leftovers(tmp_path) == []
    # Rewriting replaces the inode (rename over), never edits the old file in place.
    inode = path.stat().st_ino
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=False)
    assert path.stat().st_ino != inode
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_image(tmp_path / "disk.raw")
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=False)
    before = sidecar_path(image).read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        persistence.save(image, SIZE, [DirtyBitmap("z", SIZE, persistent=True)], in_use=True)
    assert sidecar_path(image).read_bytes() == before
    assert leftovers(tmp_path) == []  # the half-written temp file is removed
    monkeypatch.undo()
    loaded, crashed = persistence.load(image, SIZE)
    assert not crashed and [b.name for b in loaded] == ["a", "b", "c"]


def test_wrong_image_size(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    persistence.save(image, SIZE, bitmaps_with_contents(), in_use=False)
    with pytest.raises(BitmapFileError, match=f"written for an image of {SIZE} bytes"):
        persistence.load(image, SIZE + 512)


def _doc(**changes: Any) -> dict[str, Any]:
    b = DirtyBitmap("a", SIZE, 64 * KiB, persistent=True)
    doc: dict[str, Any] = {
        "format": "nbdfleece-bitmaps", "version": 1, "in_use": False, "image_size": SIZE,
        "bitmaps": [{"name": "a", "granularity": 65536, "recording": True, "inconsistent": False,
                     "data": base64.b64encode(b.to_bytes()).decode()}],
    }
    doc.update(changes)
    return doc


def _item(**changes: Any) -> dict[str, Any]:
    doc = _doc()
    doc["bitmaps"][0].update(changes)
    return doc


GARBAGE: dict[str, bytes] = {
    "binary": b"\x00\xff\x13garbage\x80",
    "empty": b"",
    "truncated json": json.dumps(_doc()).encode()[:60],
    "other format": json.dumps(_doc(format="qcow2")).encode(),
    "other version": json.dumps(_doc(version=2)).encode(),
    "json list": b"[1, 2, 3]",
    "json string": b'"nbdfleece-bitmaps"',
    "bitmaps not a list": json.dumps(_doc(bitmaps=7)).encode(),
    "item without data": json.dumps(_doc(bitmaps=[{"name": "a", "granularity": 65536,
                                                   "recording": True}])).encode(),
    "data of the wrong length": json.dumps(_item(data=base64.b64encode(b"\0" * 3).decode())).encode(),
    "data not base64": json.dumps(_item(data="!!not base64!!")).encode(),
    "bad granularity": json.dumps(_item(granularity=1000)).encode(),
    "granularity not a number": json.dumps(_item(granularity="big")).encode(),
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_a_bitmap_file_error(tmp_path: Path, content: bytes) -> None:
    image = make_image(tmp_path / "disk.raw")
    sidecar_path(image).write_bytes(content)
    with pytest.raises(BitmapFileError):
        persistence.load(image, SIZE)


def test_sidecar_sanity_of_the_garbage_table(tmp_path: Path) -> None:
    """The untouched document of the table above loads (so each entry breaks one thing)."""
    image = make_image(tmp_path / "disk.raw")
    sidecar_path(image).write_text(json.dumps(_doc()))
    loaded, crashed = persistence.load(image, SIZE)
    assert not crashed and [summary(b)[:6] for b in loaded] == [("a", SIZE, 65536, True, True, False)]


# -- graph level --------------------------------------------------------------------

async def write(graph: BlockGraph, node: str, offset: int, data: bytes) -> None:
    await graph.node(node).top.write(offset, memoryview(data))


async def test_graph_close_then_reload_exact(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    graph.add_file("disk", image)
    graph.bitmap_add("disk", "pb", persistent=True)
    graph.bitmap_add("disk", "fine", granularity=512, persistent=True)
    graph.bitmap_add("disk", "off", persistent=True, disabled=True)
    graph.bitmap_add("disk", "transient")
    # While open, the sidecar says in use and holds no contents.
    assert json.loads(sidecar_path(image).read_text())["in_use"] is True
    await write(graph, "disk", 0, b"x")
    await write(graph, "disk", 5 * MiB + 1000, b"y" * 70000)
    await write(graph, "disk", SIZE - 1, b"z")
    pb = graph.bitmap("disk", "pb")
    assert pb.dirty_ranges() == [(0, 64 * KiB), (5 * MiB, 128 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
    expected = {b.name: summary(b) for b in graph.node("disk").bitmaps.values() if b.persistent}
    assert graph.bitmap("disk", "off").count() == 0
    await graph.close()
    assert json.loads(sidecar_path(image).read_text())["in_use"] is False
    assert leftovers(tmp_path) == []

    again = BlockGraph()
    node = again.add_file("disk", image)
    assert {b.name: summary(b) for b in node.bitmaps.values()} == expected
    assert "transient" not in node.bitmaps
    assert again.bitmap("disk", "fine").dirty_ranges() == [
        (0, 512), (5 * MiB + 512, 70656), (SIZE - 512, 512),
    ]
    # Marked in use again while open; recording bitmaps keep recording.
    assert json.loads(sidecar_path(image).read_text())["in_use"] is True
    await write(again, "disk", 2 * MiB, b"w")
    await again.close()
    third = BlockGraph()
    third.add_file("disk", image)
    assert third.bitmap("disk", "pb").dirty_ranges() == [
        (0, 64 * KiB), (2 * MiB, 64 * KiB), (5 * MiB, 128 * KiB), (SIZE - 4 * KiB, 4 * KiB),
    ]
    assert third.bitmap("disk", "off").count() == 0
    await third.close()


async def test_graph_raw_node_keeps_persistent_bitmaps(tmp_path: Path) -> None:
    """Persistent bitmaps move to the raw format node and are saved from there."""
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    file_node = graph.add_file("file0", image)
    graph.bitmap_add("file0", "pb", persistent=True)
    raw = graph.add_raw("fmt0", file_node)
    assert "pb" in raw.bitmaps and "pb" not in file_node.bitmaps
    await write(graph, "fmt0", 1 * MiB, b"q")
    await graph.close()
    again = BlockGraph()
    again.add_file("file0", image)
    assert again.bitmap("file0", "pb").dirty_ranges() == [(1 * MiB, 64 * KiB)]
    await again.close()


async def test_graph_crash_leaves_bitmaps_inconsistent(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    crashed = BlockGraph()
    crashed.add_file("disk", image)
    crashed.bitmap_add("disk", "pb", persistent=True)
    crashed.bitmap_add("disk", "other", persistent=True, granularity=1 * MiB)
    await write(crashed, "disk", 0, b"x" * 4096)
    crash(crashed)  # no close(): the process died here
    graph = BlockGraph()
    node = graph.add_file("disk2", image)
    assert sorted(node.bitmaps) == ["other", "pb"]
    for b in node.bitmaps.values():
        assert b.inconsistent and not b.recording and b.persistent
    info = {i["name"]: i for i in graph.bitmap_info(node)}
    assert info["pb"]["inconsistent"] is True and info["pb"]["recording"] is False
    # Writes do not touch an inconsistent bitmap.
    await write(graph, "disk2", 0, b"y")
    assert graph.bitmap("disk2", "pb").count() == 0

    message = "Bitmap 'pb' is inconsistent and cannot be used"
    with pytest.raises(ControlError, match=message):
        graph.bitmap_clear("disk2", "pb")
    with pytest.raises(ControlError, match=message):
        graph.bitmap_enable("disk2", "pb")
    with pytest.raises(ControlError, match=message):
        graph.bitmap_enable("disk2", "pb", False)
    with pytest.raises(ControlError, match=message):
        graph.bitmap_merge("disk2", "pb", [])  # as the target
    graph.bitmap_add("disk2", "fresh")
    with pytest.raises(ControlError, match=message):
        graph.bitmap_merge("disk2", "fresh", ["pb"])  # as a source
    with pytest.raises(ControlError, match=message):
        graph.bitmap_merge("disk2", "fresh", [{"node": "disk2", "name": "pb"}])
    # Removal works, and is persisted.
    graph.bitmap_remove("disk2", "pb")
    assert "pb" not in node.bitmaps
    await graph.close()

    # After a clean close the remaining one stays inconsistent (never trusted again).
    later = BlockGraph()
    node = later.add_file("disk", image)
    assert sorted(node.bitmaps) == ["other"]
    assert node.bitmaps["other"].inconsistent
    later.bitmap_remove("disk", "other")
    await later.close()
    assert not sidecar_path(image).exists(), "no persistent bitmap left: no sidecar"
    last = BlockGraph()
    assert last.add_file("disk", image).bitmaps == {}
    await last.close()


async def test_graph_garbage_sidecar_is_a_control_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    sidecar_path(image).write_bytes(b"\x00garbage")
    graph = BlockGraph()
    with pytest.raises(ControlError, match="unreadable bitmap file"):
        graph.add_file("disk", image)
    assert "disk" not in graph.nodes
    await graph.close()


async def test_graph_read_only_open_leaves_sidecar_alone(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    graph.add_file("disk", image)
    graph.bitmap_add("disk", "pb", persistent=True)
    await write(graph, "disk", 0, b"x")
    await graph.close()
    before = sidecar_path(image).read_bytes()
    ro = BlockGraph()
    node = ro.add_file("disk", image, read_only=True)
    assert node.bitmaps["pb"].dirty_ranges() == [(0, 64 * KiB)]
    assert not node.bitmaps["pb"].inconsistent
    await ro.close()
    assert sidecar_path(image).read_bytes() == before


async def test_graph_remove_raw_node_keeps_crash_detection(tmp_path: Path) -> None:
    """Removing the raw node while its file node stays open must not mark the file clean.

    The persistent bitmap moves back to the still-open, writable file node
    and keeps recording; if the process dies afterwards the bitmap must come
    back inconsistent, not with contents that miss the later writes.
    """
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    file_node = graph.add_file("file0", image)
    graph.bitmap_add("file0", "pb", persistent=True)
    graph.add_raw("fmt0", file_node)
    await write(graph, "fmt0", 0, b"a")
    await graph.remove("fmt0")
    assert "pb" in file_node.bitmaps
    await write(graph, "file0", 4 * MiB, b"b")  # recorded in memory only
    assert graph.bitmap("file0", "pb").dirty_ranges() == [(0, 64 * KiB), (4 * MiB, 64 * KiB)]
    crash(graph)  # no close()
    after = BlockGraph()
    node = after.add_file("file0", image)
    pb = node.bitmaps["pb"]
    assert pb.inconsistent or pb.dirty_ranges() == [(0, 64 * KiB), (4 * MiB, 64 * KiB)], (
        f"stale bitmap trusted after a crash: {pb.dirty_ranges()}"
    )
    await after.close()


async def test_a_raw_node_over_a_file_node_in_use_leaves_the_bitmaps_below(tmp_path: Path) -> None:
    """Moving the persistent bitmaps up to the raw node would stop them seeing writes
    made through the file node, which is exported: they stay on it, and still see the
    raw node's writes, which pass through it."""
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    disk = graph.add_file("disk", image)
    graph.bitmap_add("disk", "pb", persistent=True)
    disk.users += 1  # an export of the file node
    raw = graph.add_raw("r", disk)
    assert "pb" in disk.bitmaps and "pb" not in raw.bitmaps
    await write(graph, "disk", 0, b"x")
    await write(graph, "r", 3 * MiB, b"y")
    assert graph.bitmap("disk", "pb").dirty_ranges() == [(0, 64 * KiB), (3 * MiB, 64 * KiB)]
    free = graph.add_file("free", make_image(tmp_path / "free.raw"))
    graph.bitmap_add("free", "fb", persistent=True)
    assert "fb" in graph.add_raw("fr", free).bitmaps  # a file node nobody uses: moved up, as in QEMU
    await graph.close()


def test_a_persistent_add_or_remove_that_cannot_be_stored_changes_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw")
    graph = BlockGraph()
    node = graph.add_file("disk", image)
    graph.bitmap_add("disk", "kept", persistent=True)
    graph.bitmap_add("disk", "other", persistent=True)  # so that a removal rewrites the file
    blocker = Path(str(sidecar_path(image)) + ".tmp")
    blocker.mkdir()  # the atomic replace cannot write its temporary file
    with pytest.raises(ControlError, match="Can't store persistent bitmaps to disk"):
        graph.bitmap_add("disk", "p", persistent=True)
    assert "p" not in node.bitmaps
    with pytest.raises(ControlError, match="Can't store persistent bitmaps to disk"):
        graph.bitmap_remove("disk", "kept")
    assert "kept" in node.bitmaps
    blocker.rmdir()


def test_persistent_bitmaps_are_refused_under_a_format_driver(tmp_path: Path) -> None:
    """A qcow2 image's file size is not its disk's: the sidecar cannot describe it."""
    from nbdfleece.block.qcow2 import create_qcow2

    create_qcow2(tmp_path / "d.qcow2", MiB)
    graph = BlockGraph()
    graph.add_qcow2("q", str(tmp_path / "d.qcow2"))
    with pytest.raises(ControlError, match="Can't store persistent bitmaps to q: Operation not supported"):
        graph.bitmap_add("q", "p", persistent=True)
    graph.bitmap_add("q", "t")  # a transient one is fine
    assert not sidecar_path(str(tmp_path / "d.qcow2")).exists()


@pytest.mark.parametrize("text", [
    '{"format": "nbdfleece-bitmaps", "version": 1, "in_use": false, "image_size": ' + str(SIZE)
    + ', "bitmaps": [{"name": "b", "granularity": 1e999, "recording": true, "data": ""}]}',
    "[" * 100_000 + "]" * 100_000,
], ids=["huge-granularity", "deep-nesting"])
def test_absurd_sidecars_are_refused_clearly(tmp_path: Path, text: str) -> None:
    image = make_image(tmp_path / "disk.raw")
    sidecar_path(image).write_text(text)
    with pytest.raises(BitmapFileError):
        persistence.load(image, SIZE)
    with pytest.raises(ControlError, match="bitmap"):
        BlockGraph().add_file("disk", image)
