#!/usr/bin/env bash
# The backup benchmark, in one command:
#
#   bash benches/backup/run.sh                  # pgbench -s 100, 3 interleaved pairs
#   SCALE=20 PAIRS=5 RESTORE_PAIRS=3 bash benches/backup/run.sh
#   ENGINE=mariadb bash benches/backup/run.sh   # MariaDB, 10M rows, 5 interleaved pairs
#
# Builds the release broker and benchmark and the static (musl) release agent, starts the
# test harness's S3 server (s3s-fs behind stunnel) and private Docker engine, a broker and
# one agent with a PostgreSQL database loaded by `pgbench -i -s SCALE`, turns backups on
# with a signed backup.configure, then interleaves: a full backup sent as a signed
# `backup.run` through the broker and waited for, and the same `pgbackrest backup
# --type=full` run directly in a one-shot container of the same image on the same data
# (what a person on the VM would run). Then a point-in-time restore of that database to a
# target between pgbench writes: a signed db.restore to a new agent, waited for, against
# `pgbackrest restore --type=time` and PostgreSQL's recovery run directly, interleaved.
# Targets: median agent/direct ≤ 1.05 (backup) and ≤ 1.10 (restore); the agents' peak
# RSS < 64 MiB; the static agent < 25 MiB.
#
# ENGINE=mariadb: a MariaDB agent whose table has pgbench_accounts' shape (SCALE × 100,000
# rows), then interleaved: a full backup sent as a signed backup.run (mariabackup's stream,
# zstd, into a FIFO the agent uploads to S3 in parts) and waited for, and the same
# `mariadb-backup --stream=xbstream | zstd -3 -T2` run directly in a one-shot container of
# the same image on the same data, into a local file. Targets: median throughput
# agent/direct ≥ 0.80; the agent's peak RSS over the timed backups < 64 MiB.
#
# Exit 1 when a target is missed, 2 when the run failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "== building (release)" >&2
cargo build --release -p dbvm-broker -p dbvm-bench-backup
cargo build --release --target x86_64-unknown-linux-musl -p dbvm-agent
engine=${ENGINE:-postgres}
if [ "$engine" = mariadb ]; then pairs=${PAIRS:-5}; else pairs=${PAIRS:-3}; fi
exec target/release/backup-bench --engine "$engine" --scale "${SCALE:-100}" --pairs "$pairs" \
  --restore-pairs "${RESTORE_PAIRS:-3}" \
  --agent-bin target/x86_64-unknown-linux-musl/release/dbvm-agent \
  --broker-bin target/release/dbvm-broker
