#!/usr/bin/env bash
# run_cbw.sh - cost of copy-before-write (issue 4): sequential 64 KiB writes
# (nbdcopy, W2) into a live export with and without a point-in-time snapshot,
# on nbdfleece and on qemu-storage-daemon (copy-before-write filter + qcow2
# fleecing target, bench/qsd_cbw.py of the shared kit).
#
# Servers (a fresh server and image copy per round, --restart):
#   ours-plain  nbdfleece serve --listen 127.0.0.1:PORT --export bench=IMAGE
#   ours-cbw    the same export, with `nbdfleece snapshot create snap --of bench`
#               done before the NBD port opens (see the wrapper below)
#   qsd-plain   qsd_cbw.py --mode plain   (live raw node exported)
#   qsd-cbw     qsd_cbw.py --mode cbw     (copy-before-write filter exported)
# Workloads per round: W2 (first pass: every cluster is copied), W2 again
# (clusters already copied), W1a.  Target: our overhead ratio
# ours-cbw/ours-plain on the first W2 no worse than qsd-cbw/qsd-plain.
#
# Second phase (random): the same four servers, started the same way (the
# driver imports peer_bench.py's Server class), fresh server and image copy per
# round, rotating order; bench/nbd_randwrite.py writes 64 KiB at QD16 at
# 64 KiB-aligned offsets in a seeded random permutation of all clusters, so
# every write is a first write (R64), then a second permutation over copied
# clusters (R64#2).  Afterwards a few clusters are spot-checked (live export:
# the pattern; snapshot exports snap / bench-fleece: the original image).
# Target: ours-cbw/ours-plain on R64 no worse than qsd-cbw/qsd-plain.
#
# Usage: bench/run_cbw.sh
#
# Environment overrides:
#   PHASES            seq,random (default), or one of them
#   RUNS              rounds (default 5)
#   OUT               results folder (default <repo>/bench/results)
#   TMPBASE           where the scratch folder is made (default /dev/shm)
#   SIZE              image size, filled from /dev/urandom (default 1G)
#   NBDFLEECE_PYTHON  interpreter that runs nbdfleece (default <repo>/.venv/bin/python)
#   PEER_BENCH_PYTHON interpreter with libnbd's `nbd` module (default /usr/bin/python3)
#   SETTLE            seconds every server waits before it starts (default 0), after the
#                     harness made its image copy: the memory the previous round freed is
#                     then handed back to the host (VM free page reporting), so that every
#                     server's first pass starts in the same memory state
#   CBW_B_ENV         NAME=VALUE settings: adds server ours-cbw-b, ours-cbw run with them
#                     (A/B of a setting in the same rounds, paired with ours-plain)
#   SHARED_BENCH      the shared harness folder (default <repo>/../../shared/bench,
#                     i.e. "$(dirname "$0")/../../shared/bench")
#
# Output: $OUT/cbw-<stamp>.md (table, then bench/cbw_summary.py's paired
# first-pass ratios and server CPU seconds per GiB), .json (per-run records),
# .log (harness output, then each server's log: the ours-cbw logs show the
# snapshot list of every round); the random phase writes
# cbw-<stamp>-random.md/.json the same way and logs into the same .log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

PHASES=${PHASES:-seq,random}
RUNS=${RUNS:-5}
OUT=${OUT:-"$repo/bench/results"}
TMPBASE=${TMPBASE:-/dev/shm}
SIZE=${SIZE:-1G}
NBDFLEECE_PYTHON=${NBDFLEECE_PYTHON:-"$repo/.venv/bin/python"}
PEER_BENCH_PYTHON=${PEER_BENCH_PYTHON:-/usr/bin/python3}
SHARED_BENCH=${SHARED_BENCH:-"$here/../../shared/bench"}
SETTLE=${SETTLE:-0}
export NBDFLEECE_PYTHON PEER_BENCH_PYTHON

fail=0
for tool in nbdcopy qemu-storage-daemon qemu-img; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; fail=1; }
done
[ -x "$NBDFLEECE_PYTHON" ] || { echo "missing: $NBDFLEECE_PYTHON" >&2; fail=1; }
[ -f "$SHARED_BENCH/peer_bench.sh" ] || { echo "missing: $SHARED_BENCH/peer_bench.sh (set SHARED_BENCH)" >&2; fail=1; }
"$PEER_BENCH_PYTHON" -c 'import nbd' 2>/dev/null || { echo "$PEER_BENCH_PYTHON has no nbd module" >&2; fail=1; }
for phase in ${PHASES//,/ }; do
    case $phase in seq|random) ;; *) echo "PHASES: unknown phase '$phase' (seq, random)" >&2; fail=1 ;; esac
done
[ "$fail" = 0 ] || exit 1

mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
base="$OUT/cbw-$stamp"
scratch=$(mktemp -d -p "$TMPBASE" nbdfleece-cbw.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

# Wrapper for ours-cbw.  The harness treats a server as ready as soon as an NBD
# handshake on {port} succeeds and starts W2 right after, so the TCP port must
# not open before the snapshot exists.  The wrapper therefore starts the server
# with NBD on a unix socket only, creates the snapshot with the nbdfleece CLI,
# then opens NBD on 127.0.0.1:PORT over QMP (nbd-server-start; the unix socket
# from the command line stays open, unused).
# It stays in the foreground (wait), and forwards SIGTERM/SIGINT to the server
# (the harness signals the whole process group anyway).
# Arguments: PYTHON DIR EXPORT IMAGE PORT
wrap="$scratch/ours-cbw.sh"
cat >"$wrap" <<'EOF'
#!/usr/bin/env bash
py=$1 dir=$2 export=$3 image=$4 port=$5
rm -f "$dir/q.sock" "$dir/nbd.sock"
"$py" -m nbdfleece serve --listen "unix:$dir/nbd.sock" --export "$export=$image" \
    --qmp "unix:$dir/q.sock" --data-dir "$dir" --log-level warning &
srv=$!
trap 'kill -TERM "$srv" 2>/dev/null' TERM INT
for _ in $(seq 200); do
    [ -S "$dir/q.sock" ] && break
    kill -0 "$srv" 2>/dev/null || { echo "ours-cbw: server exited" >&2; exit 1; }
    sleep 0.05
done
[ -S "$dir/q.sock" ] || { echo "ours-cbw: no QMP socket" >&2; kill -TERM "$srv"; exit 1; }
if ! "$py" -m nbdfleece snapshot --qmp "unix:$dir/q.sock" create snap --of "$export" >&2 ||
   ! "$py" -m nbdfleece snapshot --qmp "unix:$dir/q.sock" list >&2 ||
   ! "$py" - "$dir/q.sock" "$port" <<'PYEOF' >&2
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())                       # greeting
def qmp(execute, **arguments):
    f.write(json.dumps(dict(execute=execute, arguments=arguments)) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r:
            return r["return"]
        if "error" in r:
            sys.exit(f"{execute}: {r['error']}")
qmp("qmp_capabilities")
qmp("nbd-server-start", addr=dict(type="inet", data=dict(host="127.0.0.1", port=sys.argv[2])))
print("ours-cbw: snapshot created, NBD on 127.0.0.1:" + sys.argv[2])
PYEOF
then
    echo "ours-cbw: setup failed" >&2
    kill -TERM "$srv"; wait "$srv"; exit 1
fi
st=0
while kill -0 "$srv" 2>/dev/null; do
    wait "$srv" && st=0 || st=$?
done
exit "$st"
EOF

# SETTLE: every server command goes through this (exec keeps its pid and process group).
settle="$scratch/settle.sh"
printf '#!/usr/bin/env bash\nsleep %s\nexec "$@"\n' "$SETTLE" >"$settle"

echo "image: $SIZE of random data in $scratch" >&2
head -c "$SIZE" /dev/urandom >"$scratch/disk.raw"
mkdir "$scratch/rounds"

# The four servers, as peer_bench.py templates (both phases use these).
servers=(
    --server "ours-plain=bash $settle {env[NBDFLEECE_PYTHON]} -m nbdfleece serve --listen 127.0.0.1:{port} --export {export}={image} --log-level warning"
    --server "ours-cbw=bash $settle bash $wrap {env[NBDFLEECE_PYTHON]} {dir} {export} {image} {port}"
    ${CBW_B_ENV:+--server "ours-cbw-b=bash $settle env $CBW_B_ENV bash $wrap {env[NBDFLEECE_PYTHON]} {dir} {export} {image} {port}"}
    --server "qsd-plain=bash $settle {python} {bench}/qsd_cbw.py --mode plain --image {image} --port {port} --export {export} --dir {dir} --qmp-log {dir}/qmp.log"
    --server "qsd-cbw=bash $settle {python} {bench}/qsd_cbw.py --mode cbw --image {image} --port {port} --export {export} --dir {dir} --qmp-log {dir}/qmp.log"
)

cd "$repo"   # so that -m nbdfleece finds this checkout even without an install
rc=0
: >"$base.log"
set +e
if [[ ,$PHASES, == *,seq,* ]]; then
    "$SHARED_BENCH/peer_bench.sh" --restart --image "$scratch/disk.raw" --workdir "$scratch/rounds" \
        --runs "$RUNS" --workloads W2,W2,W1a \
        --title "copy-before-write cost (issue 4), $SIZE random raw image" \
        --json-out "$base.json" --md-out "$base.md" \
        "${servers[@]}" \
        2>&1 | tee -a "$base.log"
    rc=${PIPESTATUS[0]}
    if [ -f "$base.json" ]; then
        { echo; "$PEER_BENCH_PYTHON" "$here/cbw_summary.py" "$base.json"; } | tee -a "$base.md"
    fi
fi
if [[ ,$PHASES, == *,random,* ]]; then
    "$PEER_BENCH_PYTHON" "$here/nbd_randwrite.py" rounds --image "$scratch/disk.raw" \
        --workdir "$scratch/random" --shared-bench "$SHARED_BENCH" --runs "$RUNS" \
        --title "copy-before-write cost (issue 4), random 64 KiB first writes, $SIZE random raw image" \
        --json-out "$base-random.json" --md-out "$base-random.md" \
        --check ours-cbw=snap --check qsd-cbw=bench-fleece \
        "${servers[@]}" \
        2>&1 | tee -a "$base.log"
    rrc=${PIPESTATUS[0]}
    [ "$rc" != 0 ] || rc=$rrc
    if [ -f "$base-random.json" ]; then
        { echo; "$PEER_BENCH_PYTHON" "$here/cbw_summary.py" "$base-random.json"; } | tee -a "$base-random.md"
    fi
fi
set -e
for d in "$scratch"/rounds/srv* "$scratch"/random/srv*; do
    [ -f "$d/server.log" ] || continue
    printf '\n== %s/%s/server.log\n' "$(basename "$(dirname "$d")")" "$(basename "$d")"
    cat "$d/server.log"
    ls -l "$d" | grep -v 'disk.img' || true
done >>"$base.log"
echo "results: $(ls "$base"*.md "$base"*.json "$base.log" 2>/dev/null | tr '\n' ' ')(exit $rc)" >&2
exit "$rc"
