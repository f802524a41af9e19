#!/usr/bin/env bash
# Installs what dbvm needs to build, test and run its demo on Debian 12, as root.
# Safe to run any number of times: every step checks before it acts.
set -euo pipefail

say() { printf '\033[1m==> [%dm%02ds] %s\033[0m\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages)" >&2
  exit 2
fi

# Debian packages: C toolchain for ring and SQLite, musl for the static agent,
# iproute2 and nftables for the firewall and network-namespace tests, procps for process
# checks, the Docker engine (the agent's container runtime), PostgreSQL 15 and MariaDB
# (their files become the local database images; their clients talk to them in tests and
# the demo), socat for throwaway listeners in firewall tests, busybox-static for /bin/sh in
# those images (packaging/images/build-image.sh). Backups: pgbackrest and mariadb-backup
# (the tools the agent runs, copied into the images too), zstd (streams MariaDB backups
# compressed), stunnel4 (TLS in front of the test S3 server, which speaks plain HTTP only;
# tests/src/s3.rs). Packaging: rpm (rpmbuild, rpmsign, rpm --root), gnupg (signs them),
# systemd (systemctl and systemd-sysusers run the RPMs' scriptlets in a throwaway root;
# systemd-analyze verifies the units offline). The Photon image recipe (photon/): packer
# (validates and builds the vSphere template), jq (the image manifest's SBOM). python3 and
# python3-venv (Debian's python3 has no ensurepip without it): the contract tests'
# virtual environment below, and free ports in the scripts.
packages=(build-essential pkg-config musl-tools ca-certificates curl iproute2 procps file
  nftables docker.io postgresql-15 postgresql-client-15 mariadb-server mariadb-client socat
  busybox-static pgbackrest mariadb-backup stunnel4 zstd rpm gnupg systemd packer jq
  python3 python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi

# Rust: the machine's rustup toolchain, or rustup from its installer on a fresh machine.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  say "installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    say "adding the x86_64-unknown-linux-musl target (the agent is a static executable)"
    rustup target add x86_64-unknown-linux-musl >/dev/null
  fi
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
  done
fi
# cargo-machete: scripts/test.sh fails on a dependency no code uses. Built once (about two
# minutes) and kept in ~/.cargo/bin; --locked builds what its authors tested.
if ! command -v cargo-machete >/dev/null 2>&1; then
  say "installing cargo-machete (checks for unused dependencies; built once, about 2 minutes)"
  cargo install cargo-machete --version 0.9.2 --locked --quiet
fi
# cargo-auditable: `cargo auditable build` embeds the binary's crate list, which
# photon/image-manifest.sh turns into the image's SBOM (tests/tests/photon.rs). Built once
# (under a minute).
if ! command -v cargo-auditable >/dev/null 2>&1; then
  say "installing cargo-auditable (embeds the dependency list the image SBOM reads; built once)"
  cargo install cargo-auditable --version 0.7.7 --locked --quiet
fi
# s3s-fs: the S3 server of the backup tests (verifies SigV4 signatures, keeps objects as
# files; tests/src/s3.rs). 0.14.1 because newer releases need a newer rustc than 1.95.
if ! command -v s3s-fs >/dev/null 2>&1 && ! [ -x "$HOME/.cargo/bin/s3s-fs" ]; then
  say "installing s3s-fs (the S3 server of the backup tests; built once, about 2 minutes)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi
# schemathesis: scripts/contract.sh fuzzes the broker's API against broker/openapi.json with
# it (a PyPI package, not a Debian one). It lives in its own virtual environment under
# target/ so it never touches the system's Python, and is pinned: a newer schemathesis adds
# checks and changes its CLI, so a run that passed must keep passing for the same broker.
# Installed only when that version is not there already.
st_version=4.32.5
st_venv="$(cd "$(dirname "$0")/.." && pwd)/target/schemathesis-venv"
if ! "$st_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '$st_version')" 2>/dev/null; then
  say "installing schemathesis $st_version into $st_venv (the contract tests' API fuzzer)"
  [ -x "$st_venv/bin/python" ] || python3 -m venv "$st_venv"
  "$st_venv/bin/python" -m pip install --quiet "schemathesis==$st_version"
fi
say "setup complete: $(cargo --version)"
