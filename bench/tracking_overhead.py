#!/usr/bin/python3
"""tracking_overhead.py - what a recording dirty bitmap costs 4 KiB random writes.

Two nbdfleece servers on the same raw image, both up for every round:

  plain     --export bench=IMAGE
  tracked   --export bench=IMAGE,bitmap=b0   (b0: recording, 64 KiB granules)

In each round the write client runs once against each (the order alternates
from round to round).  The client is this script's `client` subcommand:
random --bs (4 KiB) aio_pwrite at queue depth --qd (16) for --seconds after a
--warmup, block-aligned offsets over the whole export, one JSON line out (ops,
IOPS, latency percentiles, ops_total).  The server's CPU seconds over each run
(utime+stime of its process, from /proc) divided by ops_total give its CPU
microseconds per request (srv_us_op), the steadier figure once client and
server saturate the cores.

Output: a markdown table (medians, min-max, per-round paired ratios) on
stdout and in --md, all records in --json.  The overhead is
1 - IOPS(tracked)/IOPS(plain) per round; the target is a median under 10 %.
At the end the tracked server's b0 is read with `nbdinfo --map` to show
that it did record the writes, and the tracking layer's own cost per write is
timed in-process (timeit, nbdfleece's interpreter, a no-op child below it):
a floor that the noise of a shared machine does not move much.

Usage:
  tracking_overhead.py run --image IMG [--runs 5] [--seconds 3] [--qd 16] [--bs 4096]
                          [--nbdfleece-python PY] [--md FILE] [--json FILE]
  tracking_overhead.py client --uri URI [--qd 16] [--bs 4096] [--seconds 3] [--seed 1]

Run it with a python that has libnbd's `nbd` module (Debian python3-libnbd,
/usr/bin/python3).  nbdfleece runs under --nbdfleece-python (default
$NBDFLEECE_PYTHON or <repo>/.venv/bin/python) with the repo as working folder.
"""
import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")


# -- client ------------------------------------------------------------------------
def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def client(a):
    import nbd
    h = nbd.NBD()
    h.connect_uri(a.uri)
    if h.is_read_only():
        sys.exit(f"{a.uri}: export is read-only")
    size = h.get_size()
    nblocks = size // a.bs
    rng = random.Random(a.seed)
    offs = [rng.randrange(nblocks) * a.bs for _ in range(1 << 16)]
    payload = bytearray(os.urandom(a.bs))
    bufs = [nbd.Buffer.from_bytearray(payload) for _ in range(a.qd)]
    done = []
    errors = []

    def make_cb(slot):
        def cb(err):                # must not call into the handle from here
            if err.value:
                errors.append(err.value)
            done.append(slot)
            return 1                # retire the command
        return cb
    cbs = [make_cb(i) for i in range(a.qd)]
    clock = time.perf_counter
    started = [0.0] * a.qd
    lat = []
    oi = 0
    t0 = clock()
    t_count = t0 + a.warmup
    t_end = t_count + a.seconds
    for s in range(a.qd):
        started[s] = clock()
        h.aio_pwrite(bufs[s], offs[oi & 0xFFFF], completion=cbs[s])
        oi += 1
    ops_total = 0
    while True:
        h.poll(-1)
        now = clock()
        if done:
            slots = done[:]
            del done[:]
            ops_total += len(slots)
            for s in slots:
                if now >= t_count:
                    lat.append(now - started[s])
                if now < t_end:
                    started[s] = clock()
                    h.aio_pwrite(bufs[s], offs[oi & 0xFFFF], completion=cbs[s])
                    oi += 1
        if now >= t_end and h.aio_in_flight() == 0:
            break
    h.shutdown()
    if errors:
        sys.exit(f"{len(errors)} writes failed (first errno {errors[0]})")
    n = len(lat)
    lat.sort()
    us = lambda v: None if v is None else round(v * 1e6, 1)  # noqa: E731
    print(json.dumps({"qd": a.qd, "bs": a.bs, "ops": n, "seconds": a.seconds,
                      "ops_total": ops_total, "iops": round(n / a.seconds, 1),
                      "MBps": round(n * a.bs / a.seconds / 1e6, 2),
                      "p50_us": us(pct(lat, 50)), "p90_us": us(pct(lat, 90)),
                      "p99_us": us(pct(lat, 99)), "max_us": us(lat[-1] if lat else None)}))


# -- orchestration -----------------------------------------------------------------
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime


