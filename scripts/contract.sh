#!/usr/bin/env bash
# Contract tests of the broker's HTTPS API: schemathesis (a property-based API fuzzer)
# against a live dbvm-broker, checking every response against the API document the broker
# serves (/openapi.json: broker/openapi.json as it was built into the binary).
#
# What runs, all in a throwaway directory under target/ and on ports the kernel picks:
# a fleet CA, a control-plane certificate with all three roles (operator, reader, support),
# a broker on its embedded store, and one agent (no database) enrolled with a one-time token
# and connected, so the agent routes answer about a real agent. Then every schemathesis
# phase (examples, coverage, fuzzing, stateful), every check, positive and negative data,
# a fixed seed and a bounded number of examples per operation (about 2.5 minutes with the
# defaults): first the two agents-only routes with the agent's certificate, then every route
# with the control-plane certificate. Exits non-zero on any failure, after listing every
# distinct cause; the reports (JUnit, NDJSON events, a pytest file reproducing each
# failure) and the broker's and agent's logs are kept in the run directory, whose path it
# prints.
#
#   bash scripts/contract.sh                 # builds the three binaries (debug), then runs
#   BIN_DIR=/some/dir bash scripts/contract.sh   # uses dbvm-broker, dbvm-agent, dbvmctl there
#
# More knobs (environment): CONTRACT_SEED (default 1729), CONTRACT_MAX_EXAMPLES per
# operation (default 50), CONTRACT_REQUEST_TIMEOUT in seconds (default 10),
# CONTRACT_SKIP_SETUP=1 to skip scripts/setup.sh (the schemathesis venv must exist),
# CONTRACT_KEEP=1 to keep the run directory after a passing run too. Extra arguments are
# passed to the main `st run` (e.g. --include-path /v1/agents).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "${CONTRACT_SKIP_SETUP:-}" != 1 ]; then
  bash scripts/setup.sh
fi
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
st="$root/target/schemathesis-venv/bin/st"
[ -x "$st" ] || { echo "contract.sh: $st is missing: run scripts/setup.sh" >&2; exit 2; }

if [ -n "${BIN_DIR:-}" ]; then
  bin=$(cd "$BIN_DIR" && pwd)
else
  say "building dbvm-broker, dbvm-agent and dbvmctl (debug)"
  cargo build --locked --bin dbvm-broker --bin dbvm-agent --bin dbvmctl
  bin="$root/target/debug"
fi
for b in dbvm-broker dbvm-agent dbvmctl; do
  [ -x "$bin/$b" ] || { echo "contract.sh: no $bin/$b" >&2; exit 2; }
done

seed="${CONTRACT_SEED:-1729}"
max_examples="${CONTRACT_MAX_EXAMPLES:-50}"
request_timeout="${CONTRACT_REQUEST_TIMEOUT:-10}"

mkdir -p "$root/target"
work=$(mktemp -d "$root/target/contract.XXXXXX")
export DBVM_HOME="$work/ctl"
pids=()
status=1
cleanup() {
  # Only the processes this script started, by pid.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$status" -eq 0 ] && [ "${CONTRACT_KEEP:-}" != 1 ]; then
    rm -rf "$work"
  else
    echo "contract.sh: reports and logs are in $work" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "fleet CA, control-plane keys and a control-plane certificate with every role (in $work)"
"$bin/dbvmctl" keygen > "$work/keygen.out"
"$bin/dbvmctl" ca init --broker-name localhost --broker-name 127.0.0.1 >/dev/null
mkdir -p "$work/certs"
"$bin/dbvmctl" ca issue contract --role operator,reader,support --out "$work/certs"
trusted_keys=$(sed -n '/\[\[trusted_keys\]\]/,$p' "$work/keygen.out")

say "starting dbvm-broker (ports chosen by the kernel)"
cat > "$work/broker.toml" <<TOML
agent_listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
data_dir = "$work/broker-data"
[tls]
ca_cert = "$DBVM_HOME/ca.crt"
ca_key = "$DBVM_HOME/ca.key"
server_cert = "$DBVM_HOME/broker.crt"
server_key = "$DBVM_HOME/broker.key"
$trusted_keys
TOML
"$bin/dbvm-broker" --config "$work/broker.toml" > "$work/broker.out" 2> "$work/broker.log" &
pids+=($!)
broker_pid=$!
line=""
for _ in $(seq 150); do
  line=$(grep -m1 '^listening ' "$work/broker.out" 2>/dev/null) && break
  kill -0 "$broker_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$line" ] || { echo "contract.sh: the broker did not start:" >&2; cat "$work/broker.log" >&2; exit 1; }
