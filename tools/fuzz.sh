#!/usr/bin/env bash
# Long coverage-guided fuzz runs of every target in tests/fuzz (atheris / libFuzzer).
#   tools/fuzz.sh [SECONDS]        SECONDS per target (default 600)
#
# Environment:
#   JOBS     parallel fuzzing processes per target (default: the number of CPUs)
#   TARGETS  which targets (default "handshake framer qmp")
#   OUT      output folder (default fuzz-out/, gitignored)
#   PYTHON   interpreter with atheris and nbdfleece (default .venv/bin/python)
#
# Per target, OUT/<target>/ gets:
#   corpus/    the working corpus: starts from the committed seeds and regressions and
#              keeps growing across runs (never written back to tests/fuzz/corpus)
#   crashes/   crash-*, timeout-*, oom-* inputs: each is a bug (or a target invariant
#              that is wrong); fix it, then copy the input to tests/fuzz/regressions/<target>/
#   fuzz-N.log one log per job
# A summary (executions, coverage, corpus size, crashes) is printed at the end and
# saved as OUT/summary-<stamp>.txt.  Exit status 1 if any target left a crash file.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

SECONDS_PER_TARGET=${1:-600}
JOBS=${JOBS:-$(nproc)}
TARGETS=${TARGETS:-"handshake framer qmp"}
OUT=${OUT:-fuzz-out}
PYTHON=${PYTHON:-.venv/bin/python}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")

if ! "$PYTHON" -c 'import atheris, nbdfleece' 2>/dev/null; then
    echo "fuzz.sh: $PYTHON cannot import atheris and nbdfleece (pip install -e '.[test]')" >&2
    exit 2
fi
# With -jobs, libFuzzer starts each job by running the target script itself
# (its shebang is "/usr/bin/env python3"): put this interpreter first in PATH.
PATH="$(dirname "$PYTHON"):$PATH"
export PATH
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
summary="$OUT/summary-$(date +%Y%m%d-%H%M%S).txt"
status=0

for target in $TARGETS; do
    script="$repo/tests/fuzz/fuzz_$target.py"
    [ -f "$script" ] || { echo "fuzz.sh: no target $script" >&2; exit 2; }
    work="$OUT/$target"
    mkdir -p "$work/corpus" "$work/crashes"
    rm -f "$work"/fuzz-*.log
    seeds=("$repo/tests/fuzz/corpus/$target")
    [ -d "$repo/tests/fuzz/regressions/$target" ] && seeds+=("$repo/tests/fuzz/regressions/$target")
    before=$(find "$work/crashes" -type f | wc -l)
    echo "fuzz.sh: $target for ${SECONDS_PER_TARGET}s with $JOBS job(s) in $work" >&2
    # New inputs go to the first folder only; the committed seeds are read, never written.
    (cd "$work" && "$PYTHON" "$script" \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -jobs="$JOBS" -workers="$JOBS" -print_final_stats=1 \
        -artifact_prefix="$work/crashes/" \
        "$work/corpus" "${seeds[@]}" >/dev/null 2>&1) || true
    runs=0
    last=""
    for log in "$work"/fuzz-*.log; do
        [ -f "$log" ] || { echo "fuzz.sh: $target wrote no log: did it start?" >&2; status=1; continue; }
        n=$( (grep -o 'Done [0-9]* runs' "$log" || true) | awk '{s += $2} END {print s + 0}')
        runs=$((runs + n))
        last=$( (grep -ho 'cov: [0-9]* ft: [0-9]*' "$log" || true; echo "$last") | sort -t' ' -k2 -n | tail -1)
    done
    crashes=$(find "$work/crashes" -type f | wc -l)
    corpus=$(find "$work/corpus" -type f | wc -l)
    line="$target: ${SECONDS_PER_TARGET}s x $JOBS job(s), $runs executions, ${last:-cov ?}, corpus $corpus files, crash files $crashes (new: $((crashes - before)))"
    echo "$line" | tee -a "$summary"
    if [ "$crashes" -gt 0 ]; then
        status=1
        find "$work/crashes" -type f | sed 's/^/    /' | tee -a "$summary"
        grep -h -A12 'Uncaught Python exception' "$work"/fuzz-*.log | head -40 | tee -a "$summary" || true
    fi
done
echo "fuzz.sh: summary in $summary" >&2
exit "$status"
