#!/usr/bin/python3
"""mk_bitmap_images.py - the same dirty-bitmap pattern for nbdfleece and qemu-nbd.

The pattern: --runs (default 100,000) distinct granules of --granularity
(default 64 KiB) in an image of --size (default 1 TiB), picked at random
(--seed) among the even-numbered granules only, so that no two of them touch
and every dirty granule is a run of its own.  One --write-size (512 B) write
at the start of a granule dirties that whole granule.

Subcommands (run them with a python that has libnbd's `nbd` module, e.g.
Debian's python3-libnbd for /usr/bin/python3):

  build DIR      make DIR/fleece.raw (sparse raw) with the persistent
                 nbdfleece bitmap b0 in its sidecar, and DIR/dirty.qcow2 with
                 a persistent qcow2 bitmap b0, both with the pattern.  Each
                 image is written through its own server (nbdfleece serve /
                 writable qemu-nbd, on a unix socket), which is then stopped
                 with SIGINT / SIGTERM so that it stores the bitmap.  Both
                 bitmaps stay enabled (recording), as they were written.
  write URI      only write the pattern through an NBD server at URI
                 (aio_pwrite, --qd requests in flight)
  expect         print the expected number of extents (`nbdinfo --map` lines)
                 and of dirty runs
  check MAPFILE  check an `nbdinfo --map` output against the pattern: every
                 dirty run (merged over adjacent lines) is exactly one of the
                 chosen granules; prints one JSON line, exit status 1 if not

`build` needs qemu-img, qemu-nbd and nbdfleece's interpreter (--nbdfleece-python,
default <repo>/.venv/bin/python, run with the repo as the working folder).
"""
import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_size(text):
    text = text.strip()
    units = "KMGTP"
    if text and text[-1].upper() in units:
        return int(text[:-1]) << (10 * (units.index(text[-1].upper()) + 1))
    return int(text)


