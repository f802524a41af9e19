#!/usr/bin/env bash
# A private, host-neutral Docker engine for tests and development.
#
#   bash scripts/dockerd.sh start DIR    start it (or find it running); prints the socket path
#   bash scripts/dockerd.sh stop DIR     stop only the engine that lives in DIR
#   bash scripts/dockerd.sh status DIR   exit 0 and print the socket path if it answers
#
# Everything it owns lives under DIR: the API socket DIR/docker.sock, images and containers
# in DIR/data, runtime state in DIR/exec, its own containerd (DIR/exec/containerd/
# containerd.sock, pid file DIR/containerd.pid, log DIR/containerd.log), the pid file
# DIR/docker.pid and the log DIR/dockerd.log.
#
# Host-neutral: no docker0 bridge, no iptables/nft rules, ip_forward untouched, no
# /etc/docker/daemon.json, no /opt/containerd. It never uses the system containerd: dockerd
# 20.10 would adopt /run/containerd/containerd.sock if one exists, so this script starts a
# containerd of its own and points dockerd at it (own namespace `dbvm-test` too).
# Containers use the host's network (`--network host`) or none; their cgroups live under
# `dbvm-test-docker`. The one shared path is /run/containerd/s, where containerd 1.6's shims
# put sockets named by a hash of (containerd address, namespace, container id): no collision.
# Another dockerd/containerd on the machine is never touched: stop
# checks each pid's command line before signalling it.
set -euo pipefail

usage() {
  echo "usage: bash scripts/dockerd.sh start|stop|status DIR" >&2
  exit 2
}
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd -P)
sock="$dir/docker.sock"
pidfile="$dir/docker.pid"
log="$dir/dockerd.log"
ctrd_pidfile="$dir/containerd.pid"
ctrd_conf="$dir/containerd.toml"
ctrd_log="$dir/containerd.log"
ctrd_sock="$dir/exec/containerd/containerd.sock"

die() {
  echo "dockerd.sh: $*" >&2
  exit 1
}