class Server:
    def __init__(self, name, py, image, extra, log):
        self.name = name
        self.port = free_port()
        self.uri = f"nbd://127.0.0.1:{self.port}/bench"
        self.cmd = [py, "-m", "nbdfleece", "serve", "--listen", f"127.0.0.1:{self.port}",
                    "--export", f"bench={image}{extra}", "--log-level", "warning"]
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, start_new_session=True,
                                     stdout=log, stderr=log)

    def wait(self, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name}: server exited with status {self.proc.returncode}")
            r = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        sys.exit(f"{self.name}: server not ready on {self.uri} within {timeout}s")

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_client(a, srv, rnd):
    cmd = [sys.executable, os.path.abspath(__file__), "client", "--uri", srv.uri,
           "--qd", str(a.qd), "--bs", str(a.bs), "--seconds", str(a.seconds),
           "--warmup", str(a.warmup), "--seed", str(rnd)]
    c0 = cpu_seconds(srv.proc.pid)
    ru0 = os.times()
    r = subprocess.run(cmd, capture_output=True, text=True)
    ru1 = os.times()
    c1 = cpu_seconds(srv.proc.pid)
    if r.returncode != 0:
        sys.exit(f"{srv.name}: client failed: {r.stderr.strip()}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec.update(server=srv.name, round=rnd, server_cpu=round(c1 - c0, 3),
               client_cpu=round((ru1.children_user - ru0.children_user)
                                + (ru1.children_system - ru0.children_system), 3))
    rec["srv_us_op"] = round(rec["server_cpu"] / rec["ops_total"] * 1e6, 2)
    rec["cli_us_op"] = round(rec["client_cpu"] / rec["ops_total"] * 1e6, 2)
    return rec


MICRO = r'''
import json, timeit
setup = """
from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.tracking import DirtyTracking
class Child:  # stands in for the file store: only the tracking layer is timed
    size = 1 << 30
    def write_nowait(self, offset, data):
        return True
plain = DirtyTracking("plain", Child())
tracked = DirtyTracking("tracked", Child())
tracked.bitmaps["b0"] = DirtyBitmap("b0", 1 << 30)
data = memoryview(bytearray(4096))
offset = 12345 * 4096
"""
n = 200000
out = {}
for name in ("plain", "tracked"):
    best = min(timeit.repeat(name + ".write_nowait(offset, data)", setup, number=n, repeat=7))
    out[name] = best / n * 1e6
print(json.dumps(out))
'''


