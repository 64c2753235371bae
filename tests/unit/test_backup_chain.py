"""Backup chains without a server: qcow2 images written by the agent's writer, checked by qemu-img;
restore, verify and prune (with crashes in the middle) on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.image import content_digest
from nbdfleece_backup.progress import Progress
from nbdfleece_backup.prune import commit, finish_prune, plan, prune
from nbdfleece_backup.report import listing, verify
from nbdfleece_backup.restore import restore
from nbdfleece_backup.store import Folder
from tests.unit.backup_helpers import add_point, qemu_img, write_raw

KiB, MiB = 1 << 10, 1 << 20
SIZE = 9 * MiB + 3 * 512  # the last qcow2 cluster is partial
QUIET = Progress(quiet=True)


def scribble(disk: bytearray, offset: int, length: int, byte: int) -> tuple[int, int]:
    disk[offset : offset + length] = bytes([byte]) * length
    return offset, length


async def build_chain(path: Path, count: int = 4) -> list[bytearray]:
    """A full backup and ``count - 1`` incrementals with data, zeroed ranges and odd offsets."""
    disk = bytearray(SIZE)
    scribble(disk, 0, 3 * MiB, 0x11)
    scribble(disk, 5 * MiB + 100, 7000, 0x12)
    scribble(disk, SIZE - 512, 512, 0x13)
    states = []
    async with Folder(path, create=True) as folder:
        await add_point(folder, disk)
        states.append(bytearray(disk))
        for i in range(1, count):
            dirty = [
                scribble(disk, (i * 700) * KiB, 5000, 0x20 + i),  # partial clusters
                scribble(disk, i * MiB, 128 * KiB, 0),  # old data zeroed: zero clusters
                scribble(disk, 8 * MiB + i * 64 * KiB, 64 * KiB, 0x30 + i),
                scribble(disk, SIZE - 1000, 1000, 0x40 + i),  # the partial last cluster
            ]
            await add_point(folder, disk, dirty)
            states.append(bytearray(disk))
    return states


async def test_every_point_restores_exactly_and_passes_qemu_img(tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    states = await build_chain(folder)
    for seq, state in enumerate(states, start=1):
        image = folder / f"point-{seq:04d}.qcow2"
        qemu_img("check", str(image))
        expected = write_raw(tmp_path / f"expected{seq}.raw", state)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(expected))
        ours = tmp_path / f"ours{seq}.raw"
        stats = await restore(folder, seq, str(ours), progress=QUIET)
        assert ours.read_bytes() == bytes(state)
        assert stats.point.seq == seq
        theirs = tmp_path / f"theirs{seq}.raw"
        qemu_img("convert", "-O", "raw", str(image), str(theirs))
        assert theirs.read_bytes() == ours.read_bytes()
    info = qemu_img("info", str(folder / "point-0003.qcow2")).stdout
    assert "backing file: point-0002.qcow2" in info  # relative: the folder can move
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


async def test_restore_refuses_to_overwrite_and_hole_stays_hole(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 2)
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    with pytest.raises(BackupError, match="exists"):
        await restore(folder, None, str(out), progress=QUIET)
    assert out.read_bytes() == b"precious"
    await restore(folder, None, str(out), force=True, progress=QUIET)
    assert out.read_bytes() == bytes(states[-1])
    assert os.stat(out).st_blocks * 512 < SIZE  # the unwritten middle is not allocated
    with pytest.raises(BackupError, match="no point 7"):
        await restore(folder, 7, str(tmp_path / "x.raw"), progress=QUIET)


async def test_content_checksum_is_recomputed_from_the_image(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    await build_chain(folder, 3)
    async with Folder(folder, write=False) as f:
        for p in f.manifest.points:
            content = await content_digest(folder / p.file)
            assert content.checksum == p.checksum
            assert (content.data_bytes, content.zero_bytes) == (p.data_bytes, p.zero_bytes)


async def test_verify_finds_damage_and_restore_refuses_it(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 3)
    lines, problems = await verify(folder)
    assert problems == [] and len(lines) == 3
    # Flip one byte of guest data inside point 2 (its data clusters follow the metadata).
    image = folder / "point-0002.qcow2"
    blob = bytearray(image.read_bytes())
    at = blob.find(bytes([0x21]) * 64)
    assert at > 0
    blob[at] ^= 0xFF
    image.write_bytes(bytes(blob))
    lines, problems = await verify(folder)
    assert problems == ["point 2 (point-0002.qcow2): content checksum mismatch (the image was modified or "
                        "damaged)"]
    with pytest.raises(BackupError, match=r"point 2 .* cannot be trusted"):
        await restore(folder, 3, str(tmp_path / "r.raw"), progress=QUIET)
    await restore(folder, 1, str(tmp_path / "r1.raw"), progress=QUIET)  # point 1 does not need it
    assert (tmp_path / "r1.raw").read_bytes() == bytes(states[0])


async def test_verify_reports_missing_and_mismatched_images(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    await build_chain(folder, 3)
    os.unlink(folder / "point-0003.qcow2")
    qemu_img("rebase", "-u", "-b", "", str(folder / "point-0002.qcow2"))
    _, problems = await verify(folder)
    assert problems == [
        "point 2 (point-0002.qcow2): backing file None, the manifest says 'point-0001.qcow2'",
        "point 3 (point-0003.qcow2): point-0003.qcow2 is missing",
    ]


async def test_list(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    await build_chain(folder, 3)
    text = await listing(folder)
    lines = text.splitlines()
    assert lines[0].startswith("export 'test', disk 9.0 MiB")
    assert lines[1].split()[:4] == ["point", "kind", "snapshot", "(UTC)"]
    assert [ln.split()[:2] for ln in lines[2:]] == [["1", "full"], ["2", "incremental"], ["3", "incremental"]]


async def check_points(folder: Path, tmp_path: Path, expected: dict[int, bytearray]) -> None:
    async with Folder(folder, write=False) as f:
        assert [p.seq for p in f.manifest.points] == sorted(expected)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".qcow2"))
    assert names == [f"point-{s:04d}.qcow2" for s in sorted(expected)]
    for seq, state in expected.items():
        image = folder / f"point-{seq:04d}.qcow2"
        qemu_img("check", str(image))
        raw = write_raw(tmp_path / f"expect-{seq}.raw", state)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(raw))
        out = tmp_path / f"restored-{seq}.raw"
        await restore(folder, seq, str(out), force=True, progress=QUIET)
        assert out.read_bytes() == bytes(state)
    _, problems = await verify(folder)
    assert problems == []


async def test_prune_commits_old_incrementals_into_the_full(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 5)
    report = await prune(folder, 2, QUIET)
    assert report[-1] == "removed point(s) 1, 2, 3"
    async with Folder(folder, write=False) as f:
        four, five = f.manifest.points
        assert (four.kind, four.backing) == ("full", None)
        assert five.backing == "point-0004.qcow2"
        assert "merged" in (four.note or "")
    assert qemu_img("info", str(folder / "point-0004.qcow2")).stdout.count("backing file") == 0
    await check_points(folder, tmp_path, {4: states[3], 5: states[4]})
    assert await prune(folder, 2, QUIET) == ["nothing to prune: 2 point(s), keeping 2"]


@pytest.mark.parametrize("crash_after", ["merge", "rename"])
async def test_prune_interrupted_is_finished_by_the_next_run(tmp_path: Path, crash_after: str) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 4)
    # Steps 1-2 (and 3) of prune, then "kill -9": the manifest still names every point.
    async with Folder(folder) as f:
        pending = plan(f, 2)
        assert pending is not None and pending["merge"] == {"base": 1, "into": 3, "images": [2, 3]}
        f.manifest.pending = pending
        f.save()
        await commit(folder / "point-0001.qcow2", folder / "point-0003.qcow2", 2, QUIET)
        if crash_after == "rename":
            os.rename(folder / "point-0001.qcow2", folder / "point-0003.qcow2")
    # Point 4 reads the same in the middle of it all.
    out = tmp_path / "mid.raw"
    qemu_img("convert", "-O", "raw", str(folder / "point-0004.qcow2"), str(out))
    assert out.read_bytes() == bytes(states[3])
    async with Folder(folder) as f:
        assert any("merged points 1..3" in line for line in f.recovered) == (crash_after == "merge")
        assert f.manifest.pending is None
    await check_points(folder, tmp_path, {3: states[2], 4: states[3]})


async def test_prune_drops_whole_older_chains(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 2)
    disk = bytearray(states[-1])
    async with Folder(folder) as f:
        scribble(disk, 2 * MiB, MiB, 0x77)
        await add_point(f, disk)  # a new chain: full 3
        states.append(bytearray(disk))
        await add_point(f, disk, [scribble(disk, 0, 4096, 0x78)])
        states.append(bytearray(disk))
    assert (await prune(folder, 1, QUIET))[-1] == "removed point(s) 1, 2, 3"
    await check_points(folder, tmp_path, {4: states[3]})


async def test_prune_refuses_a_damaged_chain(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    await build_chain(folder, 3)
    image = folder / "point-0002.qcow2"
    blob = bytearray(image.read_bytes())
    blob[blob.find(bytes([0x21]) * 64)] ^= 1
    image.write_bytes(bytes(blob))
    with pytest.raises(BackupError, match=r"point 2 .*checksum mismatch.*; not pruning"):
        await prune(folder, 1, QUIET)
    async with Folder(folder, write=False) as f:
        assert len(f.manifest.points) == 3 and f.manifest.pending is None


async def test_finish_prune_without_merge(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    states = await build_chain(folder, 2)
    async with Folder(folder) as f:
        await add_point(f, bytearray(states[-1]))
        pending = plan(f, 1)
        assert pending == {"op": "prune", "drop": [1, 2], "merge": None, "keep": 1}
        f.manifest.pending = pending
        f.save()
        await finish_prune(f, QUIET)
    await check_points(folder, tmp_path, {3: states[-1]})


@pytest.mark.parametrize("algorithm", ["crc32", "xxh3-128"])
async def test_other_pieces_are_checked_like_sha256(tmp_path: Path, algorithm: str) -> None:
    """A chain may mix checksums: each image is verified (and re-hashed by prune) with its own."""
    folder = tmp_path / "b"
    disk = bytearray(SIZE)
    scribble(disk, 0, MiB, 0x51)
    async with Folder(folder, create=True) as f:
        await add_point(f, disk)
        await add_point(f, disk, [scribble(disk, 2 * MiB, 64 * KiB, 0x52)], checksum=algorithm)
        await add_point(f, disk, [scribble(disk, 3 * MiB, 64 * KiB, 0x53)], checksum=algorithm)
        assert [p.checksum.split(":")[0] for p in f.manifest.points] == ["sha256", algorithm, algorithm]
    assert (await verify(folder))[1] == []
    await prune(folder, 1, QUIET)  # point 3 becomes the full backup, still with its own pieces
    async with Folder(folder, write=False) as f:
        (only,) = f.manifest.points
        assert only.checksum.startswith(f"{algorithm}:") and only.kind == "full"
    assert (await verify(folder))[1] == []
    image = folder / "point-0003.qcow2"
    blob = bytearray(image.read_bytes())
    blob[blob.find(bytes([0x52]) * 64)] ^= 4
    image.write_bytes(bytes(blob))
    assert (await verify(folder))[1] == [
        "point 3 (point-0003.qcow2): content checksum mismatch (the image was modified or damaged)"]


async def test_chains_stay_restorable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain one image longer than a restore opens: verify names it, and the agent takes
    a full backup instead of the incremental that would make it (the limit is lowered to 3
    here; the real one is ``qcow2.MAX_BACKING_DEPTH``)."""
    import nbdfleece.block.qcow2 as qcow2
    import nbdfleece_backup.agent as agent
    import nbdfleece_backup.report as report
    from nbdfleece_backup.snapshot import BitmapState

    monkeypatch.setattr(qcow2, "MAX_BACKING_DEPTH", 3)
    for module in (agent, report):
        monkeypatch.setattr(module, "MAX_CHAIN_IMAGES", 4)
    folder = tmp_path / "backups"
    states = await build_chain(folder, count=5)  # full + 4 incrementals: point 5 sits on 5 images
    await restore(folder, 4, str(tmp_path / "p4.raw"), progress=QUIET)  # 4 images: opens
    assert (tmp_path / "p4.raw").read_bytes() == bytes(states[3])
    _, problems = await verify(folder)
    assert problems == ["point 5 (point-0005.qcow2): its chain holds 5 images, more than a restore "
                        "opens (4): restore it with qemu-img convert, or prune"], problems
    async with Folder(folder, write=False) as f:
        m = f.manifest
        last = m.points[3]  # pretend point 4 is the newest: one more incremental makes 5
        m.points = m.points[:4]
        state = BitmapState(last.bitmap, recording=True, busy=False, inconsistent=False,
                            persistent=True, granularity=65536, count=0)
        reason = agent.incremental_blocker(m, {last.bitmap: state}, SIZE)
        assert reason is not None and "chain of 4 images" in reason
        m.points = m.points[:3]
        assert agent.incremental_blocker(m, {m.points[-1].bitmap: state}, SIZE) is None
