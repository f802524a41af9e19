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
# Agent and broker together, as scripts/build-rpms.sh builds them (the same features, so
# its build later only rebuilds what the version changes).
cargo build --release --locked --target x86_64-unknown-linux-musl -p dbvm-agent -p dbvm-broker
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
  # No journald here: the agent's log files are where its bundles find its logs.
  echo '[bundle]'
  echo "log_dir = \"$demo/logs\""
  sed -n '/\[\[trusted_keys\]\]/,$p' "$demo/keygen.out"
} > "$demo/agent.toml"
# db-demo runs from its own copy (its VM's /usr/bin/dbvm-agent): an upgrade replaces it.
mkdir -p "$demo/db-demo-bin" "$demo/logs"
cp "$agent_bin" "$demo/db-demo-bin/dbvm-agent"
"$demo/db-demo-bin/dbvm-agent" --config "$demo/agent.toml" 2> "$demo/logs/agent.log" &
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

say "roles: a certificate for a dashboard that may only read (dbvmctl ca issue --role reader); it lists agents, and submitting is refused with 403 naming the operator role"
run "$bin/dbvmctl" ca issue dashboard --role reader --out "$demo/dashboard"
mkdir -p "$demo/dashboard-home"
DBVM_HOME="$demo/dashboard-home" "$bin/dbvmctl" keygen >/dev/null 2>&1
cp "$DBVM_HOME/ca.crt" "$demo/dashboard-home/"
cp "$demo/dashboard/dashboard.crt" "$demo/dashboard-home/controlplane.crt"
cp "$demo/dashboard/dashboard.key" "$demo/dashboard-home/controlplane.key"
DBVM_HOME="$demo/dashboard-home" run "$bin/dbvmctl" agents
DBVM_HOME="$demo/dashboard-home" run "$bin/dbvmctl" send db-demo ping || echo "(exit code $?: refused, as it should be)"

say "a control plane finds its commands again: the list (newest first, by page), a queued command taken back, and the events it missed while away, resumed by id"
last_event=0
queued=$("$bin/dbvmctl" send db-later ping --no-wait --json | sed -nE 's/.*"id": *"([0-9a-f-]{36})".*/\1/p' | head -1)
run "$bin/dbvmctl" commands --limit 3
run "$bin/dbvmctl" commands --state queued
run "$bin/dbvmctl" cancel "$queued"
run "$bin/dbvmctl" cancel "$queued" || echo "(exit code $?: already cancelled, as it should be)"
# Every event since the broker started, from the log (a control plane back from a restart
# passes the last id it saw); the first few lines of it.
timeout 3 "$bin/dbvmctl" events --after "$last_event" > "$demo/resumed-events.out" 2>&1 || true
printf '\033[2m$ dbvmctl events --after %s | head -5\033[0m\n' "$last_event" >&2
head -5 "$demo/resumed-events.out"

say "agent memory: $(grep VmRSS /proc/${pids[1]}/status | tr -s ' ')"

say "first boot of a new VM: the package's config (names no VM) and the OVF environment a deployment fills (VMware Tools hands it over as guestinfo.ovfEnv; here a file in the same format)"
fb="$demo/firstboot"
mkdir -p "$fb"
# The package's [firewall] section is turned off here: on this machine it would put its
# drop-by-default nftables table on the host (the demo's firewall part runs in a namespace).
sed -e "s|/var/lib/dbvm-agent|$fb/state|" -e "s|/etc/dbvm/|$fb/|g" \
  -e 's|^enabled = true$|enabled = false|' packaging/rpm/agent.toml > "$fb/agent.toml"
grep -qx 'enabled = false' "$fb/agent.toml" || { echo "demo: the package's firewall is not off" >&2; exit 1; }
printf '[health]\nmetrics_listen = ""\n' >> "$fb/agent.toml"
fb_token=$("$bin/dbvmctl" enroll-token db-firstboot --ttl 600)
key_id=$(sed -n 's/^key_id = "\(.*\)"$/\1/p' "$demo/keygen.out" | head -1)
public_key=$(sed -n 's/^public_key = "\(.*\)"$/\1/p' "$demo/keygen.out" | head -1)
cat > "$fb/ovf-env.xml" <<XML
<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv" oe:id="" ve:vCenterId="vm-42">
   <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>
   <PropertySection>
      <Property oe:key="dbvm.agent_id" oe:value="db-firstboot"/>
      <Property oe:key="dbvm.broker_address" oe:value="localhost:${agent_addr##*:}"/>
      <Property oe:key="dbvm.fleet_ca" oe:value="$(base64 -w0 "$DBVM_HOME/ca.crt")"/>
      <Property oe:key="dbvm.enrollment_token" oe:value="$fb_token"/>
      <Property oe:key="dbvm.trusted_keys" oe:value="$key_id:$public_key"/>
   </PropertySection>
