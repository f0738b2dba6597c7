#!/usr/bin/env bash
# `make repeat [N=10] [FILES="tests/test_reliability.py tests/test_tracking.py"]`: run test files N times
# each with one core kept busy by a spinning process (the load under which a race shows), one line per run
# in runs/repeat/summary.txt and each run's output beside it. How issue-free the timing-sensitive tests
# are is measured with it (docs/reliability.md, "Repeats").
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}; shift || true
FILES=${*:-tests/test_reliability.py tests/test_tracking.py}
PY=${PY:-.venv/bin/python}
out=runs/repeat; mkdir -p "$out"
"$PY" -c 'while True: pass' & busy=$!
trap 'kill $busy 2>/dev/null' EXIT
fails=0
for i in $(seq 1 "$N"); do
  for f in $FILES; do
    name=$(basename "$f" .py)_$i
    s=$(date +%s)
    DS_ACCELERATOR=cpu "$PY" -m pytest -q -rfE -p no:cacheprovider "$f" > "$out/$name.log" 2>&1; rc=$?
    [ $rc -eq 0 ] || fails=$((fails + 1))
    echo "$(date '+%F %T') $f run $i: exit $rc, $(( $(date +%s) - s )) s, $(tail -1 "$out/$name.log")" | tee -a "$out/summary.txt"
  done
done
echo "$fails failed runs" | tee -a "$out/summary.txt"
[ $fails -eq 0 ]
