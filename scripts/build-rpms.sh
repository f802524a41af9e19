#!/usr/bin/env bash
# Builds the static dbvm-agent and dbvm-broker (musl) and their RPMs for Photon OS, into
# target/rpm/ (one command for image builders; see packaging/README.md).
#
#   bash scripts/build-rpms.sh [--sign-key KEY] [--out DIR] [--version V] [--bin-dir DIR]
#
#   --sign-key KEY  sign both RPMs with rpmsign and the GPG key KEY (a key id or user id
#                   in the keyring GNUPGHOME names; the image builder supplies it)
#   --out DIR       where the RPMs go (default target/rpm)
#   --version V     the packages' version (default the workspace's)
#   --bin-dir DIR   package dbvm-agent and dbvm-broker already built in DIR instead of
#                   building them (the packaging tests use their debug builds)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

sign_key="" out="$root/target/rpm" version="" bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sign-key) sign_key="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --bin-dir) bin="$2"; shift 2 ;;
    *) echo "build-rpms.sh: unknown argument $1 (see the comment at the top of this script)" >&2; exit 2 ;;
  esac
done
workspace_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || version=$workspace_version
if ! [[ "$version" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
  echo "build-rpms.sh: version $version: digits and dots only (an RPM version)" >&2
  exit 2
fi
for tool in rpmbuild rpmsign; do
  command -v "$tool" >/dev/null || { echo "build-rpms.sh: $tool is missing: bash scripts/setup.sh installs it (Debian package rpm)" >&2; exit 1; }
done

if [ -z "$bin" ]; then
  echo "== building the static agent and broker (release, musl)" >&2
  # The binaries report the packages' version (dbvm_host::VERSION). Set only when it
  # differs: cargo rebuilds whatever reads the variable when it changes, set or not.
  if [ "$version" != "$workspace_version" ]; then export DBVM_BUILD_VERSION="$version"; fi
  cargo build --release --locked --target x86_64-unknown-linux-musl -p dbvm-agent -p dbvm-broker
  bin="$root/target/x86_64-unknown-linux-musl/release"
  for b in dbvm-agent dbvm-broker; do
    if ! file "$bin/$b" | grep -Eq 'static(-pie)? linked|statically linked'; then
      echo "build-rpms.sh: $bin/$b is not a static executable: $(file -b "$bin/$b")" >&2
      exit 1
    fi
  done
fi
bin=$(cd "$bin" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
for pkg in dbvm-agent dbvm-broker; do
  [ -x "$bin/$pkg" ] || { echo "build-rpms.sh: $bin/$pkg is missing" >&2; exit 1; }
  # rpmbuild warns that Debian is not an RPM system; the package is for Photon OS.
  rpmbuild -bb --quiet --target x86_64 \
    --define "_topdir $work" \
    --define "dbvm_version $version" \
    --define "dbvm_bin $bin" \
    --define "dbvm_src $root" \
    --define "_build_id_links none" \
    --define "__os_install_post %{nil}" \
    "packaging/rpm/$pkg.spec" >/dev/null 2> >(grep -v "use Alien\|RPM should not be used directly\|^Building" >&2 || true)
  rm -f "$out/$pkg-$version-1.x86_64.rpm"
  mv "$work/RPMS/x86_64/$pkg-$version-1.x86_64.rpm" "$out/"
done

if [ -n "$sign_key" ]; then
  echo "== signing with GPG key $sign_key" >&2
  command -v gpg >/dev/null || { echo "build-rpms.sh: gpg is missing (Debian package gnupg)" >&2; exit 1; }
  # rpm's default is gpg2, which Debian does not have under that name.
  rpmsign --addsign --define "_gpg_name $sign_key" --define "__gpg $(command -v gpg)" \
    "$out/dbvm-agent-$version-1.x86_64.rpm" "$out/dbvm-broker-$version-1.x86_64.rpm" \
    2> >(grep -v "GPG_TTY" >&2 || true) >/dev/null
fi
for pkg in dbvm-agent dbvm-broker; do
  f="$out/$pkg-$version-1.x86_64.rpm"
  printf '%s  %s  %s\n' "$(du -h "$f" | cut -f1)" "$(sha256sum "$f" | cut -d' ' -f1)" "$f"
done
