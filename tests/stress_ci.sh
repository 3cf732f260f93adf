#!/usr/bin/env bash
# Run the slow test set while busy loops compete for every core, N times in a row (default 3);
# stop at the first failure. Proves that start-up and the slow tests do not depend on an idle
# machine (issue 18). Needs what `./run test` installs (venv, dcmtk, Orthanc, demo models).
#
#   tests/stress_ci.sh [RUNS] [extra pytest args]     e.g. tests/stress_ci.sh 1 -k serving
#
# The load: one Python busy loop per core at normal priority, each bounded by `timeout` to the
# run's own limit (STRESS_LIMIT_S, default 1800 s) and killed when the run ends.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
shift || true
LIMIT=${STRESS_LIMIT_S:-1800}
CORES=$(nproc)
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run ./run test (or ./run setup) first" >&2; exit 2; }
export RADBRIDGE_TEST_POSTGRES_URL=${RADBRIDGE_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}

load_pids=()
stop_load() { [ ${#load_pids[@]} -eq 0 ] || kill "${load_pids[@]}" 2>/dev/null || true; load_pids=(); }
trap stop_load EXIT

for run in $(seq 1 "$RUNS"); do
  for _ in $(seq 1 "$CORES"); do
    timeout "$LIMIT" "$PY" -c "while True: pass" &
    load_pids+=($!)
  done
  start=$(date +%s)
  echo "== stress run $run/$RUNS: slow set with $CORES busy loops ($(date -u +%H:%M:%S) UTC)"
  set +e
  timeout "$LIMIT" .venv/bin/pytest -q -m "slow and not soak" --durations=15 "$@"
  rc=$?
  set -e
  stop_load
  echo "== stress run $run/$RUNS: rc=$rc in $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || exit "$rc"
done
echo "== $RUNS stress runs passed"
