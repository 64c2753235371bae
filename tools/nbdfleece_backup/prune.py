"""Retention: keep the newest N points, merging older incrementals into the full backup.

The chain of the oldest kept point K is ``F <- I1 <- ... <- K <- ...``.  Prune
*commits* I1..K into F (as ``qemu-img commit`` would), then renames F's file
over K's, so the images after K, whose backing file is K's name, now sit on a
full backup that reads exactly as K did.  Whole chains older than K's are
deleted.  Crash safety, step by step:

1. the manifest records the plan (``pending``) and stops offering the points
   that will go; nothing else has changed yet;
2. the clusters that I1..K hold are copied into F in place.  Reads of K (and of
   every later point) never reach F for those clusters, so they read the
   same before, during and after this step, which can simply be redone;
3. F is fsynced and renamed over K's file (one atomic rename);
4. the manifest drops the old points and records K as a full backup with its
   new checksum, clearing ``pending``;
5. the old files are deleted (leftovers are removed by the next run as files
   no manifest names).

A run killed anywhere is finished by :func:`finish_pending`, which every
command calls when it opens the folder: before step 3 it redoes 2 and 3,
after it goes on with 4.
"""

from __future__ import annotations

import os
from pathlib import Path

from nbdfleece.block.qcow2 import Qcow2Error, Qcow2Node, open_qcow2
from nbdfleece.block.workers import run_blocking
from nbdfleece.errors import RequestError
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.image import STATUS_STEP, content_digest, open_image, point_problems
from nbdfleece_backup.plan import PIECE, checksum_algorithm, split
from nbdfleece_backup.progress import Progress, human
from nbdfleece_backup.store import Folder, Point, describe_os_error, fsync_dir, now_iso


def plan(folder: Folder, keep: int) -> dict[str, object] | None:
    """The ``pending`` record for keeping the newest ``keep`` points (None: nothing to do)."""
    points = folder.manifest.points
    if keep < 1:
        raise BackupError("--keep must be at least 1", 2)
    if len(points) <= keep:
        return None
    first_kept = points[-keep]
    chain = folder.manifest.chain(first_kept.seq)
    full = chain[0]
    drop = [p.seq for p in points if p.seq < first_kept.seq]
    merge = None
    if full.seq != first_kept.seq:
        merge = {"base": full.seq, "into": first_kept.seq, "images": [p.seq for p in chain[1:]]}
    return {"op": "prune", "drop": drop, "merge": merge, "keep": keep}


async def prune(folder_path: Path, keep: int, progress: Progress) -> list[str]:
    async with Folder(folder_path) as folder:
        for line in folder.recovered:
            progress.note(f"recovered: {line}")
        pending = plan(folder, keep)
        if pending is None:
            return [f"nothing to prune: {len(folder.manifest.points)} point(s), keeping {keep}"]
        merge = pending["merge"]
        if isinstance(merge, dict):
            chain = [folder.manifest.point(s) for s in [merge["base"], *merge["images"]]]
            for p in chain:  # never merge damaged images into the full backup
                problems = await point_problems(folder.image_path(p.file), p)
                if problems:
                    raise BackupError(f"point {p.seq} ({p.file}): {'; '.join(problems)}; not pruning "
                                      "(run verify)")
        folder.manifest.pending = pending
        folder.save()
        return await finish_prune(folder, progress)


async def finish_pending(folder: Folder) -> list[str]:
    """Finish an interrupted prune (``Folder.recover`` calls this first thing)."""
    pending = folder.manifest.pending
    if pending is None:
        return []
    if pending.get("op") != "prune":
        raise BackupError(f"{folder.path}: unknown pending operation {pending.get('op')!r}", 2)
    if not folder.write:
        # A reader of a read-only folder cannot finish it: it hides the points it touches.
        try:
            return await finish_prune(folder, Progress(quiet=True))
        except BackupError:
            hidden = set(pending.get("drop", []))
            merge = pending.get("merge")
            if isinstance(merge, dict):
                hidden.add(merge["into"])
            folder.manifest.points = [p for p in folder.manifest.points if p.seq not in hidden]
            return []
    return await finish_prune(folder, Progress(quiet=True))