agent_addr=$(sed -E 's/.*agent=([^ ]+).*/\1/' <<<"$line")
api_addr=$(sed -E 's/.*api=([^ ]+).*/\1/' <<<"$line")
base="https://localhost:${api_addr##*:}"
export DBVM_BROKER="$base"
echo "$line"

say "enrolling and starting agent db-contract (no database)"
"$bin/dbvmctl" enroll-token db-contract --ttl 600 > "$work/enroll.token"
cat > "$work/agent.toml" <<TOML
agent_id = "db-contract"
state_dir = "$work/agent-state"
[broker]
address = "localhost:${agent_addr##*:}"
ca_cert = "$DBVM_HOME/ca.crt"
enrollment_token_file = "$work/enroll.token"
$trusted_keys
[link]
initial_backoff_ms = 100
max_backoff_ms = 1000
[health]
metrics_listen = ""
shadow_file = "/nonexistent/shadow"
TOML
"$bin/dbvm-agent" --config "$work/agent.toml" 2> "$work/agent.log" &
pids+=($!)
agent_pid=$!
connected=""
for _ in $(seq 200); do
  if "$bin/dbvmctl" agents --json 2>/dev/null | tr -d ' \n' | grep -q '"id":"db-contract","connected":true'; then
    connected=1; break
  fi
  kill -0 "$agent_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$connected" ] || { echo "contract.sh: the agent did not connect:" >&2; cat "$work/agent.log" >&2; exit 1; }
# One signed command end to end, so the store holds a finished command and the agent is
# known to answer.
"$bin/dbvmctl" send db-contract ping echo=contract --timeout 30 > "$work/ping.out"
# (No command is left queued: a long poll on one, GET /v1/commands/{id}/wait with the
# document's largest timeout_ms, rightly takes 60 s. Cancelling a queued command is
# tested end to end in tests/tests/control_plane.rs; here cancel meets the finished ping
# through the links of GET /v1/commands and answers 409 with its state.)

# Two routes are for agents only (an agent uploads the log bundle a bundle.collect asked for):
# a control-plane certificate gets 403 there, which the main run checks. Their own run, first
# (the main run may revoke this agent: it learns its id from GET /v1/agents), is made with
# the agent's certificate, so requests reach their handlers too.
cp "$work/agent-state/identity.pem" "$work/certs/agent-identity.pem"

# GET /v1/events is an event stream that never ends: schemathesis reads a stream until the
# request timeout has passed in total (or 20 events came). The stored events are sent at
# once, so 2 s sees them, and its few dozen requests do not take 10 s each.
#
# Two operations take what no schema can describe: a command signed by a trusted key within
# its time window (POST /v1/commands), and bytes hashing to the SHA-256 in the path (PUT
# /v1/artifacts/{sha256}). A fuzzer makes neither, so for those two only, a schema-valid
# request may also get the documented 400 (not base64, does not decode, sha256_mismatch)
# without failing positive_data_acceptance; every other check applies to them as to the rest.
cat > "$work/schemathesis.toml" <<TOML
[[operations]]
include-path = "/v1/events"
request-timeout = 2

[[operations]]
include-path = "/v1/commands"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-path = "/v1/artifacts/{sha256}"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
TOML

