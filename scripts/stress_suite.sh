#!/usr/bin/env bash
# stress_suite.sh — run the test suite again and again on a machine kept busy, and list
# every failure of every run: the way to find a flaky test before CI does.
#
#   bash scripts/stress_suite.sh                 # the whole suite 3 times, 2 CPU burners beside it
#   bash scripts/stress_suite.sh -n 5 -b 4       # 5 runs, 4 burners
#   bash scripts/stress_suite.sh --procs -n 10   # only the test files that start processes, 10 times
#   bash scripts/stress_suite.sh -- -k liveness  # anything after -- goes to pytest
#   (--limit SECONDS: the longest a burner may live, default 4 hours; -j N: pytest's
#   processes, default 2 as the README's test command runs them, 0 for one process)
#
# A burner is one Python process spinning on a core. Each lives at most as long as the
# whole stress run may (`timeout`), and all are ended by their PIDs when this script
# exits, however it exits. Per run the script prints pytest's closing line, the tests that
# failed and the load average before and after; at the end a table of every failed test and
# how many runs it failed in. Exit status: 0 when no run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

runs=3 burners=2 procs=0 jobs=2 limit_s=$((4 * 3600))
pytest_args=()
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--runs) runs=$2; shift 2 ;;
    -b|--burners) burners=$2; shift 2 ;;
    --procs) procs=1; shift ;;
    -j|--jobs) jobs=$2; shift 2 ;;
    --limit) limit_s=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "stress_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$runs$burners$jobs" in *[!0-9]*) echo "stress_suite.sh: -n, -b and -j take whole numbers" >&2; exit 2 ;; esac

# Job control: each background command gets a process group of its own and keeps SIGINT
# (a script's background commands otherwise start with it ignored), so that a stop can
# interrupt pytest as Ctrl-C would: its tests then end the processes they started.
set -m
burner_pids=() pytest_pid=""
stop_all() {
  if [ -n "$pytest_pid" ] && kill -0 "$pytest_pid" 2>/dev/null; then
    kill -INT -- "-$pytest_pid" 2>/dev/null
    for _ in $(seq 1 600); do kill -0 "$pytest_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pytest_pid" 2>/dev/null
  fi
  for pid in "${burner_pids[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${burner_pids[@]}"; do wait "$pid" 2>/dev/null; done
  burner_pids=()
}
trap stop_all EXIT
trap 'echo "stress_suite: interrupted; stopping pytest and the burners" >&2; exit 130' INT TERM
for _ in $(seq 1 "$burners"); do
  timeout "$limit_s" python3 -c "while True: pass" &
  burner_pids+=($!)
done

targets=()
if [ "$procs" = 1 ]; then
  # the test files that start processes (servers, workers, launchers, scripts)
  mapfile -t targets < <(grep -l -E "subprocess|Servers\(|Job\(|run_threads" tests/test_*.py)
fi

RUN_PYTEST='import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; sys.exit(pytest.main())'
load() { cut -d' ' -f1-3 /proc/loadavg; }
log_dir=$(mktemp -d /tmp/stress_suite.XXXXXX)
echo "stress_suite: $runs run(s), $burners burner(s) (PIDs ${burner_pids[*]:-none}), logs in $log_dir"
failed_runs=0
for i in $(seq 1 "$runs"); do
  before=$(load)
  start=$(date +%s)
  # in the background, waited for: a signal to this script interrupts the wait at once. Python's
  # Ctrl-C handler is put back by hand: a process started with SIGINT ignored (by nohup, or as a
  # background command of a script that started so) would otherwise pass it on ignored
  python3 -c "$RUN_PYTEST" -q -rfE -p no:cacheprovider -n "$jobs" "${targets[@]}" "${pytest_args[@]}" > "$log_dir/run$i.log" 2>&1 &
  pytest_pid=$!
  wait "$pytest_pid"
  rc=$?
  pytest_pid=""
  after=$(load)
  closing=$(grep -E "(passed|failed|error)" "$log_dir/run$i.log" | tail -1)
  echo "run $i: exit $rc in $(( $(date +%s) - start )) s; load $before -> $after; $closing"
  grep -E "^(FAILED|ERROR) " "$log_dir/run$i.log" | sed 's/^/    /'
  [ "$rc" = 0 ] || failed_runs=$((failed_runs + 1))
done
echo "stress_suite: $failed_runs of $runs run(s) failed"
if [ "$failed_runs" -gt 0 ]; then
  echo "failures by test (runs failed in):"
  cat "$log_dir"/run*.log | grep -E "^(FAILED|ERROR) " | sed -E 's/^(FAILED|ERROR) ([^ ]+).*/\2/' | sort | uniq -c | sort -rn
fi
[ "$failed_runs" = 0 ]
