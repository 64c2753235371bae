#!/usr/bin/env bash
# run_backup.sh - the backup agent (nbdfleece-backup) against nbdcopy, on nbdfleece.
#
#   full backup   nbdfleece-backup full (whole command: QMP, snapshot, plan, read over
#                 4 connections, qcow2 write, checksum, fsync, teardown) vs nbdcopy of
#                 a snapshot of the same disk to a raw file on the same filesystem
#   incremental   1 % of the disk rewritten as scattered 64 KiB blocks, then
#                 nbdfleece-backup incremental vs nbdcopy of the whole disk to null:
#                 targets: bytes read <= dirty bytes + 5 %, full >= 0.8x nbdcopy
#
# Usage: bench/run_backup.sh
#
# Environment overrides:
#   RUNS              rounds (default 5; order rotates every round)
#   SIZE              disk size in bytes (default 4 GiB; halved until it fits the
#                     free space of TMPBASE, and the run says so)
#   OUT               results folder (default <repo>/bench/results)
#   TMPBASE           where the scratch folder is made (default /dev/shm)
#   NBDFLEECE_PYTHON  interpreter with nbdfleece installed (default <repo>/.venv/bin/python)
#   AB                a git revision: its nbdfleece_backup and its nbdfleece package (git
#                     archive into the scratch folder; the agent imports them first, so the
#                     NBD client is that revision's too) join the full-backup rounds as
#                     '<AB_CHECKSUM>-ab' (A/B in the same rounds; the server is this checkout's)
#   AB_CHECKSUM       piece checksum of the A/B full backup (default sha256)
#   CHECKSUMS         piece checksums of this checkout's full backups (default
#                     xxh3-128,sha256,crc32)
#   SETTLE            seconds to pause before each timed full backup and nbdcopy (default
#                     0): every command then starts with the memory freed by the one
#                     before already handed back to the host (VM free page reporting)
#
# Output: $OUT/backup-<stamp>.json (every round and the medians) and .log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
RUNS=${RUNS:-5}
OUT=${OUT:-"$repo/bench/results"}
TMPBASE=${TMPBASE:-/dev/shm}
SIZE=${SIZE:-$((4 << 30))}
NBDFLEECE_PYTHON=${NBDFLEECE_PYTHON:-"$repo/.venv/bin/python"}
AB=${AB:-}
AB_CHECKSUM=${AB_CHECKSUM:-sha256}
CHECKSUMS=${CHECKSUMS:-xxh3-128,sha256,crc32}
SETTLE=${SETTLE:-0}

command -v nbdcopy >/dev/null || { echo "missing: nbdcopy" >&2; exit 1; }
[ -x "$NBDFLEECE_PYTHON" ] || { echo "missing: $NBDFLEECE_PYTHON" >&2; exit 1; }

# Space: the disk's data (half its size), a full backup of it, an nbdcopy copy, the chain.
free=$(df --output=avail -B1 "$TMPBASE" | tail -1)
wanted=$SIZE
while [ $((SIZE * 2)) -gt "$free" ] && [ "$SIZE" -gt $((256 << 20)) ]; do
    SIZE=$((SIZE / 2))
done
if [ "$SIZE" != "$wanted" ]; then
    echo "note: $TMPBASE has $((free >> 20)) MiB free: the disk is $((SIZE >> 20)) MiB, not $((wanted >> 20)) MiB"
fi

mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
scratch=$(mktemp -d -p "$TMPBASE" nbdfleece-backup-bench.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
{
    echo "nbdfleece-backup benchmark, $(date -u), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "disk $((SIZE >> 20)) MiB on $TMPBASE, $RUNS rounds, settle $SETTLE s before each timed command"
    nbdcopy --version | sed -n 1p
    cd "$repo"
    ab=()
    if [ -n "$AB" ]; then
        mkdir "$scratch/ab"
        git -C "$repo" archive "$AB" tools/nbdfleece_backup nbdfleece | tar -x -C "$scratch/ab"
        mv "$scratch/ab/nbdfleece" "$scratch/ab/tools/"
        echo "A/B: $AB_CHECKSUM-ab is nbdfleece_backup + nbdfleece of $AB ($(git -C "$repo" rev-parse --short "$AB"))"
        ab=(--ab "$scratch/ab/tools" --ab-checksum "$AB_CHECKSUM")
    fi
    # Bytecode, as an installed package has it: an editable install run with
    # PYTHONDONTWRITEBYTECODE (this workplace sets it) recompiles nbdfleece at
    # every start, about 0.1 s of each timed backup command.
    "$NBDFLEECE_PYTHON" -m compileall -q "$repo/nbdfleece" "$repo/tools/nbdfleece_backup" \
        ${AB:+"$scratch/ab/tools"} >/dev/null
    "$NBDFLEECE_PYTHON" "$here/backup_bench.py" --scratch "$scratch" --size "$SIZE" --rounds "$RUNS" \
        --out "$OUT/backup-$stamp.json" --python "$NBDFLEECE_PYTHON" --checksums "$CHECKSUMS" \
        --settle "$SETTLE" "${ab[@]}"
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$OUT/backup-$stamp.log"