def granules(a):
    """Sorted indices of the dirty granules (deterministic for a given seed)."""
    total = a.size // a.granularity
    if a.runs > total // 2:
        sys.exit(f"{a.runs} separated runs do not fit in {total} granules")
    rng = random.Random(a.seed)
    return sorted(2 * i for i in rng.sample(range(total // 2), a.runs))


def expected(a):
    idx = granules(a)
    total = -(-a.size // a.granularity)
    clean = a.runs + 1 - (idx[0] == 0) - (idx[-1] == total - 1)
    return {"runs": a.runs, "extents": a.runs + clean, "dirty_bytes": a.runs * a.granularity}


# -- writing ---------------------------------------------------------------------
def write_pattern(uri, a, log=sys.stderr):
    import nbd
    idx = granules(a)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    if size != a.size:
        sys.exit(f"{uri}: export has {size} bytes, the pattern is for {a.size}")
    buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * a.write_size))
    errors = []

    def cb(err):
        if err.value:
            errors.append(err.value)
        return 1  # retire the command

    t0 = time.perf_counter()
    for g in idx:
        while h.aio_in_flight() >= a.qd:
            h.poll(-1)
        h.aio_pwrite(buf, g * a.granularity, completion=cb)
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    h.shutdown()
    dt = time.perf_counter() - t0
    if errors:
        sys.exit(f"{uri}: {len(errors)} writes failed (first errno {errors[0]})")
    print(f"wrote {len(idx)} x {a.write_size} B through {uri} in {dt:.1f}s", file=log)


# -- checking ----------------------------------------------------------------------
def read_map(path):
    """(offset, length, dirty) per line of `nbdinfo --map` output."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            # "OFFSET LENGTH TYPE DESCRIPTION": type 1 = dirty for qemu:dirty-bitmap
            out.append((int(parts[0]), int(parts[1]), int(parts[2]) & 1))
    return out


def check_map(path, a):
    ext = read_map(path)
    want = expected(a)
    dirty = []
    pos = 0
    contiguous = True
    for off, length, d in ext:
        contiguous &= off == pos
        pos = off + length
        if d:
            if dirty and dirty[-1][0] + dirty[-1][1] == off:
                dirty[-1][1] += length
            else:
                dirty.append([off, length])
    idx = granules(a)
    same = [tuple(r) for r in dirty] == [(g * a.granularity, a.granularity) for g in idx]
    res = {"map": path, "lines": len(ext), "expected_lines": want["extents"],
           "dirty_runs": len(dirty), "expected_runs": want["runs"],
           "covers_export": contiguous and pos == a.size, "same_runs_as_pattern": same}
    res["ok"] = (same and res["covers_export"] and len(dirty) == want["runs"])
    return res


# -- building ---------------------------------------------------------------------
def wait_nbd(path, proc, what, timeout=30.0):
    """Wait until the server at unix socket PATH completes an NBD handshake."""
    import nbd
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode} before it listened")
        if os.path.exists(path):
            h = nbd.NBD()
            try:
                h.connect_uri(f"nbd+unix:///bench?socket={path}")
                h.shutdown()
                return
            except nbd.Error:
                pass
            del h
        time.sleep(0.05)
    sys.exit(f"{what} did not listen on {path} within {timeout}s")


def stop(proc, sig, what):
    """Signal the server's own session (it was started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sys.exit(f"{what} did not stop on {signal.Signals(sig).name}")
    if rc not in (0, -sig):
        sys.exit(f"{what} stopped with status {rc}")


def sparse_du(path):
    return os.stat(path).st_blocks * 512


def build(a):
    os.makedirs(a.dir, exist_ok=True)
    d = os.path.abspath(a.dir)
    gran = a.granularity

    # nbdfleece: sparse raw image, persistent bitmap kept in IMAGE.nbdfleece-bitmaps
    raw = os.path.join(d, "fleece.raw")
    for p in (raw, raw + ".nbdfleece-bitmaps"):
        if os.path.exists(p):
            os.unlink(p)
    with open(raw, "wb") as f:
        f.truncate(a.size)
    sock = os.path.join(d, "fleece-build.sock")
    cmd = [a.nbdfleece_python, "-m", "nbdfleece", "serve", "--listen", f"unix:{sock}",
           "--export", f"bench={raw}", "--bitmap", f"bench:b0,granularity={gran},persistent",
           "--log-level", "warning"]
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        wait_nbd(sock, proc, "nbdfleece")
        write_pattern(f"nbd+unix:///bench?socket={sock}", a)
    finally:
        stop(proc, signal.SIGINT, "nbdfleece")
        if os.path.exists(sock):
            os.unlink(sock)
    if not os.path.exists(raw + ".nbdfleece-bitmaps"):
        sys.exit(f"nbdfleece stored no bitmap next to {raw}")
    print(f"{raw}: {a.size} B, {sparse_du(raw)} B allocated, bitmap b0 in "
          f"{os.path.basename(raw)}.nbdfleece-bitmaps ({time.time() - t:.1f}s)", file=sys.stderr)

    # qemu: qcow2 with a persistent bitmap, written through a writable qemu-nbd
    q = os.path.join(d, "dirty.qcow2")
    if os.path.exists(q):
        os.unlink(q)
    t = time.time()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, str(a.size)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(gran), q, "b0"], check=True)
    sock = os.path.join(d, "qemu-build.sock")
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-t", "-k", sock, "-x", "bench", q],
                            start_new_session=True)
    try:
        wait_nbd(sock, proc, "qemu-nbd")
        write_pattern(f"nbd+unix:///bench?socket={sock}", a)
    finally:
        stop(proc, signal.SIGTERM, "qemu-nbd")
    print(f"{q}: {os.path.getsize(q)} B file, {sparse_du(q)} B allocated, "
          f"bitmap b0 ({time.time() - t:.1f}s)", file=sys.stderr)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", q], check=True,
                                     capture_output=True, text=True).stdout)
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    print(f"{q}: qcow2 bitmaps {json.dumps(bms)}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "write", "expect", "check"])
    ap.add_argument("target", nargs="?", help="DIR (build), URI (write), MAPFILE (check)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1T"))
    ap.add_argument("--granularity", type=parse_size, default=65536)
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--write-size", type=int, default=512)
    ap.add_argument("--qd", type=int, default=64, help="writes in flight")
    ap.add_argument("--nbdfleece-python",
                    default=os.environ.get("NBDFLEECE_PYTHON",
                                           os.path.join(REPO, ".venv", "bin", "python")))
    a = ap.parse_args()
    if a.write_size > a.granularity:
        sys.exit("--write-size must not exceed --granularity (one write, one granule)")
    if a.command == "build":
        if not a.target:
            sys.exit("build wants DIR")
        a.dir = a.target
        build(a)
    elif a.command == "write":
        if not a.target:
            sys.exit("write wants URI")
        write_pattern(a.target, a)
    elif a.command == "expect":
        print(json.dumps(expected(a)))
    else:
        if not a.target:
            sys.exit("check wants MAPFILE")
        res = check_map(a.target, a)
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
