#!/usr/bin/env bash
# The health-check benchmark, in one command:
#
#   bash benches/health/run.sh            # the full run: ~11–12 min after the build
#   bash benches/health/run.sh --quick    # harness check: ~2 min, figures not the benchmark's
#   EXTRA="--runs 2000 --keep-dir" bash benches/health/run.sh
#
# Builds the release broker and benchmark and the static (musl) release agent — the binary
# a database VM runs — then: starts a broker and the agent ([health] interval_s = 10, its
# /metrics on a free port) against the test harness's private Docker engine
# (target/dbvm-test-docker, started and loaded with dbvm/postgres:15 when missing), creates
# a PostgreSQL 15 database with a signed db.create, and measures
#   (a) 1,000 in-process Monitor::run_once() calls (dbvm_agent library, same config and
#       database as the running agent)                               target p99 < 100 ms
#       and 20 signed `health` commands through the broker (for reference)
#   (b) the release agent for 10 min, checks every 10 s, /metrics scraped every 10 s:
#       CPU from /proc/<pid>/stat                                     target < 0.5 % of a core
#       VmRSS peak (VmHWM, reset at the start) and at the end        target < 20 MiB
#   (c) in the same 10 min, prometheus-node-exporter and prometheus-postgres-exporter
#       (run here on free ports, never their systemd units), scraped at the same ticks:
#                                                      target agent < the two together
# Exit status 1 when a target is missed, 2 when the run failed. Everything the run owns
# lives in target/health-bench/run-*/ (removed at the end unless --keep-dir); the JSON
# report goes to target/health-bench/<UTC>.json. EXTRA adds flags (see
# target/release/health-bench --help).
#
# Needs: apt-get -o DPkg::Lock::Timeout=300 install -y prometheus-node-exporter prometheus-postgres-exporter
set -euo pipefail
cd "$(dirname "$0")/../.."

args=()
for a in "$@"; do
  case "$a" in
    --quick) args+=(--quick) ;;
    *) args+=("$a") ;;
  esac
done

for bin in prometheus-node-exporter prometheus-postgres-exporter; do
  command -v "$bin" >/dev/null || {
    echo "$bin is missing: apt-get -o DPkg::Lock::Timeout=300 install -y prometheus-node-exporter prometheus-postgres-exporter" >&2
    exit 2
  }
done

echo "== building (release)" >&2
cargo build --release -p dbvm-broker -p dbvm-bench-health
cargo build --release --target x86_64-unknown-linux-musl -p dbvm-agent

# The benchmark kills what it started when it ends or fails; this trap covers Ctrl-C and
# kill of the script itself: only the benchmark's pid gets SIGTERM; it then kills the
# broker, agent and exporters it started and removes the containers and its directory.
bench_pid=
cleanup() {
  if [[ -n "$bench_pid" ]] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

cmd=(target/release/health-bench
  --agent-bin target/x86_64-unknown-linux-musl/release/dbvm-agent
  --broker-bin target/release/dbvm-broker
  "${args[@]}")
# shellcheck disable=SC2206 # EXTRA is a list of flags, split on purpose
[[ -n "${EXTRA:-}" ]] && cmd+=($EXTRA)

"${cmd[@]}" &
bench_pid=$!
set +e
wait "$bench_pid"
rc=$?
set -e
bench_pid=
exit "$rc"
