#!/usr/bin/env bash
# run_load.sh - load benchmark: 64 concurrent NBD clients (reads, writes, zeroes, block
# status on their own and others' blocks) on 3 exports for 60 s while snapshots are
# created and deleted, everything verified against a data model (bench/load.py).
#
# Environment overrides:
#   CLIENTS           concurrent client connections (default 64)
#   EXPORTS           exports (default 3)
#   SIZE              size of each export's image (default 256M)
#   DURATION          measured seconds (default 60; not SECONDS, which bash owns)
#   SNAPSHOT_INTERVAL seconds between the end of one snapshot round and the next (default 3)
#   KEEP              snapshots alive at a time (default 2)
#   SEED              random seed (default 1)
#   OUT               results folder (default: <repo>/bench/results)
#   BENCH_PYTHON      interpreter for the clients and the server; it must import libnbd's
#                     `nbd` module and nbdfleece (default: <repo>/.venv/bin/python, which is
#                     built with --system-site-packages for that reason)
#   TMPBASE           where the scratch folder is created (default /dev/shm)
#
# Output: a markdown summary on stdout and in $OUT/load-<stamp>.md, every figure and
# sample in $OUT/load-<stamp>.json, the server's log in $OUT/load-<stamp>.server.log.
# Exit status 1 if there was any protocol error or verification failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

CLIENTS=${CLIENTS:-64}
EXPORTS=${EXPORTS:-3}
SIZE=${SIZE:-256M}
DURATION=${DURATION:-60}
SNAPSHOT_INTERVAL=${SNAPSHOT_INTERVAL:-3}
KEEP=${KEEP:-2}
SEED=${SEED:-1}
OUT=${OUT:-"$repo/bench/results"}
BENCH_PYTHON=${BENCH_PYTHON:-"$repo/.venv/bin/python"}
TMPBASE=${TMPBASE:-/dev/shm}

if ! (cd "$repo" && "$BENCH_PYTHON" -c 'import nbd, nbdfleece, numpy') 2>/dev/null; then
    echo "run_load.sh: $BENCH_PYTHON cannot import nbd (python3-libnbd), nbdfleece and numpy" >&2
    echo "  (the repo's .venv is made with --system-site-packages: tools/test.sh builds it)" >&2
    exit 2
fi

tmp=$(mktemp -d -p "$TMPBASE" nbdfleece-load.XXXXXX)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "run_load.sh: $CLIENTS clients, $EXPORTS x $SIZE on $tmp ($(stat -f -c %T "$tmp")), ${DURATION}s" >&2
"$BENCH_PYTHON" "$here/load.py" \
    --workdir "$tmp" --out "$OUT" --python "$BENCH_PYTHON" --repo "$repo" \
    --clients "$CLIENTS" --exports "$EXPORTS" --size "$SIZE" --seconds "$DURATION" \
    --snapshot-interval "$SNAPSHOT_INTERVAL" --keep "$KEEP" --seed "$SEED"
