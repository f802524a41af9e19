#!/usr/bin/env bash
# Sets up this machine (scripts/setup.sh) and runs every check dbvm has: formatting,
# clippy with warnings as errors, the documentation with warnings as errors, unused
# dependencies, the static musl builds and RPMs (scripts/build-rpms.sh), the whole test suite (unit,
# component and end-to-end tests against real processes), and the API's contract tests
# (scripts/contract.sh: schemathesis against a live broker and agent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> [%dm%02ds] %s\033[0m\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

say "unused dependencies (cargo machete)"
cargo machete

say "the image builders' command: the static agent and broker and their RPMs (scripts/build-rpms.sh)"
bash scripts/build-rpms.sh --out target/rpm
agent=target/x86_64-unknown-linux-musl/release/dbvm-agent
say "dbvm-agent: $(file -b "$agent" | grep -Eo 'static-pie linked|statically linked'), $(du -h "$agent" | cut -f1)"

say "cargo test --workspace"
# The database tests start a private Docker engine under target/dbvm-test-docker (see
# tests/src/docker.rs); stop it when the tests end, however they end.
trap 'bash scripts/dockerd.sh stop target/dbvm-test-docker >/dev/null 2>&1 || true' EXIT
cargo test --workspace --locked -- --test-threads 2

say "the API's contract: schemathesis against a live broker and agent (scripts/contract.sh)"
CONTRACT_SKIP_SETUP=1 bash scripts/contract.sh
say "every check passed"