</Environment>
XML
grep -c 'oe:key' "$fb/ovf-env.xml" | sed 's/^/properties in the environment: /'
fb_start=$(date +%s%N)
DBVM_NETWORK_DIR="$fb/network" "$agent_bin" --config "$fb/agent.toml" --ovf-env "$fb/ovf-env.xml" 2> "$fb/agent.log" &
fb_pid=$!
pids+=($fb_pid)
for _ in $(seq 100); do
  "$bin/dbvmctl" agents --json 2>/dev/null | tr -d ' \n' | grep -q '"id":"db-firstboot","connected":true' && break
  sleep 0.05
done
run "$bin/dbvmctl" send db-firstboot ping echo=first-boot
echo "from agent start to a signed ping answered: $(( ($(date +%s%N) - fb_start) / 1000000 )) ms"
grep "first boot" "$fb/agent.log"
echo "the config it wrote (0600), without the token; the spent token file is gone:"
grep -v '^#' "$fb/agent.toml" | grep -E 'agent_id|address|ca_cert|key_id'
[ ! -e "$fb/enrollment.token" ] && echo "enrollment.token: removed after enrollment"
kill "$fb_pid" 2>/dev/null || true

# ---- the database in the guest ------------------------------------------------------
say "a private Docker engine (host-neutral: no bridge, no iptables) and the local PostgreSQL image"
sock=$(bash scripts/dockerd.sh start "$demo/docker")
cleanup_db() {
  DOCKER_HOST="unix://$sock" docker rm -f db-demo-pg db-demo-restored >/dev/null 2>&1 || true
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
"$demo/db-demo-bin/dbvm-agent" --config "$demo/agent.toml" 2>> "$demo/logs/agent.log" &
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
  echo "no health.changed event within 6 s: see $demo/events.out and $demo/logs/agent.log"; exit 1
fi
run "$bin/dbvmctl" health db-demo
run "$bin/dbvmctl" send db-demo db.start
sleep 6
kill "$events_pid" 2>/dev/null || true
run "$bin/dbvmctl" fleet

# ---- backups ------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
say "an S3 server that verifies request signatures (s3s-fs) behind TLS (stunnel), with a CA of its own"
s3="$demo/s3"
mkdir -p "$s3/data/dbvm" "$s3/data/dbvm-dr" "$s3/tls"
(
  cd "$s3/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=dbvm demo S3 CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
  # pgBackRest 2.45 checks DNS names only: the endpoint is "localhost".
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 -extfile server.ext -out server.crt 2>/dev/null
)
(umask 077; openssl rand -hex 10 > "$s3/access_key"; openssl rand -hex 20 > "$s3/secret_key")
s3_plain=$(free_port)
s3_port=$(free_port)
# The stand-in S3 server takes its keys as arguments; dbvm itself never puts them on an argv.
s3s_fs=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
"$s3s_fs" --host 127.0.0.1 --port "$s3_plain" --access-key "$(cat "$s3/access_key")" \
  --secret-key "$(cat "$s3/secret_key")" "$s3/data" > "$s3/s3s-fs.log" 2>&1 &
pids+=($!)
cat > "$s3/stunnel.conf" <<CONF
foreground = yes
pid =
[s3]
accept = 127.0.0.1:$s3_port
connect = 127.0.0.1:$s3_plain
cert = $s3/tls/server.crt
key = $s3/tls/server.key
CONF
stunnel4 "$s3/stunnel.conf" > "$s3/stunnel.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -s -o /dev/null --cacert "$s3/tls/ca.crt" "https://localhost:$s3_port/" && break
  sleep 0.1
done
echo "S3 at https://localhost:$s3_port (buckets dbvm and dbvm-dr), CA $s3/tls/ca.crt"

say "backups on: pgBackRest (in the database image) with the keys sealed to the agent (read from files: never on a command line); archiving needs a restart, reported; WAL is capped at 15% of the data disk"
storage_flags=(--endpoint "https://localhost:$s3_port" --bucket dbvm --ca-file "$s3/tls/ca.crt"
  --access-key-file "$s3/access_key" --secret-key-file "$s3/secret_key")
say "…and a cloud bucket (dbvm-dr: the disaster-recovery copy, retention 30 days): the agent copies the WAL to it and backs up to it after each local backup"
run "$bin/dbvmctl" backup configure db-demo "${storage_flags[@]}" --retention-days 7 \
  --cloud-endpoint "https://localhost:$s3_port" --cloud-bucket dbvm-dr --cloud-ca-file "$s3/tls/ca.crt" \
  --cloud-access-key-file "$s3/access_key" --cloud-secret-key-file "$s3/secret_key" \
  --cloud-retention-days 30 --cloud-backup-every-hours 0

psql_app() { psql -h 127.0.0.1 -p "$port" -U dbaas -d app -v ON_ERROR_STOP=1 "$@"; }
psql_app -qc "CREATE TABLE orders (id int primary key, note text); INSERT INTO orders SELECT g, 'before the first backup' FROM generate_series(1, 1000) g"
say "a full backup (the first of a chain), 1,000 more rows, an incremental one"
run "$bin/dbvmctl" backup db-demo
psql_app -qc "INSERT INTO orders SELECT g, 'between the backups' FROM generate_series(1001, 2000) g"
run "$bin/dbvmctl" backup db-demo
sleep 1
target=$(psql_app -Atc "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
sleep 1
psql_app -qc "INSERT INTO orders SELECT g, 'after the target: not restored' FROM generate_series(2001, 2500) g"
# Close the WAL segment now rather than within archive_timeout (60 s): as the database
# superuser over its unix socket, which only root and the database user reach.
psql_super() { psql -h "$demo/db/run" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atc "$1"; }
seg=$(psql_super "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 150); do
  last=$(psql_super "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
  [[ "$last" > "$seg" || "$last" == "$seg" ]] && break
  sleep 0.2
done
echo "target time: $target (rows 1-2000 before it, rows 2001-2500 after it)"
run "$bin/dbvmctl" backups db-demo

say "restore to $target into a second database: a new VM's agent (db-restored), its own data directory and port"
token2=$("$bin/dbvmctl" enroll-token db-restored --ttl 600)
printf '%s' "$token2" > "$demo/enroll-restored.token"
port2=$(free_port)
sed -e 's/^agent_id = .*/agent_id = "db-restored"/' \
  -e "s|^state_dir = .*|state_dir = \"$demo/agent-restored-state\"|" \
  -e "s|^enrollment_token_file = .*|enrollment_token_file = \"$demo/enroll-restored.token\"|" \
  -e "s|^metrics_listen = .*|metrics_listen = \"127.0.0.1:$(free_port)\"|" \
  -e "s|^data_root = .*|data_root = \"$demo/db-restored\"|" \
  -e 's/^container_name = .*/container_name = "db-demo-restored"/' \
  -e '/^log_dir = /d' \
  "$demo/agent.toml" | sed '/^\[firewall\]/,/^netns/d' > "$demo/agent-restored.toml"
"$agent_bin" --config "$demo/agent-restored.toml" 2> "$demo/agent-restored.log" &
pids+=($!)
for _ in $(seq 100); do
  "$bin/dbvmctl" agents --json 2>/dev/null | tr -d ' \n' | grep -q '"id":"db-restored","connected":true' && break
  sleep 0.1
done
printf '\033[2m$ dbvmctl restore db-restored --endpoint https://localhost:%s --bucket dbvm --prefix db-demo --ca-file … --access-key-file … --secret-key-file … --port %s --target %s --reveal --json\033[0m\n' "$s3_port" "$port2" "$target" >&2
"$bin/dbvmctl" restore db-restored "${storage_flags[@]}" --prefix db-demo --port "$port2" \
  --target "$target" --timeout 600 --reveal --json > "$demo/restore.json"
grep -v '"password"' "$demo/restore.json" | grep -A8 '"restored"'
password2=$(grep -o '"password": *"[^"]*"' "$demo/restore.json" | sed -E 's/.*: *"([^"]*)"/\1/')

say "row counts: the source now, and the restored database at $target"
src_rows=$(psql_app -Atc "SELECT count(*) FROM orders")
restored_rows=$(PGPASSWORD="$password2" psql -h 127.0.0.1 -p "$port2" -U dbaas -d app -Atc "SELECT count(*) FROM orders")
echo "source db-demo:        $src_rows rows"
echo "restored db-restored:  $restored_rows rows (those committed before $target)"
[ "$src_rows" = 2500 ] && [ "$restored_rows" = 2000 ] || { echo "unexpected row counts"; exit 1; }

say "a restore drill: the newest backup restored into a throwaway copy on the VM, pg_amcheck, row counts, the copy removed"
"$bin/dbvmctl" backup verify db-demo --json > "$demo/verify.json"
grep -E '"(ok|backup_set|amcheck|took_ms)"' "$demo/verify.json" | head -6

say "recover in place: db-demo itself back to $target (restore makes a new database; recover rewrites this one)"
run "$bin/dbvmctl" recover db-demo --target "$target" --timeout 600 > "$demo/recover.txt"
grep -E '"(recovered_to|backup_set)"' "$demo/recover.txt"
recovered_rows=$(psql_app -Atc "SELECT count(*) FROM orders")
echo "source db-demo after recover: $recovered_rows rows (was 2500)"
[ "$recovered_rows" = 2000 ] || { echo "unexpected row count after recover"; exit 1; }

say "the agent's Prometheus endpoint (what Telegraf or Prometheus scrapes)"
curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^dbvm_agent_(health_status|db_|link_up|process_resident)' | head -20

# ---- for support engineers ----------------------------------------------------------------
say "for support engineers: a log bundle of db-demo (its logs, configs redacted, the database's logs and settings, health history, backups, firewall, system facts), uploaded to the broker while the agent writes it, then downloaded and its SHA-256 checked (dbvmctl bundle)"
run "$bin/dbvmctl" bundle db-demo --hours 1 --db-views -o "$demo/db-demo-bundle.tar.zst"
run "$bin/dbvmctl" bundle list
echo "the archive's first entries:"
tar -I zstd -tvf "$demo/db-demo-bundle.tar.zst" | sed -n "1,12p"
say "the broker's own bundle: its config (redacted), logs, store counts, agents and metrics"
run "$bin/dbvmctl" bundle broker -o "$demo/broker-bundle.tar.zst"

# ---- for image builders ----------------------------------------------------------------
say "the image builders' command: the static agent and broker at version 0.1.1 and their RPMs, signed with the builder's GPG key (a throwaway one here)"
export GNUPGHOME="$demo/gnupg"
mkdir -p -m 0700 "$GNUPGHOME"
gpg --batch --passphrase '' --quick-gen-key "dbvm demo builder <builder@dbvm.demo>" rsa2048 sign never 2>/dev/null
run bash scripts/build-rpms.sh --version 0.1.1 --sign-key builder@dbvm.demo --out "$demo/rpm"

say "installed into a throwaway root as tdnf would (rpm --root; signatures enforced; the scriptlets run)"
rr="$demo/rpm-root"
mkdir -p "$rr/bin" "$rr/etc" "$rr/usr/lib/systemd/system"
# What the scriptlets need: a shell (static busybox), systemctl and systemd-sysusers with
# their libraries, and the targets the units name.
cp "$(command -v busybox)" "$rr/bin/sh"
for tool in /usr/bin/systemctl /usr/bin/systemd-sysusers; do
  for f in "$tool" $(ldd "$tool" | grep -o '/[^ ]*'); do
    mkdir -p "$rr$(dirname "$f")"; cp "$f" "$rr$f"
  done
done
cp /usr/lib/systemd/system/*.target "$rr/usr/lib/systemd/system/" 2>/dev/null || true
echo 'root:x:0:0:root:/root:/bin/sh' > "$rr/etc/passwd"
echo 'root:x:0:' > "$rr/etc/group"
rpm_root() { rpm --root "$rr" --dbpath /var/lib/rpm --define '_pkgverify_level signature' "$@"; }
rpm_root --initdb
gpg --armor --export builder@dbvm.demo > "$demo/builder.asc"
run rpm_root --import "$demo/builder.asc"
run rpm_root -K "$demo"/rpm/dbvm-agent-0.1.1-1.x86_64.rpm "$demo"/rpm/dbvm-broker-0.1.1-1.x86_64.rpm
# --nodeps: the throwaway root has none of Photon's packages (systemd, docker, nftables).
run rpm_root --nodeps -i "$demo"/rpm/dbvm-agent-0.1.1-1.x86_64.rpm "$demo"/rpm/dbvm-broker-0.1.1-1.x86_64.rpm
run rpm_root -qa
ls -l "$rr/usr/bin/dbvm-agent" "$rr/etc/dbvm/"
echo "enabled: $(ls "$rr/etc/systemd/system/multi-user.target.wants/")"
echo "the package's binary says: $("$rr/usr/bin/dbvm-agent" --version)"

say "a signed upgrade of db-demo to the package's 0.1.1 agent: uploaded to the broker once, then agent.upgrade in waves (dbvmctl upgrade); the new agent must connect on trial before the old one swaps it in and re-executes"
before="$(readlink "/proc/${pids[1]}/exe")"
run "$bin/dbvmctl" upgrade --binary "$rr/usr/bin/dbvm-agent" --version 0.1.1 --wave-size 1 db-demo
run "$bin/dbvmctl" send db-demo ping
echo "same process (pid ${pids[1]}): $before, now $("$demo/db-demo-bin/dbvm-agent" --version) ($(sha256sum "$demo/db-demo-bin/dbvm-agent" | cut -c1-16)…)"
say "the upgraded agent goes on managing the database"
run "$bin/dbvmctl" send db-demo db.status > "$demo/status-after-upgrade.json"
head -8 "$demo/status-after-upgrade.json"

say "demo complete; logs and config are in $demo (broker.log, logs/agent.log, db-demo-bundle.tar.zst)"
