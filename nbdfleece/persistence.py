"""Persistent dirty bitmaps: a crash-safe sidecar file next to the image.

Format (documented in protocol/bitmaps.md): ``IMAGE.nbdfleece-bitmaps``, a
JSON document::

    {"format": "nbdfleece-bitmaps", "version": 1,
     "in_use": true, "image_size": 67108864,
     "bitmaps": [{"name": "bm0", "granularity": 65536, "recording": true,
                  "inconsistent": false, "data": "<base64 of packbits, little bit order>"}]}

``in_use`` plays the role of the qcow2 IN_USE flag: it is written true when
the server opens the image and false only by a clean close that also wrote
the exact contents.  Finding it true on open means the last server died
without a clean shutdown, so every bitmap in the file comes back
inconsistent: never used for an incremental backup, only removable.

Every write is new file, fsync, rename over, fsync of the folder (``durable.py``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.durable import remove_durably, write_atomic

FORMAT = "nbdfleece-bitmaps"
VERSION = 1
SUFFIX = ".nbdfleece-bitmaps"


def sidecar_path(image: str) -> Path:
    return Path(image + SUFFIX)


class BitmapFileError(Exception):
    """The sidecar exists but cannot be used."""


def load(image: str, size: int) -> tuple[list[DirtyBitmap], bool]:
    """The persisted bitmaps and whether the last close was unclean.

    Bitmaps of an unclean file are returned inconsistent and not recording.
    """
    path = sidecar_path(image)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return [], False
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep JSON
        raise BitmapFileError(f"{path}: unreadable bitmap file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BitmapFileError(f"{path}: not a version {VERSION} {FORMAT} file")
    if doc.get("image_size") != size:
        raise BitmapFileError(f"{path}: written for an image of {doc.get('image_size')} bytes")
    crashed = bool(doc.get("in_use"))
    bitmaps = []
    try:
        for item in doc.get("bitmaps", []):
            bitmap = DirtyBitmap(
                str(item["name"]), size, int(item["granularity"]),
                recording=bool(item["recording"]) and not crashed,
                persistent=True,
                inconsistent=crashed or bool(item.get("inconsistent")),
            )
            if not crashed:
                bitmap.load_bytes(base64.b64decode(item["data"], validate=True))
            bitmaps.append(bitmap)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise BitmapFileError(f"{path}: malformed bitmap entry: {exc!r}") from None
    return bitmaps, crashed


def save(image: str, size: int, bitmaps: list[DirtyBitmap], *, in_use: bool) -> None:
    """Atomically replace the sidecar (or remove it when nothing is persistent)."""
    path = sidecar_path(image)
    persistent = [b for b in bitmaps if b.persistent]
    if not persistent:
        remove_durably(path)
        return
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "in_use": in_use,
        "image_size": size,
        "bitmaps": [
            {
                "name": b.name,
                "granularity": b.granularity,
                "recording": b.recording,
                "inconsistent": b.inconsistent,
                "data": base64.b64encode(b.to_bytes()).decode() if not in_use else "",
            }
            for b in persistent
        ],
    }
    write_atomic(path, json.dumps(doc).encode())
