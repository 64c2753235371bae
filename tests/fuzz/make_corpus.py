"""Writes the committed seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/).

Seeds are real exchanges: the client side of every scenario in
``protocol/vectors/exchanges.json`` (handshake; its transmission request
headers for the framer), and QMP sessions as QEMU's documentation and our own
CLI send them, plus a few shapes at the limits (deep nesting, long strings).
Each seed's file name says where it comes from.  Rerun after changing the
vectors or the input layout of a target::

    .venv/bin/python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).parent
VECTORS = HERE.parents[1] / "protocol" / "vectors" / "exchanges.json"
CORPUS = HERE / "corpus"
REQUEST_MAGIC = bytes.fromhex("25609513")

# QMP sessions: the classic fleecing sequence of QEMU's documentation
# (shared reference, section 3.5), our CLI's snapshot commands, queries.
QMP_SESSIONS: dict[str, list[dict[str, object]]] = {
    "fleecing_classic": [
        {"execute": "qmp_capabilities"},
        {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "proto",
                                                  "filename": "disk.raw"}},
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "live", "file": "proto"}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {
            "host": "127.0.0.1", "port": "10809"}}}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "live", "node-name": "live",
                                                      "name": "live", "writable": True,
                                                      "description": "live disk"}},
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": "live", "name": "b0",
                                                            "granularity": 65536}},
        {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "fleece", "file": {
            "driver": "file", "filename": "fleece.qcow2"}, "backing": "live"}},
        {"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "b1",
                                                        "granularity": 65536}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "live", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "fleecing", "device": "live",
                                                 "target": "fleece", "sync": "none"}}]}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "fleece", "node-name": "fleece",
                                                      "name": "fleece", "writable": False,
                                                      "bitmaps": ["b0"], "allocation-depth": True}},
        {"execute": "block-export-del", "arguments": {"id": "fleece"}},
        {"execute": "block-job-cancel", "arguments": {"device": "fleecing"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "fleece"}},
        {"execute": "block-dirty-bitmap-remove", "arguments": {"node": "live", "name": "b0"}},
    ],
    "cli_snapshot": [
        {"execute": "qmp_capabilities", "id": "qmp_capabilities"},
        {"execute": "x-nbdfleece-snapshot-create", "id": "x-nbdfleece-snapshot-create",
         "arguments": {"name": "snap", "export": "live", "on-cbw-error": "break-guest-write",
                       "bitmap": "bm0"}},
        {"execute": "x-nbdfleece-query-snapshots", "id": "x-nbdfleece-query-snapshots"},
        {"execute": "x-nbdfleece-snapshot-delete", "id": "x-nbdfleece-snapshot-delete",
         "arguments": {"name": "snap"}},
    ],
    "queries_and_errors": [
        {"execute": "query-version"},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}},
        {"execute": "qmp_capabilities", "arguments": {"enable": []}},
        {"execute": "query-commands", "id": 1},
        {"execute": "query-block-exports", "id": None},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}, "id": [1, {"a": 2.5}]},
        {"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "live", "name": "b0"}},
        {"execute": "block-dirty-bitmap-merge", "arguments": {"node": "live", "target": "b0", "bitmaps": [
            "b1", {"node": "live", "name": "b2"}]}},
        {"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "live", "target": "t",
                                                     "sync": "bitmap", "bitmap": "b0",
                                                     "bitmap-mode": "on-success"}},
        {"execute": "query-block-jobs"},
        {"execute": "nbd-server-stop"},
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": "live", "name": "x",
                                                            "granularity": -1}},
        {"execute": 5},
        {"arguments": {}},
        {"execute": "query-version", "extra": True},
    ],
}


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def client_bytes(scenario: dict[str, object]) -> list[bytes]:
    steps = scenario["steps"]
    assert isinstance(steps, list)
    return [bytes.fromhex(s["hex"]) for s in steps if s["dir"] == "c2s"]


def handshake_and_framer() -> None:
    exchanges = json.loads(VECTORS.read_text())
    for scenario in exchanges["scenarios"]:
        name = scenario["name"]
        sent = client_bytes(scenario)
        stream = b"".join(sent)
        write("handshake", f"vector-{name}", b"\0" + stream)
        write("handshake", f"vector-{name}-pieces", b"\x07" + stream)
        headers = [step[:28] for step in sent if step[:4] == REQUEST_MAGIC and len(step) >= 28]
        for i, header in enumerate(headers):
            # structured + contexts on a 64 MiB writable export; simple replies on 1 MiB read-only
            write("framer", f"vector-{name}-{i}-structured",
                  bytes([0b110]) + struct.pack(">Q", 64 << 20) + header + b"\x10ABC\x03\x01\x02")
            write("framer", f"vector-{name}-{i}-simple-ro",
                  bytes([0b001]) + struct.pack(">Q", 1 << 20) + header)
    # TLS policies (byte 0, bits 6-7): each scenario after STARTTLS, and before it.
    opt = bytes.fromhex("49484156454f5054")
    starttls = opt + struct.pack(">II", 5, 0)
    for scenario in exchanges["scenarios"]:
        name = scenario["name"]
        if name[0] not in "abehx" or name.startswith(("x2", "x3", "x4", "x5", "x7")):
            continue
        stream = b"".join(client_bytes(scenario))
        for mode in (1, 2, 3):
            write("handshake", f"tls{mode}-starttls-{name}",
                  bytes([mode << 6 | mode]) + stream[:4] + starttls + stream[4:])
            write("handshake", f"tls{mode}-plain-{name}", bytes([mode << 6]) + stream)
    # A non-fixed client, an oversized option, and meta-context queries.
    write("handshake", "nonfixed-export-name-empty", b"\0" + struct.pack(">I", 0) + opt
          + struct.pack(">II", 1, 0))
    write("handshake", "oversized-list", b"\x05" + struct.pack(">I", 3) + opt
          + struct.pack(">II", 3, 65537) + bytes(65537) + opt + struct.pack(">II", 2, 0))
    queries = [b"qemu:dirty-bitmap:", b"base:", b"qemu:allocation-depth"]
    meta = struct.pack(">I", 4) + b"live" + struct.pack(">I", len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)
    write("handshake", "meta-list-set-go", b"\0" + struct.pack(">I", 3)
          + opt + struct.pack(">II", 8, 0)
          + opt + struct.pack(">II", 9, len(meta)) + meta
          + opt + struct.pack(">II", 10, len(meta)) + meta
          + opt + struct.pack(">II", 7, 10) + struct.pack(">I", 4) + b"live" + struct.pack(">HH", 1, 2))
    # A name at the length limit: error texts that quote it reach 4096 bytes.
    long_name = b"n" * 4090
    go = struct.pack(">I", len(long_name)) + long_name + struct.pack(">H", 0)
    write("handshake", "go-long-name",
          b"\0" + struct.pack(">I", 3) + opt + struct.pack(">II", 7, len(go)) + go)
    # Structured replies and a meta context before STARTTLS: TLS must forget them.
    go_live = struct.pack(">I", 4) + b"live" + struct.pack(">H", 0)
    for mode in (1, 2, 3):
        write("handshake", f"tls{mode}-forget-state",
              bytes([mode << 6]) + struct.pack(">I", 3) + opt + struct.pack(">II", 8, 0)
              + opt + struct.pack(">II", 10, len(meta)) + meta + starttls
              + opt + struct.pack(">II", 7, len(go_live)) + go_live)
    write("framer", "block-status-req-one",
          bytes([0b110]) + struct.pack(">Q", 1 << 30) + REQUEST_MAGIC
          + struct.pack(">HHQQI", 8, 7, 99, 4096, 1 << 20) + b"\x00\x05" + bytes(range(64)))
    write("framer", "read-sparse-sendfile",
          bytes([0b10110]) + struct.pack(">Q", 1 << 30) + REQUEST_MAGIC
          + struct.pack(">HHQQI", 0, 0, 7, 0, 65536) + b"\x00\x00" + bytes(range(256)) * 8)


def qmp() -> None:
    for name, session in QMP_SESSIONS.items():
        lines = b"".join(json.dumps(m).encode() + b"\n" for m in session)
        write("qmp", f"session-{name}", b"\0\x07" + lines)
        write("qmp", f"session-{name}-pieces-small-limit", b"\x09\x02" + lines)
    write("qmp", "deep-nesting", b"\0\x07" + b'{"execute":"qmp_capabilities"}\n'
          + b"[" * 1100 + b"]" * 1100 + b'\n{"execute":"query-version","id":' + b"[" * 900 + b"]" * 900
          + b"}\n")
    write("qmp", "long-string", b"\x03\x01" + b'{"execute":"' + b"a" * 300 + b'"}\n{"execute": 1}\n')
    write("qmp", "scalars-and-garbage", b"\x02\x07" + b'1 "x" true null [] {} -1.5e3 nul\n'
          + b'\xff\xfe {"execute":"qmp_capabilities"}}{"execute":"query-version","id":"\\ud800"}\n')


def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    handshake_and_framer()
    qmp()
    for target in sorted(p.name for p in CORPUS.iterdir()):
        files = list((CORPUS / target).iterdir())
        print(f"{target}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
