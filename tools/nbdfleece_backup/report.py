"""``list`` and ``verify``: what the folder holds, and whether it can be trusted."""

from __future__ import annotations

import os
from pathlib import Path

from nbdfleece_backup.image import check_image, point_problems
from nbdfleece_backup.progress import human
from nbdfleece_backup.store import IMAGE_RE, MAX_CHAIN_IMAGES, Folder


async def listing(folder_path: Path) -> str:
    async with Folder(folder_path, write=False) as folder:
        m = folder.manifest
        if not m.points:
            return f"{folder_path}: no backups yet"
        rows = [("point", "kind", "snapshot (UTC)", "based on", "image", "read", "dirty", "time")]
        for p in m.points:
            dirty = "-" if p.dirty_bytes is None else f"{p.dirty_bytes / p.disk_size:.2%}"
            parent = next((q.seq for q in m.points if q.file == p.backing), "?")
            based = "-" if p.backing is None else str(parent)
            rows.append((str(p.seq), p.kind, p.snapshot_time.replace("T", " ").rstrip("Z"), based,
                         human(p.image_size), human(p.bytes_read), dirty, f"{p.seconds:.1f} s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"export '{m.export}', disk {human(m.disk_size or 0)} ({m.disk_size} bytes), "
                 f"{len(m.points)} point(s), {human(sum(p.image_size for p in m.points))} on disk"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        notes = [f"point {p.seq}: {p.note}" for p in m.points if p.note]
        return "\n".join(lines + notes)


async def verify(folder_path: Path) -> tuple[list[str], list[str]]:
    """(one line per point, every problem found); no problem: the folder is sound."""
    problems: list[str] = []
    lines: list[str] = []
    async with Folder(folder_path, write=False) as folder:
        m = folder.manifest
        seqs = [p.seq for p in m.points]
        if seqs != sorted(set(seqs)):
            problems.append("manifest: points are not in order or repeat")
        files = {p.file for p in m.points}
        for name in sorted(os.listdir(folder.path)):
            if IMAGE_RE.match(name) and name not in files:
                problems.append(f"{name}: an image no manifest point names")
        for p in m.points:
            path = folder.image_path(p.file)
            found = []
            if p.backing is not None:
                parent = next((q for q in m.points if q.file == p.backing), None)
                if parent is None:
                    found.append(f"its backing image {p.backing} is not a point of the folder")
                elif parent.seq >= p.seq:
                    found.append(f"its backing image {p.backing} is not older than it")
                elif (images := len(m.chain(p.seq))) > MAX_CHAIN_IMAGES:
                    found.append(f"its chain holds {images} images, more than a restore opens "
                                 f"({MAX_CHAIN_IMAGES}): restore it with qemu-img convert, or prune")
            image = await point_problems(path, p)  # header (or missing file), then content
            found += image
            if not image:
                found += [f"qcow2: {e}" for e in await check_image(path)]
            if found:
                problems += [f"point {p.seq} ({p.file}): {f}" for f in found]
                lines.append(f"point {p.seq} ({p.file}): {len(found)} problem(s)")
            else:
                lines.append(f"point {p.seq} ({p.file}): ok ({p.kind}, {human(p.image_size)})")
    return lines, problems