def micro(a):
    """Per-write cost of the tracking layer alone, in the nbdfleece interpreter."""
    r = subprocess.run([a.nbdfleece_python, "-c", MICRO], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"in-process timing failed: {r.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(r.stdout)


def med_range(vals, fmt):
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return f"{fmt.format(statistics.median(vals))} ({lo}\u2013{hi})"


def summarise(a, recs, dirty_map, mic):
    by = {(r["server"], r["round"]): r for r in recs}
    rounds = sorted({r["round"] for r in recs})
    names = ["plain", "tracked"]
    lines = [
        f"## 4 KiB random writes, QD{a.qd}: nbdfleece with and without a recording bitmap",
        "",
        f"image {a.image_desc}; {a.runs} rounds, {a.seconds:g} s measured per run after "
        f"{a.warmup:g} s warm-up; order alternates per round",
        "",
        "| server | IOPS | p50 µs | p99 µs | server CPU µs/op | client CPU µs/op |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = [by[(n, i)] for i in rounds]
        lines.append(
            f"| {n} | {med_range([r['iops'] for r in rs], '{:.0f}')} "
            f"| {med_range([r['p50_us'] for r in rs], '{:.0f}')} "
            f"| {med_range([r['p99_us'] for r in rs], '{:.0f}')} "
            f"| {med_range([r['srv_us_op'] for r in rs], '{:.1f}')} "
            f"| {med_range([r['cli_us_op'] for r in rs], '{:.1f}')} |")
    iops_ratio = [by[("tracked", i)]["iops"] / by[("plain", i)]["iops"] for i in rounds]
    cpu_ratio = [by[("tracked", i)]["srv_us_op"] / by[("plain", i)]["srv_us_op"] for i in rounds]
    overhead = [1 - x for x in iops_ratio]
    cpu_over = [x - 1 for x in cpu_ratio]
    lines += [
        "",
        "Per-round paired ratios (tracked ÷ plain):",
        "",
        "| round | first | IOPS ratio | server µs/op ratio |",
        "|---|---|---|---|",
    ]
    for i, x, y in zip(rounds, iops_ratio, cpu_ratio, strict=True):
        first = "plain" if i % 2 else "tracked"
        lines.append(f"| {i} | {first} | {x:.3f} | {y:.3f} |")
    m_over = statistics.median(overhead)
    m_cpu = statistics.median(cpu_over)
    verdict = "PASS" if m_over < 0.10 else "MISS"
    lines += [
        "",
        f"- IOPS overhead of tracking, median of paired rounds: **{m_over * 100:+.1f} %** "
        f"(range {min(overhead) * 100:+.1f} … {max(overhead) * 100:+.1f} %) — target < 10 %: "
        f"**{verdict}**",
        f"- server CPU per write, median of paired rounds: {m_cpu * 100:+.1f} % "
        f"(range {min(cpu_over) * 100:+.1f} … {max(cpu_over) * 100:+.1f} %)",
        f"- tracked server's b0 after all rounds: {dirty_map}",
    ]
    if mic:
        added = mic["tracked"] - mic["plain"]
        plain_us = statistics.median(by[("plain", i)]["srv_us_op"] for i in rounds)
        lines.append(
            f"- in-process floor (DirtyTracking.write_nowait over a no-op child, best of 7): "
            f"{mic['plain']:.2f} µs without, {mic['tracked']:.2f} µs with b0: "
            f"+{added:.2f} µs per write = {100 * added / plain_us:.1f} % of the plain server's "
            f"median {plain_us:.1f} µs/op")
    return "\n".join(lines) + "\n"


def run(a):
    if not os.path.isfile(a.image):
        sys.exit(f"no image {a.image}")
    if os.path.exists(a.image + ".nbdfleece-bitmaps"):
        sys.exit(f"{a.image} has persistent nbdfleece bitmaps: use a fresh image")
    size = os.path.getsize(a.image)
    a.image_desc = f"{size} B raw ({os.path.basename(a.image)})"
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(a.server_log, "a")) if a.server_log else subprocess.DEVNULL
        measure(a, log, size)


def measure(a, log, size):
    servers = {}
    recs = []
    try:
        servers["plain"] = Server("plain", a.nbdfleece_python, a.image, "", log)
        servers["tracked"] = Server("tracked", a.nbdfleece_python, a.image, ",bitmap=b0", log)
        for s in servers.values():
            s.wait()
        for rnd in range(1, a.runs + 1):
            order = ["plain", "tracked"] if rnd % 2 else ["tracked", "plain"]
            for name in order:
                rec = run_client(a, servers[name], rnd)
                recs.append(rec)
                print(f"round {rnd} {name:8s} iops={rec['iops']:.0f} p50={rec['p50_us']}us "
                      f"p99={rec['p99_us']}us srv_us_op={rec['srv_us_op']} "
                      f"cli_us_op={rec['cli_us_op']}", file=sys.stderr, flush=True)
        # Show that the tracked server really recorded the writes.
        m = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", servers["tracked"].uri],
                           capture_output=True, text=True)
        if m.returncode != 0:
            sys.exit(f"tracked: cannot read b0: {m.stderr.strip()}")
        dirty = sum(int(line.split()[1]) for line in m.stdout.splitlines()
                    if line.split() and int(line.split()[2]) & 1)
        runs = sum(1 for line in m.stdout.splitlines() if line.split() and int(line.split()[2]) & 1)
        dirty_map = (f"{dirty} B dirty of {size} B ({100.0 * dirty / size:.1f} %) "
                     f"in {runs} runs")
        p = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", servers["plain"].uri],
                           capture_output=True, text=True)
        if p.returncode == 0:
            sys.exit("plain: offers qemu:dirty-bitmap:b0, it should have no bitmap")
    finally:
        for s in servers.values():
            s.stop()
    text = summarise(a, recs, dirty_map, micro(a))
    print(text)
    if a.md:
        with open(a.md, "a") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "func"},
                       "records": recs}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("client", help="the random-write load generator")
    c.add_argument("--uri", required=True)
    r = sub.add_parser("run", help="plain vs tracked nbdfleece, alternating rounds")
    r.add_argument("--image", required=True)
    r.add_argument("--runs", type=int, default=5)
    r.add_argument("--nbdfleece-python",
                   default=os.environ.get("NBDFLEECE_PYTHON",
                                          os.path.join(REPO, ".venv", "bin", "python")))
    r.add_argument("--md", help="append the markdown summary to this file")
    r.add_argument("--json", help="write every record to this file")
    r.add_argument("--server-log", help="append the servers' output to this file")
    for p in (c, r):
        p.add_argument("--qd", type=int, default=16)
        p.add_argument("--bs", type=int, default=4096)
        p.add_argument("--seconds", type=float, default=3.0)
        p.add_argument("--warmup", type=float, default=0.5, help="seconds not counted")
    c.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.command == "client":
        client(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
