#!/usr/bin/env bash
# The relay benchmark's standard set, in one command:
#
#   bash benches/relay/run.sh             # full set (about 3 minutes after the build)
#   SMOKE=1 bash benches/relay/run.sh     # small sizes, under a minute after the build
#
# Builds the release broker and benchmark and the static (musl) agent, then runs:
#   f  the disk's own fdatasync latency (fio, 8 KiB writes at 300/s, 10 s): baseline
#   a  1,000 agents, fixed 2,000 commands/s for ~10 s (open loop)   target p99 < 5 ms
#   t  a again with the broker's store on tmpfs (syncs cost nothing): baseline for a
#   b  1,000 agents, saturation (closed loop)                        target >= 5,000 cmd/s
#   c  b again with --skip-verify (the agents' ed25519 check off)    same target
#   d  10,000 agents idle, then a short saturation run               target < 40 KiB per idle agent
#   e  one real dbvm-agent: 100 pings, 10 s idle                     target VmRSS < 15 MiB
# and prints each report and a summary table. Step a's latency is read against f and t of
# the same run: two machines of this kind differ 3x in their disk's sync tail. With PIN=1 (default) the broker runs on
# core 0 (taskset -c 0) and the load generator on core 1. Reports (text and JSON) go to
# $RESULTS (default target/relay-bench/<time>).
#
# Every size can be overridden from the environment: A_AGENTS A_RATE A_SECS A_COMMANDS,
# B_AGENTS B_COMMANDS B_CONCURRENCY, D_AGENTS D_COMMANDS, E_PINGS E_IDLE_SECS, IDLE_SECS,
# HTTP (1 or 2), STEPS (default fatbcde), PIN (1/0), EXTRA (more flags for every run),
# TMPFS (default /dev/shm, for step t). Step f needs fio (apt-get install fio).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${SMOKE:-0}" == 1 ]]; then
  : "${A_AGENTS:=50}" "${A_RATE:=500}" "${A_SECS:=1}"
  : "${B_AGENTS:=50}" "${B_COMMANDS:=500}"
  : "${D_AGENTS:=200}" "${D_COMMANDS:=200}"
  : "${E_PINGS:=20}" "${E_IDLE_SECS:=3}" "${IDLE_SECS:=1}"
fi
A_AGENTS=${A_AGENTS:-1000}
A_RATE=${A_RATE:-2000}
A_SECS=${A_SECS:-10}
A_COMMANDS=${A_COMMANDS:-$((A_RATE * A_SECS))}
B_AGENTS=${B_AGENTS:-1000}
B_COMMANDS=${B_COMMANDS:-30000}
# Saturation needs enough in flight to cover a command's two durable writes: with 64
# outstanding the broker's core idled at ~80 %, waiting on commits, not on work.
B_CONCURRENCY=${B_CONCURRENCY:-256}
D_AGENTS=${D_AGENTS:-10000}
D_COMMANDS=${D_COMMANDS:-5000}
E_PINGS=${E_PINGS:-100}
E_IDLE_SECS=${E_IDLE_SECS:-10}
IDLE_SECS=${IDLE_SECS:-5}
HTTP=${HTTP:-2}
STEPS=${STEPS:-fatbcde}
PIN=${PIN:-1}
RESULTS=${RESULTS:-target/relay-bench/$(date +%Y%m%d-%H%M%S)}

echo "== building (release)" >&2
cargo build --release -p dbvm-broker -p dbvm-bench-relay
cargo build --release --target x86_64-unknown-linux-musl -p dbvm-agent

BENCH=target/release/relay-bench
AGENT=target/x86_64-unknown-linux-musl/release/dbvm-agent
mkdir -p "$RESULTS"
common=(--http "$HTTP" --idle-secs "$IDLE_SECS")
[[ "$PIN" == 1 ]] && common+=(--pin)
# shellcheck disable=SC2206 # EXTRA is a list of flags, split on purpose
[[ -n "${EXTRA:-}" ]] && common+=($EXTRA)

run() { # run NAME LABEL FLAGS... : JSON to $RESULTS/NAME.json, text to the terminal
  local name=$1 label=$2
  shift 2
  echo "== $name: $label" >&2
  "$BENCH" "${common[@]}" --label "$name: $label" "$@" | tee "$RESULTS/$name.txt"
}

TMPFS=${TMPFS:-/dev/shm}
for s in $(echo "$STEPS" | grep -o .); do
  case $s in
    f) if ! command -v fio >/dev/null 2>&1; then
         echo "step f needs fio: apt-get -o DPkg::Lock::Timeout=300 install -y fio" >&2
         exit 2
       fi
       echo "== f: the disk's fdatasync latency where the broker's store goes (${TMPDIR:-/tmp})" >&2
       probe=$(mktemp -d "${TMPDIR:-/tmp}/relay-fio.XXXXXX")
       fio --name=fdatasync --directory="$probe" --rw=write --bs=8k --size=64m --fdatasync=1 \
         --rate_iops=300 --runtime=10 --time_based --output-format=json >"$RESULTS/fio.out"
       rm -rf "$probe"
       "$BENCH" fio "$RESULTS/fio.out" "$RESULTS/f.json" | tee "$RESULTS/f.txt" ;;
    t) tdir=$(mktemp -d "$TMPFS/relay-bench.XXXXXX")
       run t "a with the store on tmpfs ($TMPFS): baseline" --json-out "$RESULTS/t.json" \
         --agents "$A_AGENTS" --commands "$A_COMMANDS" --rate "$A_RATE" --no-real-agent --target-p99-ms 5 \
         --work-dir "$tdir"
       rm -rf "$tdir" ;;
    a) run a "$A_AGENTS agents, $A_RATE cmd/s open loop" --json-out "$RESULTS/a.json" \
         --agents "$A_AGENTS" --commands "$A_COMMANDS" --rate "$A_RATE" --no-real-agent --target-p99-ms 5 ;;
    b) run b "$B_AGENTS agents, saturation" --json-out "$RESULTS/b.json" \
         --agents "$B_AGENTS" --commands "$B_COMMANDS" --concurrency "$B_CONCURRENCY" --no-real-agent --target-rate 5000 ;;
    c) run c "$B_AGENTS agents, saturation, --skip-verify" --json-out "$RESULTS/c.json" \
         --agents "$B_AGENTS" --commands "$B_COMMANDS" --concurrency "$B_CONCURRENCY" --skip-verify --no-real-agent \
         --target-rate 5000 ;;
    d) run d "$D_AGENTS agents idle + short saturation" --json-out "$RESULTS/d.json" \
         --agents "$D_AGENTS" --commands "$D_COMMANDS" --concurrency "$B_CONCURRENCY" --no-real-agent --target-idle-kib 40 ;;
    e) run e "real dbvm-agent idle footprint" --json-out "$RESULTS/e.json" \
         --agents 10 --commands 0 --real-agent-bin "$AGENT" --real-agent-pings "$E_PINGS" \
         --real-agent-idle-secs "$E_IDLE_SECS" --target-agent-rss-mib 15 ;;
    *) echo "unknown step $s (steps are f a t b c d e)" >&2; exit 2 ;;
  esac
done

echo
echo "== summary ($RESULTS)"
"$BENCH" summary "$RESULTS"
