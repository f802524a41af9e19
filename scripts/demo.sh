#!/usr/bin/env bash
# The dbvm demo, end to end on this machine: a fleet CA and control-plane keys, a broker
# on its embedded store, one agent (the static musl build) enrolled with a one-time
# token, and signed commands sent through the broker and answered by the agent.
# Safe to run again: it starts from a clean demo directory each time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\n\033[1;34m==> %s\033[0m\n' "$*" >&2; }
run() { printf '\033[2m$ %s\033[0m\n' "$*" >&2; "$@"; }

say "building dbvm-broker and dbvmctl (release) and the static dbvm-agent (musl)"
cargo build --release --locked -p dbvm-broker -p dbvmctl
cargo build --release --locked --target x86_64-unknown-linux-musl -p dbvm-agent
bin="$root/target/release"
agent_bin="$root/target/x86_64-unknown-linux-musl/release/dbvm-agent"
echo "dbvm-agent: $(file -b "$agent_bin" | grep -o "static-pie linked\|statically linked"), $(du -h "$agent_bin" | cut -f1)"

demo="${DBVM_DEMO_DIR:-$root/demo-data}"
rm -rf "$demo"
mkdir -p "$demo"
export DBVM_HOME="$demo/ctl"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

say "control-plane keys and the fleet CA (dbvmctl keygen, dbvmctl ca init)"
run "$bin/dbvmctl" keygen > "$demo/keygen.out"
cat "$demo/keygen.out"
run "$bin/dbvmctl" ca init --broker-name localhost --broker-name 127.0.0.1

say "starting dbvm-broker on its embedded store (ports chosen by the kernel)"
cat > "$demo/broker.toml" <<TOML
agent_listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
data_dir = "$demo/broker-data"
[tls]
ca_cert = "$DBVM_HOME/ca.crt"
ca_key = "$DBVM_HOME/ca.key"
server_cert = "$DBVM_HOME/broker.crt"
server_key = "$DBVM_HOME/broker.key"
$(sed -n '/\[\[trusted_keys\]\]/,$p' "$demo/keygen.out")
TOML
"$bin/dbvm-broker" --config "$demo/broker.toml" > "$demo/broker.out" 2> "$demo/broker.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$demo/broker.out" 2>/dev/null && break; sleep 0.1; done
line=$(grep listening "$demo/broker.out") || { cat "$demo/broker.log"; exit 1; }
agent_addr=$(sed -E 's/.*agent=([^ ]+).*/\1/' <<<"$line")
api_addr=$(sed -E 's/.*api=([^ ]+).*/\1/' <<<"$line")
echo "$line"
export DBVM_BROKER="https://localhost:${api_addr##*:}"

say "a one-time enrollment token for agent db-demo (dbvmctl enroll-token)"
token=$(run "$bin/dbvmctl" enroll-token db-demo --ttl 600)
echo "${token:0:20}… (shown once; the broker keeps only its hash)"
printf '%s' "$token" > "$demo/enroll.token"

# A free port for the agent's Prometheus endpoint (the default 9273 may be taken here).
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "starting dbvm-agent: it makes its own key, enrolls, then dials the broker over mTLS"
{
  echo 'agent_id = "db-demo"'
  echo "state_dir = \"$demo/agent-state\""
  echo '[broker]'
  echo "address = \"localhost:${agent_addr##*:}\""
  echo "ca_cert = \"$DBVM_HOME/ca.crt\""
  echo "enrollment_token_file = \"$demo/enroll.token\""
  echo '[health]'
  echo 'interval_s = 5'
  echo "metrics_listen = \"127.0.0.1:$metrics_port\""
  sed -n '/\[\[trusted_keys\]\]/,$p' "$demo/keygen.out"
} > "$demo/agent.toml"
"$agent_bin" --config "$demo/agent.toml" 2> "$demo/agent.log" &
pids+=($!)
for _ in $(seq 100); do
  "$bin/dbvmctl" agents --json 2>/dev/null | grep -q '"connected": *true' && break
  sleep 0.1
done
run "$bin/dbvmctl" agents

say "signed ping (signed here with the control-plane key; the broker checks the signature and relays it)"
run "$bin/dbvmctl" send db-demo ping echo=hello

say "signed facts"
run "$bin/dbvmctl" send db-demo facts

say "a secret sealed to the agent comes back sealed to the control plane (--reveal opens it here)"
run "$bin/dbvmctl" send db-demo ping --secret secret=demo-s3cret --reveal

say "a command signed by a key the control plane does not use is refused by the broker (403; the agent would refuse it too)"
DBVM_HOME="$demo/stranger" "$bin/dbvmctl" keygen >/dev/null 2>&1
for f in ca.crt controlplane.crt controlplane.key; do cp "$DBVM_HOME/$f" "$demo/stranger/"; done
DBVM_HOME="$demo/stranger" run "$bin/dbvmctl" send db-demo ping || echo "(exit code $?: refused, as it should be)"

say "agent memory: $(grep VmRSS /proc/${pids[1]}/status | tr -s ' ')"