common=(
  --checks all
  --continue-on-failure
  --mode all
  --seed "$seed"
  --max-examples "$max_examples"
  --generation-database none
  --workers 1
  --tls-verify "$DBVM_HOME/ca.crt"
  --request-timeout "$request_timeout"
  --no-color
)
rc=0
run_st() { # NAME ARGS...: one `st run`, its output and reports under $work/NAME
  local name=$1 code
  shift
  local args=(--config-file "$work/schemathesis.toml" run "$base/openapi.json" "${common[@]}"
    --report junit,ndjson,pytest --report-dir "$work/$name" "$@")
  printf '$ st'; printf ' %q' "${args[@]}"; printf '\n'
  local start=$(date +%s)
  # From the run directory (schemathesis keeps nothing in the work tree), in the background
  # and waited for, so that a TERM reaches the trap (and stops it) at once.
  (cd "$work" && exec "$st" "${args[@]}") > >(tee "$work/$name.out") 2>&1 &
  pids+=($!)
  code=0
  wait $! || code=$?
  unset 'pids[-1]' # it has ended: its pid is no longer ours to kill
  echo "schemathesis ($name) exited $code after $(( $(date +%s) - start )) s"
  [ "$code" -eq 0 ] || { rc=1; causes "$work/$name"/*.ndjson | tee "$work/$name.causes" || true; }
}

# schemathesis prints one example per operation and check: several causes behind one check
# (say, a path parameter's pattern and a body field's type both refused as "schema-valid
# request rejected") show as one. This lists every failing request from the NDJSON report,
# grouped by operation, check, status and the error message with its values taken out.
causes() {
  "$root/target/schemathesis-venv/bin/python" - "$@" <<'PY'
import base64, collections, json, re, sys
groups = collections.defaultdict(list)
def one_line(text, width):
    text = (text or "").replace("\n", "\\n")
    return (text if text.isprintable() else json.dumps(text))[:width]
for path in sys.argv[1:]:
    for line in open(path):
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        rec = event["recorder"]
        for case_id, checks in rec.get("checks", {}).items():
            interaction = rec.get("interactions", {}).get(case_id) or {}
            request, response = interaction.get("request") or {}, interaction.get("response") or {}
            body = response.get("content") or ""
            if isinstance(body, dict):
                body = base64.b64decode(body.get("$base64", "")).decode("utf-8", "replace")
            error = re.search(r'"error":"(.*?)"}', body)
            # An error's message with the values taken out; other bodies (a 200's) by kind
            if error:
                cause = re.sub(r'\\?"[^"]*?\\?"|`[^`]*`|[0-9a-f]{64}|\d+', "_", error.group(1))
            elif body.startswith("{"):
                cause = "(a JSON body)"
            else:
                sse = re.search(r"^event: (.*)$", body, re.M)
                cause = f"(an event stream, first event {sse.group(1)})" if sse else f"({body[:30] or 'empty'})"
            sent = request.get("body")
            if isinstance(sent, dict):
                sent = base64.b64decode(sent.get("$base64", "")).decode("utf-8", "replace")
            headers = " ".join(f"-H '{name}: {values[0]}'" for name, values in request.get("headers", {}).items()
                               if name.lower() != "content-type")
            for check in checks:
                if check["status"] == "failure":
                    key = (rec["cases"].get(case_id, {}).get("value", {}).get("method", ""), rec["label"],
                           check["name"], response.get("status_code"), cause[:100])
                    groups[key].append((request.get("uri", ""), headers, one_line(sent, 160), one_line(body, 200)))
print(f"{len(groups)} distinct failure causes (operation, check, status, error):")
for (method, label, check, status, cause), cases in sorted(groups.items(), key=lambda g: (g[0][1], g[0][2])):
    uri, headers, sent, body = cases[0]
    print(f"- {label} [{check}] {status} x{len(cases)}: {cause}")
    print(f"    {method} {uri}" + (f" {headers}" if headers else "") + (f" body {sent}" if sent else ""))
    print(f"    -> {body}")
PY
}

version=$("$st" --version | sed 's/.* //')
say "schemathesis $version, the agents' routes with agent db-contract's certificate (seed $seed, at most $max_examples examples per operation)"
# No stateful phase here: no link leads to or from these two (a bundle's id comes from a
# signed bundle.collect, not from an answer of the API).
run_st agent-routes --phases examples,coverage,fuzzing \
  --include-path-regex '^/v1/bundles/\{id\}/(content|complete)$' \
  --request-cert "$work/certs/agent-identity.pem"

say "schemathesis $version, every route with a control-plane certificate with every role, against $base/openapi.json"
run_st control-plane --phases examples,coverage,fuzzing,stateful --request-cert "$work/certs/contract.crt" \
  --request-cert-key "$work/certs/contract.key" "$@"

kill -0 "$broker_pid" 2>/dev/null || { echo "contract.sh: the broker died during the run" >&2; rc=1; }
status=$rc
exit "$rc"