# Unix socket paths are limited to 107 bytes; containerd's is the longest one we create.
if [ ${#ctrd_sock} -gt 100 ]; then
  die "DIR is too deep for unix socket paths (${#ctrd_sock} > 100 bytes: $ctrd_sock); use a shorter DIR"
fi

# pid_if_ours PIDFILE NEEDLE: prints the pid from PIDFILE when that process is alive and its
# command line contains NEEDLE (so a reused pid is never signalled).
pid_if_ours() {
  local pf=$1 needle=$2 pid
  [ -f "$pf" ] || return 1
  pid=$(tr -dc '0-9' <"$pf")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$needle" || return 1
  echo "$pid"
}

answers() {
  curl -sf --max-time 2 --unix-socket "$sock" http://localhost/version >/dev/null 2>&1
}

wait_gone() { # wait_gone PID SECONDS
  local pid=$1 n=$(($2 * 10))
  while [ -d "/proc/$pid" ] && [ $n -gt 0 ]; do
    sleep 0.1
    n=$((n - 1))
  done
  [ ! -d "/proc/$pid" ]
}

start() {
  command -v dockerd >/dev/null || die "dockerd not found: install it: bash scripts/setup.sh (Debian package docker.io)"
  command -v curl >/dev/null || die "curl not found: install it: bash scripts/setup.sh"
  if pid=$(pid_if_ours "$pidfile" "$sock"); then
    local n=100
    until answers; do
      [ -d "/proc/$pid" ] || break
      n=$((n - 1))
      [ $n -gt 0 ] || die "dockerd (pid $pid) runs in $dir but $sock does not answer; see $log"
      sleep 0.1
    done
    if answers; then
      echo "$sock"
      return 0
    fi
  fi
  command -v containerd >/dev/null || die "containerd not found: install it: bash scripts/setup.sh (Debian package docker.io)"
  mkdir -p "$dir/data" "$dir/exec/containerd"
  if ! pid_if_ours "$ctrd_pidfile" "$ctrd_conf" >/dev/null; then
    # Everything under DIR; the opt plugin (which would create /opt/containerd) and CRI are off.
    cat >"$ctrd_conf" <<CONF
version = 2
root = "$dir/data/containerd"
state = "$dir/exec/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]
[grpc]
  address = "$ctrd_sock"
[ttrpc]
  address = ""
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""
CONF
    rm -f "$ctrd_sock"
    setsid env -u CONTAINERD_ADDRESS -u CONTAINERD_NAMESPACE \
      containerd --config "$ctrd_conf" </dev/null >>"$ctrd_log" 2>&1 &
    echo $! >"$ctrd_pidfile"
    local cpid=$! n=300
    until [ -S "$ctrd_sock" ]; do
      [ -d "/proc/$cpid" ] || { tail -n 20 "$ctrd_log" >&2; die "containerd exited while starting; log: $ctrd_log"; }
      n=$((n - 1))
      [ $n -gt 0 ] || die "containerd did not create $ctrd_sock within 30 s; log: $ctrd_log"
      sleep 0.1
    done
  fi
  # An empty config file, so the machine's /etc/docker/daemon.json does not apply here.
  [ -f "$dir/daemon.json" ] || echo '{}' >"$dir/daemon.json"
  rm -f "$sock"
  # setsid: the engine outlives the shell (and the test process) that started it.
  setsid env -u DOCKER_HOST -u CONTAINERD_ADDRESS -u CONTAINERD_NAMESPACE \
    dockerd \
    --host "unix://$sock" \
    --containerd "$ctrd_sock" \
    --data-root "$dir/data" \
    --exec-root "$dir/exec" \
    --pidfile "$pidfile" \
    --config-file "$dir/daemon.json" \
    --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    --containerd-namespace dbvm-test --containerd-plugins-namespace dbvm-test-plugins \
    --cgroup-parent dbvm-test-docker \
    --log-level warn \
    </dev/null >>"$log" 2>&1 &
  local dpid=$! n=300
  until answers; do
    if ! [ -d "/proc/$dpid" ]; then
      tail -n 20 "$log" >&2
      die "dockerd exited while starting; log: $log"
    fi
    n=$((n - 1))
    if [ $n -le 0 ]; then
      tail -n 20 "$log" >&2
      die "dockerd did not answer on $sock within 30 s; log: $log"
    fi
    sleep 0.1
  done
  echo "$sock"
}

stop() {
  local pid
  if pid=$(pid_if_ours "$pidfile" "$sock"); then
    kill -TERM "$pid"
    if ! wait_gone "$pid" 30; then
      echo "dockerd.sh: dockerd (pid $pid) did not stop within 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
  fi
  if pid=$(pid_if_ours "$ctrd_pidfile" "$ctrd_conf"); then
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile" "$ctrd_pidfile"
  # dockerd leaves mounts behind (DIR/data bound on itself, DIR/exec/netns/default); with
  # both daemons gone they are ours to drop, deepest first, so `rm -rf DIR` works.
  awk -v d="$dir/" 'index($5, d) == 1 || $5 == substr(d, 1, length(d) - 1) {print $5}' \
    /proc/self/mountinfo | sort -r | while IFS= read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "dockerd.sh: could not unmount $m" >&2
  done
  # containerd 1.6 puts shim sockets in /run/containerd/s/<hash of address+namespace+id>
  # whatever its configuration (unique names, so no collision); tidy up when nobody is left.
  rmdir /run/containerd/s /run/containerd 2>/dev/null || true
}

case "$cmd" in
start) start ;;
stop) stop ;;
status)
  if pid_if_ours "$pidfile" "$sock" >/dev/null && answers; then
    echo "$sock"
  else
    echo "dockerd.sh: no engine answers on $sock" >&2
    exit 1
  fi
  ;;
*) usage ;;
esac