async def finish_prune(folder: Folder, progress: Progress) -> list[str]:
    """Steps 2-5 (see the module docstring); idempotent."""
    manifest = folder.manifest
    pending = manifest.pending
    assert pending is not None
    done: list[str] = []
    merge = pending.get("merge")
    if isinstance(merge, dict):
        base = manifest.point(merge["base"])
        into = manifest.point(merge["into"])
        base_path, into_path = folder.image_path(base.file), folder.image_path(into.file)
        if base_path.exists():
            copied = await commit(base_path, into_path, len(merge["images"]), progress)
            await run_blocking(_fsync_file, base_path)
            os.rename(base_path, into_path)
            await run_blocking(fsync_dir, folder.path)
            done.append(f"merged points {base.seq}..{into.seq} into one full backup "
                        f"({human(copied)} copied into {base.file}, now {into.file})")
        content = await content_digest(into_path, checksum_algorithm(into.checksum))
        into.kind, into.backing = "full", None
        into.checksum = content.checksum
        into.data_bytes, into.zero_bytes = content.data_bytes, content.zero_bytes
        into.image_size = into_path.stat().st_size
        into.note = f"prune {now_iso()}: points {base.seq}..{into.seq - 1} merged into it"
    drop = set(pending.get("drop", []))
    gone = [p for p in manifest.points if p.seq in drop]
    manifest.points = [p for p in manifest.points if p.seq not in drop]
    manifest.pending = None
    folder.save()
    for p in gone:
        try:
            os.unlink(folder.image_path(p.file))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackupError(describe_os_error(exc, f"cannot remove {p.file}")) from None
    fsync_dir(folder.path)
    done.append(f"removed point(s) {', '.join(str(p.seq) for p in gone)}" if gone else "no point removed")
    return done


async def commit(base_path: Path, top_path: Path, depth: int, progress: Progress) -> int:
    """Copy into ``base_path`` every cluster the top ``depth`` images of ``top_path``'s chain hold."""
    top = open_image(top_path, chain=True)
    try:
        base = open_qcow2(base_path, backing=None)
    except Qcow2Error as exc:
        await top.close()
        raise BackupError(f"{base_path}: {exc}") from None
    copied = 0
    try:
        runs = await _runs_above(top, depth)
        progress.start("prune: merging", sum(n for _, n in runs))
        for offset, length in runs:
            for off, n in split(offset, length, PIECE):
                buf = bytearray(n)
                segments = await top.read(off, memoryview(buf), sparse=True)
                for seg in segments:
                    start = off + seg.start
                    if seg.zero:
                        await base.write_zeroes(start, seg.length, may_trim=True)
                    else:
                        await base.write(start, memoryview(buf)[seg.start : seg.start + seg.length])
                copied += n
                progress.advance(n)
        progress.finish()
    except (RequestError, OSError) as exc:
        raise BackupError(f"merging into {base_path} failed: {exc}") from None
    finally:
        await base.close()
        await top.close()
    return copied


async def _runs_above(top: Qcow2Node, depth: int) -> list[tuple[int, int]]:
    """``(offset, length)`` runs allocated in the top ``depth`` images of the chain."""
    runs: list[tuple[int, int]] = []
    pos, size = 0, top.size
    while pos < size:
        for n, d in await top.allocation_depth(pos, min(STATUS_STEP, size - pos)):
            n = min(n, size - pos)
            if 1 <= d <= depth:
                if runs and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((pos, n))
            pos += n
            if pos >= size:
                break
    return runs


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Point", "commit", "finish_pending", "finish_prune", "plan", "prune"]
