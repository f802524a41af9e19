#!/usr/bin/env bash
# The database-create benchmark, in one command:
#
#   bash benches/db-create/run.sh              # 3 creates per engine, ~1.5 min after the build
#   RUNS=5 bash benches/db-create/run.sh       # more runs
#   ENGINES=postgres IDLE_SECS=30 bash benches/db-create/run.sh
#
# Builds the release broker and benchmark and the static (musl) release agent — the
# binary a database VM runs, so its memory is the figure that matters — then, per engine
# and run (engines interleaved), starts a fresh fleet, broker and agent against the test
# harness's private Docker engine (target/dbvm-test-docker, started and loaded with the
# dbvm/postgres:15 and dbvm/mariadb:10.11 images when missing), sends one signed db.create
# and times it until the database accepts a dbaas connection. After each engine's last
# create the agent idles IDLE_SECS (default 10) and its VmRSS/VmHWM/Pss are read.
#
# Targets: submit → accepting < 6 s; idle agent VmRSS < 15 MiB. Exit status 1 when a
# target is missed, 2 when the run failed. JSON goes to target/db-create-bench/<UTC>.json
# (JSON_OUT overrides). EXTRA adds flags (see target/release/db-create-bench --help).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
IDLE_SECS=${IDLE_SECS:-10}
ENGINES=${ENGINES:-postgres,mariadb}

echo "== building (release)" >&2
cargo build --release -p dbvm-broker -p dbvm-bench-db-create
cargo build --release --target x86_64-unknown-linux-musl -p dbvm-agent

args=(--runs "$RUNS" --idle-secs "$IDLE_SECS" --engines "$ENGINES"
  --agent-bin target/x86_64-unknown-linux-musl/release/dbvm-agent
  --broker-bin target/release/dbvm-broker)
[[ -n "${JSON_OUT:-}" ]] && args+=(--json-out "$JSON_OUT")
# shellcheck disable=SC2206 # EXTRA is a list of flags, split on purpose
[[ -n "${EXTRA:-}" ]] && args+=($EXTRA)

exec target/release/db-create-bench "${args[@]}"
