#!/usr/bin/env bash
# The commands-list benchmark, in one command:
#
#   bash benches/lists/run.sh                       # 1,000,000 commands (~2 min to fill)
#   EXTRA="--commands 100000" bash benches/lists/run.sh
#
# Builds the release benchmark, fills a broker store (the broker's own SqliteStore, under
# target/lists-bench/, removed at the end) with finished commands over 100 agents, and
# times pages of GET /v1/commands' query filtered by agent (first pages, pages deep behind
# a cursor, and with a state filter) beside a lookup by id on the same store in the same
# run.                                                        target: p99 of a page < 20 ms
# Exit status 1 when the target is missed. The JSON report goes to
# target/lists-bench/<UTC>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p dbvm-bench-lists
mkdir -p target/lists-bench
# shellcheck disable=SC2086
target/release/lists-bench --json "target/lists-bench/$(date -u +%Y%m%dT%H%M%SZ).json" ${EXTRA:-}
