"""Crash-safe file replacement, shared by every small metadata file we write.

The bitmap sidecar (``persistence.py``), the job journal (``recovery.py``) and
the backup folder's manifest (``nbdfleece_backup/store.py``) are all replaced
the same way: write ``NAME.tmp``, fsync it, rename it over ``NAME``, fsync the
folder.  A crash at any point leaves either the old file or the new one, never
a mix, and once :func:`write_atomic` returns the new one survives a power loss.

These calls block: on the event loop, run them through
``nbdfleece.block.workers.run_blocking``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename over, fsync the folder.

    On failure the temp file is removed and the ``OSError`` raised; ``path`` is untouched.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_durably(path: Path) -> None:
    """Unlink ``path`` if it exists, and make that durable."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