# ---- the database in the guest ------------------------------------------------------
say "a private Docker engine (host-neutral: no bridge, no iptables) and the local PostgreSQL image"
sock=$(bash scripts/dockerd.sh start "$demo/docker")
cleanup_db() {
  DOCKER_HOST="unix://$sock" docker rm -f db-demo-pg >/dev/null 2>&1 || true
  bash scripts/dockerd.sh stop "$demo/docker" >/dev/null 2>&1 || true
  ip netns del "$netns" 2>/dev/null || true
}
netns="dbvm-demo-$$"
trap 'cleanup; cleanup_db' EXIT
DOCKER_HOST="unix://$sock" bash packaging/images/build-image.sh postgres

say "the VM's network, simulated: namespace $netns with eth0 (management) and eth1 (application)"
ip netns add "$netns"
for i in eth0 eth1; do
  ip -n "$netns" link add "$i" type veth peer name "$i-peer"
  ip -n "$netns" link set "$i" up
done

say "restarting the agent with a [database] and a [firewall] section"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
cat >> "$demo/agent.toml" <<TOML
[database]
runtime = "docker"
docker_socket = "$sock"
data_root = "$demo/db"
container_name = "db-demo-pg"
[firewall]
netns = "$netns"
TOML
"$agent_bin" --config "$demo/agent.toml" 2>> "$demo/agent.log" &
pids[1]=$!
for _ in $(seq 100); do
  "$bin/dbvmctl" agents --json 2>/dev/null | grep -q '"connected": *true' && break
  sleep 0.1
done

port=$(( 20000 + RANDOM % 20000 ))
say "create a PostgreSQL database: preconfigure + configure, one signed command (port $port)"
run "$bin/dbvmctl" send db-demo db.create engine=postgres database=app port=$port \
  'parameters={"max_connections": 50}' --reveal --json > "$demo/create.json"
grep -v '"password"' "$demo/create.json"
password=$(grep -o '"password": *"[^"]*"' "$demo/create.json" | sed -E 's/.*: *"([^"]*)"/\1/')
echo "dbaas password: ${password:0:4}… (sealed to the control plane; opened here with --reveal)"

say "psql as dbaas with the returned credentials"
export PGPASSWORD="$password"   # psql reads it from the environment; never on a command line
run psql -h 127.0.0.1 -p "$port" -U dbaas -d app \
  -c "CREATE TABLE hello (msg text); INSERT INTO hello VALUES ('hello from dbvm')" \
  -c "SELECT msg, current_user, version() FROM hello"

say "change a parameter live (work_mem) and one that needs a restart (max_connections)"
run "$bin/dbvmctl" send db-demo db.set_parameters 'parameters={"work_mem": "16MB"}'
run "$bin/dbvmctl" send db-demo db.set_parameters 'parameters={"max_connections": 80}'
run "$bin/dbvmctl" send db-demo db.restart
run psql -h 127.0.0.1 -p "$port" -U dbaas -d app -Atc \
  "SELECT 'work_mem=' || current_setting('work_mem') || ' max_connections=' || current_setting('max_connections')"

say "status: container, server, firewall (the live nftables table matches the wanted one)"
run "$bin/dbvmctl" send db-demo db.status

say "the firewall opens the database's own port ($port) on eth1, the application network, and not 5432"
run ip netns exec "$netns" nft list table inet dbvm
app_chain=$(ip netns exec "$netns" nft list chain inet dbvm application)
if grep -q "tcp dport $port accept" <<<"$app_chain" && ! grep -q "tcp dport 5432 " <<<"$app_chain"; then
  echo "firewall: tcp/$port (the database's port, from its spec) is open on eth1; 5432 is not"
else
  echo "the firewall does not open the database's port $port on eth1:"
  echo "$app_chain"
  exit 1
fi

# ---- health -----------------------------------------------------------------------
say "health: the twelve checks, as the agent ran them just now (dbvmctl health --fresh)"
run "$bin/dbvmctl" health db-demo --fresh --wide

say "stop the database: the change reaches dbvmctl events within one check interval (5 s here)"
"$bin/dbvmctl" events --agent db-demo > "$demo/events.out" 2>&1 &
events_pid=$!
pids+=("$events_pid")
sleep 1
run "$bin/dbvmctl" send db-demo db.stop
t0=$(date +%s%N)
seen=""
for _ in $(seq 120); do
  if grep -q "connectivity.*critical" "$demo/events.out" 2>/dev/null; then
    seen=$(( ($(date +%s%N) - t0) / 1000000 )); break
  fi
  sleep 0.05
done
grep "health" "$demo/events.out" | grep -m3 "critical" || true
if [ -n "$seen" ]; then
  echo "connectivity → critical reached dbvmctl events ${seen} ms after db.stop returned (interval 5 s)"
else
  echo "no health.changed event within 6 s: see $demo/events.out and $demo/agent.log"; exit 1
fi
run "$bin/dbvmctl" health db-demo
run "$bin/dbvmctl" send db-demo db.start
sleep 6
kill "$events_pid" 2>/dev/null || true
run "$bin/dbvmctl" fleet

say "the agent's Prometheus endpoint (what Telegraf or Prometheus scrapes)"
curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^dbvm_agent_(health_status|db_|link_up|process_resident)' | head -20

say "demo complete; logs and config are in $demo (broker.log, agent.log)"
