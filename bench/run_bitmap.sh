#!/usr/bin/env bash
# run_bitmap.sh - dirty-bitmap benchmarks (issue 3): nbdfleece vs qemu-nbd.
#
# Part A, block status of a dirty bitmap: a 1 TiB export with a 64 KiB-granule
# bitmap b0 holding 100,000 separate dirty runs, read whole with
#   nbdinfo --map=qemu:dirty-bitmap:b0 nbd://127.0.0.1:PORT/bench
# against
#   nbdfleece serve --export bench=fleece.raw,readonly,bitmap=b0   (sparse raw,
#                   b0 persisted in fleece.raw.nbdfleece-bitmaps)
#   qemu-nbd -r -f qcow2 -B b0 -t -x bench dirty.qcow2            (qcow2 bitmap)
# Both images get the same pattern from bench/mk_bitmap_images.py (written
# through each server, 512 B at the start of each chosen granule).  Both maps
# are checked (same dirty runs as the pattern, one line per extent) before
# timing.  Both servers stay up; in each round each is timed once, the order
# alternates.  Target: nbdfleece at least as fast as qemu-nbd (paired ratio
# ours/qemu seconds <= 1.0).
#
# Part B, cost of tracking on 4 KiB random writes (QD16): nbdfleece with and
# without a recording bitmap on the same raw image (bench/tracking_overhead.py).
# Target: under 10 % fewer IOPS.
#
# Usage: bench/run_bitmap.sh [a|b|all]        (default all)
#
# Environment overrides:
#   RUNS              rounds per part (default 5)
#   OUT               results folder (default <repo>/bench/results)
#   TMPBASE           where the scratch folder is made (default /dev/shm)
#   NBDFLEECE_PYTHON  interpreter that runs nbdfleece (default <repo>/.venv/bin/python)
#   BENCH_PYTHON      interpreter with libnbd's `nbd` module (default /usr/bin/python3)
#   DIRTY_RUNS        dirty runs in part A (default 100000)
#   MAP_SIZE          export size in part A (default 1T)
#   W_SIZE            image size in part B, filled from /dev/urandom (default 1G)
#   W_SECONDS         measured seconds per part B run (default 3, plus 0.5 s warm-up)
#   W_QD              part B queue depth (default 16)
#   IMAGES            keep part A's images in this folder and reuse them on the next
#                     run (default: build them in the scratch folder, removed at exit)
#
# Output: $OUT/bitmap-<stamp>.md (tables), .tsv (part A per-run records),
# .json (part B per-run records), .log (servers' stderr).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

PART=${1:-all}
case "$PART" in a|b|all) ;; *) echo "usage: $0 [a|b|all]" >&2; exit 2 ;; esac
RUNS=${RUNS:-5}
OUT=${OUT:-"$repo/bench/results"}
TMPBASE=${TMPBASE:-/dev/shm}
NBDFLEECE_PYTHON=${NBDFLEECE_PYTHON:-"$repo/.venv/bin/python"}
BENCH_PYTHON=${BENCH_PYTHON:-/usr/bin/python3}
DIRTY_RUNS=${DIRTY_RUNS:-100000}
MAP_SIZE=${MAP_SIZE:-1T}
W_SIZE=${W_SIZE:-1G}
W_SECONDS=${W_SECONDS:-3}
W_QD=${W_QD:-16}
export NBDFLEECE_PYTHON

fail=0
for tool in nbdinfo qemu-img qemu-nbd; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run_bitmap.sh: '$tool' not found in PATH" >&2
        fail=1
    fi
done
if ! "$BENCH_PYTHON" -c 'import nbd' 2>/dev/null; then
    echo "run_bitmap.sh: $BENCH_PYTHON cannot import libnbd's 'nbd' module (set BENCH_PYTHON)" >&2
    fail=1
fi
if ! (cd "$repo" && "$NBDFLEECE_PYTHON" -c 'import nbdfleece') 2>/dev/null; then
    echo "run_bitmap.sh: $NBDFLEECE_PYTHON cannot import nbdfleece (set NBDFLEECE_PYTHON)" >&2
    fail=1
fi
[ "$fail" -eq 0 ] || exit 2

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp=$(date +%Y%m%d-%H%M%S)
md="$OUT/bitmap-$stamp.md"
tsv="$OUT/bitmap-$stamp.tsv"
json="$OUT/bitmap-$stamp.json"
logf="$OUT/bitmap-$stamp.log"

