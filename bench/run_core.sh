#!/usr/bin/env bash
# run_core.sh - core side-by-side benchmark: nbdfleece vs qemu-nbd vs nbdkit file.
#
# Drives the shared peer harness (peer_bench.sh) on one 1 GiB random-data raw
# image on tmpfs (/dev/shm, so the page cache is always warm), everything on
# 127.0.0.1, same clients for every server, server order rotated each round.
# Workloads: W0, W2, W1a, W1b, W1c, W3q1, W3q16 (see bench/README.md).
#
# Environment overrides:
#   SHARED_BENCH      harness folder (default: <repo>/../shared/bench, i.e.
#                     "$(dirname "$0")/../../shared/bench")
#   RUNS              rounds (default 5)
#   OUT               results folder (default: <repo>/bench/results)
#   SIZE              image size for head -c (default 1G)
#   W3_SECONDS        seconds per W3 run (default 3)
#   BASELINE          column the harness's [xR] ratios are taken against (default qemu-nbd)
#   NBDFLEECE_PYTHON  interpreter that runs nbdfleece (default: <repo>/.venv/bin/python)
#   PEER_BENCH_PYTHON interpreter with libnbd's `nbd` module (default /usr/bin/python3)
#   TMPBASE           where the scratch dir is created (default /dev/shm)
#   SHARED_IMAGE      1 (default): every server serves the same image file (W2 writes
#                     the same bytes back), so all read the same page-cache pages;
#                     0: each server gets its own copy (the harness's default)
#
# Output: the harness's markdown table, then an "nbdfleece vs peers" table with
# the per-round paired ratios and the targets (bench/core_summary.py).  Both are
# printed and saved as $OUT/core-<stamp>.md; raw records in $OUT/core-<stamp>.json,
# the harness's progress log in $OUT/core-<stamp>.log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

SHARED_BENCH=${SHARED_BENCH:-"$(dirname "$0")/../../shared/bench"}
if [ ! -f "$SHARED_BENCH/peer_bench.sh" ] || [ ! -f "$SHARED_BENCH/peer_bench.py" ]; then
    echo "run_core.sh: shared bench harness not found in '$SHARED_BENCH'" >&2
    echo "  (expected peer_bench.sh and peer_bench.py there; the repo is normally checked out" >&2
    echo "   next to shared/, or set SHARED_BENCH=/path/to/shared/bench)" >&2
    exit 2
fi
SHARED_BENCH=$(cd "$SHARED_BENCH" && pwd)

RUNS=${RUNS:-5}
OUT=${OUT:-"$repo/bench/results"}
SIZE=${SIZE:-1G}
W3_SECONDS=${W3_SECONDS:-3}
BASELINE=${BASELINE:-qemu-nbd}
TMPBASE=${TMPBASE:-/dev/shm}
SHARED_IMAGE=${SHARED_IMAGE:-1}
NBDFLEECE_PYTHON=${NBDFLEECE_PYTHON:-"$repo/.venv/bin/python"}
PEER_BENCH_PYTHON=${PEER_BENCH_PYTHON:-/usr/bin/python3}
export NBDFLEECE_PYTHON PEER_BENCH_PYTHON

fail=0
for tool in nbdinfo nbdcopy qemu-img qemu-nbd nbdkit; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run_core.sh: '$tool' not found in PATH" >&2
        fail=1
    fi
done
if ! "$PEER_BENCH_PYTHON" -c 'import nbd' 2>/dev/null; then
    echo "run_core.sh: $PEER_BENCH_PYTHON cannot import libnbd's 'nbd' module (set PEER_BENCH_PYTHON)" >&2
    fail=1
fi
if ! (cd "$repo" && "$NBDFLEECE_PYTHON" -c 'import nbdfleece') 2>/dev/null; then
    echo "run_core.sh: $NBDFLEECE_PYTHON cannot import nbdfleece (set NBDFLEECE_PYTHON)" >&2
    fail=1
fi
[ "$fail" -eq 0 ] || exit 2

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp=$(date +%Y%m%d-%H%M%S)
md="$OUT/core-$stamp.md"
json="$OUT/core-$stamp.json"
logf="$OUT/core-$stamp.log"

tmp=$(mktemp -d -p "$TMPBASE" nbdfleece-bench.XXXXXX)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "run_core.sh: writing $SIZE of random data to $tmp/disk.raw ($(stat -f -c %T "$tmp"))" >&2
head -c "$SIZE" /dev/urandom > "$tmp/disk.raw"
mkdir "$tmp/work"

# Two copies of one image made a few seconds apart read at measurably different
# CPU cost here (up to 10 %, more as they age: page placement in the VM), which
# would be charged to whichever server got the slower copy.
copy_opt=()
if [ "$SHARED_IMAGE" = 1 ]; then
    copy_opt=(--no-copy)
fi

rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no -- nbdfleece 2>/dev/null)" ]; then
    rev="$rev+dirty"
fi

# nbdfleece is started with the repo as working directory (so `-m nbdfleece`
# resolves to this checkout even if the venv has no editable install).
cd "$repo"
"$SHARED_BENCH/peer_bench.sh" \
    --workdir "$tmp/work" --image "$tmp/disk.raw" "${copy_opt[@]}" \
    --runs "$RUNS" --w3-seconds "$W3_SECONDS" \
    --workloads W0,W2,W1a,W1b,W1c,W3q1,W3q16 \
    --baseline "$BASELINE" \
    --title "nbdfleece core bench, nbdfleece $rev, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), shared image=$SHARED_IMAGE" \
    --md-out "$md" --json-out "$json" \
    --server 'nbdfleece={env[NBDFLEECE_PYTHON]} -m nbdfleece serve --listen 127.0.0.1:{port} --export {export}={image} --log-level warning' \
    --server 'qemu-nbd=qemu-nbd -f raw -t -e 8 -b 127.0.0.1 -p {port} -x {export} {image}' \
    --server 'nbdkit-file=nbdkit -f -i 127.0.0.1 -p {port} file {image}' \
    2> >(tee "$logf" >&2) || { rc=$?; echo "run_core.sh: harness failed (rc=$rc), log: $logf" >&2; exit "$rc"; }

"$PEER_BENCH_PYTHON" "$here/core_summary.py" --ours nbdfleece "$json" > "$tmp/summary.md"
cat "$tmp/summary.md"
{ echo; cat "$tmp/summary.md"; } >> "$md"
echo "run_core.sh: saved $md, $json, $logf" >&2