tmp=$(mktemp -d -p "$TMPBASE" nbdfleece-bitmap.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -INT "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mk() { "$BENCH_PYTHON" "$here/mk_bitmap_images.py" "$@" --size "$MAP_SIZE" --runs "$DIRTY_RUNS"; }
free_port() { "$BENCH_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk_tck=$(getconf CLK_TCK)
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
wait_ready() {  # URI PID NAME
    local i
    for i in $(seq 1 300); do
        kill -0 "$2" 2>/dev/null || { echo "run_bitmap.sh: $3 exited early (see $logf)" >&2; exit 1; }
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "run_bitmap.sh: $3 not ready on $1" >&2
    exit 1
}

{
    echo "# nbdfleece dirty-bitmap benchmarks ($stamp)"
    echo
    echo "host: $(nproc) CPUs, $(uname -r); $(qemu-nbd --version | head -1); $(nbdinfo --version | head -1)"
    echo "scratch: $TMPBASE ($(stat -f -c %T "$tmp"))"
    echo
} > "$md"

part_a() {
    local img=${IMAGES:-$tmp}
    if [ -f "$img/fleece.raw.nbdfleece-bitmaps" ] && [ -f "$img/dirty.qcow2" ]; then
        echo "run_bitmap.sh: part A: reusing the images in $img" >&2
    else
        echo "run_bitmap.sh: part A: building the images in $img ($MAP_SIZE sparse raw + qcow2)" >&2
        mkdir -p "$img"
        mk build "$img" 2>>"$logf" || { echo "run_bitmap.sh: image build failed (see $logf)" >&2; exit 1; }
        tail -n 5 "$logf" >&2
    fi

    local pf pq
    pf=$(free_port); pq=$(free_port)
    while [ "$pq" = "$pf" ]; do pq=$(free_port); done
    local uf="nbd://127.0.0.1:$pf/bench" uq="nbd://127.0.0.1:$pq/bench"
    (cd "$repo" && exec "$NBDFLEECE_PYTHON" -m nbdfleece serve --listen "127.0.0.1:$pf" \
        --export "bench=$img/fleece.raw,readonly,bitmap=b0" --log-level warning) 2>>"$logf" &
    local fpid=$!
    pids+=("$fpid")
    qemu-nbd -r -f qcow2 -B b0 -t -b 127.0.0.1 -p "$pq" -x bench "$img/dirty.qcow2" 2>>"$logf" &
    local qpid=$!
    pids+=("$qpid")
    wait_ready "$uf" "$fpid" nbdfleece
    wait_ready "$uq" "$qpid" qemu-nbd

    # Check both maps before timing anything.
    local name uri
    for name in nbdfleece qemu-nbd; do
        [ "$name" = nbdfleece ] && uri=$uf || uri=$uq
        nbdinfo --map=qemu:dirty-bitmap:b0 "$uri" > "$tmp/$name.map"
        if ! mk check "$tmp/$name.map" > "$tmp/$name.check"; then
            echo "run_bitmap.sh: $name's map does not match the pattern: $(cat "$tmp/$name.check")" >&2
            exit 1
        fi
        echo "run_bitmap.sh: $name map: $(cat "$tmp/$name.check")" >&2
    done
    local same=yes
    cmp -s "$tmp/nbdfleece.map" "$tmp/qemu-nbd.map" || same=no
    local expect_lines
    expect_lines=$("$BENCH_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["expected_lines"])' \
        < "$tmp/nbdfleece.check")

    printf 'round\tserver\tseconds\tlines\tserver_cpu\tclient_cpu\n' > "$tsv"
    local r c0 c1 lines order tm TIMEFORMAT='%R %U %S'
    for r in $(seq 1 "$RUNS"); do
        if [ $((r % 2)) -eq 1 ]; then order="nbdfleece qemu-nbd"; else order="qemu-nbd nbdfleece"; fi
        for name in $order; do
            if [ "$name" = nbdfleece ]; then uri=$uf; pid=$fpid; else uri=$uq; pid=$qpid; fi
            c0=$(ticks "$pid")
            tm=$( { time nbdinfo --map=qemu:dirty-bitmap:b0 "$uri" > "$tmp/run.map"; } 2>&1 )
            c1=$(ticks "$pid")
            lines=$(wc -l < "$tmp/run.map")
            if [ "$lines" -ne "$expect_lines" ]; then
                echo "run_bitmap.sh: $name returned $lines lines, expected $expect_lines" >&2
                exit 1
            fi
            # shellcheck disable=SC2086
            set -- $tm
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$name" "$1" "$lines" \
                "$(awk -v a="$c0" -v b="$c1" -v t="$clk_tck" 'BEGIN { printf "%.2f", (b - a) / t }')" \
                "$(awk -v u="$2" -v s="$3" 'BEGIN { printf "%.3f", u + s }')" >> "$tsv"
            echo "round $r $(tail -n 1 "$tsv" | cut -f2-)" >&2
        done
    done

    "$BENCH_PYTHON" - "$tsv" "$tmp/nbdfleece.check" "$tmp/qemu-nbd.check" "$same" "$MAP_SIZE" \
        >> "$md" <<'EOF'
import csv, json, statistics as st, sys
tsv, fcheck, qcheck, same, size = sys.argv[1:6]
rows = list(csv.DictReader(open(tsv), delimiter="\t"))
by = {(r["server"], int(r["round"])): r for r in rows}
rounds = sorted({int(r["round"]) for r in rows})
fc, qc = json.load(open(fcheck)), json.load(open(qcheck))
def mr(vals, f="{:.3f}"):
    return f"{f.format(st.median(vals))} ({f.format(min(vals))}–{f.format(max(vals))})"
print(f"## A. `nbdinfo --map=qemu:dirty-bitmap:b0` on a {size} export, 64 KiB granules, "
      f"{fc['expected_runs']} dirty runs")
print()
print(f"{len(rounds)} rounds, order alternating; seconds = wall time of the whole nbdinfo "
      f"process (start, handshake, all block-status requests, printing {fc['expected_lines']} "
      f"lines); server CPU from /proc (10 ms ticks), nbdinfo CPU = its user+sys.")
print()
print("| server | seconds, median (min–max) | server CPU s | nbdinfo CPU s | map lines | dirty runs |")
print("|---|---|---|---|---|---|")
for name, chk in (("nbdfleece", fc), ("qemu-nbd", qc)):
    rs = [by[(name, i)] for i in rounds]
    print(f"| {name} | {mr([float(r['seconds']) for r in rs])} "
          f"| {mr([float(r['server_cpu']) for r in rs], '{:.2f}')} "
          f"| {mr([float(r['client_cpu']) for r in rs], '{:.2f}')} "
          f"| {rs[0]['lines']} | {chk['dirty_runs']} |")
ratios = [float(by[("nbdfleece", i)]["seconds"]) / float(by[("qemu-nbd", i)]["seconds"])
          for i in rounds]
print()
print("Paired ratio nbdfleece ÷ qemu-nbd seconds per round (< 1 = nbdfleece faster): "
      + ", ".join(f"{x:.3f}" for x in ratios))
m = st.median(ratios)
print()
print(f"- median paired ratio: **{m:.3f}** — target ≤ 1.0 (at least as fast as qemu-nbd): "
      f"**{'PASS' if m <= 1.0 else 'MISS'}**")
print(f"- both maps checked against the pattern: nbdfleece {fc['ok']}, qemu-nbd {qc['ok']}; "
      f"byte-identical nbdinfo output: {same}")
print()
EOF

    local p
    for p in "$fpid" "$qpid"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
    if [ -z "${IMAGES:-}" ]; then
        rm -f "$tmp/dirty.qcow2" "$tmp/fleece.raw" "$tmp/fleece.raw.nbdfleece-bitmaps"
    fi
}

part_b() {
    echo "run_bitmap.sh: part B: $W_SIZE random image, 4 KiB random writes QD$W_QD" >&2
    head -c "$W_SIZE" /dev/urandom > "$tmp/w.raw"
    "$BENCH_PYTHON" "$here/tracking_overhead.py" run --image "$tmp/w.raw" --runs "$RUNS" \
        --seconds "$W_SECONDS" --qd "$W_QD" --nbdfleece-python "$NBDFLEECE_PYTHON" \
        --md "$md" --json "$json" --server-log "$logf" > /dev/null
    rm -f "$tmp/w.raw"
}

case "$PART" in
    a) part_a ;;
    b) part_b ;;
    all) part_a; part_b ;;
esac

echo >&2
cat "$md"
echo "run_bitmap.sh: results in $md" >&2
