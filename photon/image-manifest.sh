#!/usr/bin/env bash
# The image manifest of a dbvm image: the agent's version, its sha256 and size, and an
# SBOM (CycloneDX 1.5 JSON) of the Rust crates baked into the binary, so that a
# vulnerability scan of the OVA sees them.
#
#   bash photon/image-manifest.sh BINARY OUT_DIR
#
# writes OUT_DIR/dbvm-agent.manifest.json and OUT_DIR/dbvm-agent.cdx.json, and prints the
# manifest. Where the crate list comes from:
# - a binary built with `cargo auditable build` (cargo-auditable 0.7: `cargo install
#   cargo-auditable --locked`, 49 s here) carries its exact dependency list in the ELF
#   section .dep-v0 (zlib-compressed JSON): that list is used, and nothing else is needed;
# - otherwise (scripts/build-rpms.sh builds with plain `cargo build` today) the list is
#   the resolved graph of `cargo metadata --locked --offline` for the musl target, walked
#   from dbvm-agent along normal dependencies, without proc-macros and build-only crates
#   (they run at compile time and are not in the binary). Cargo unifies features across
#   the workspace, so this can name a crate another member enabled that the agent does
#   not link: a superset, which is the safe side for a scan. It needs the repository
#   (this script's parent) and no network.
set -euo pipefail

die() {
  echo "image-manifest.sh: $*" >&2
  exit 1
}
[ $# -eq 2 ] || die "usage: bash photon/image-manifest.sh BINARY OUT_DIR"
bin=$1 out=$2
[ -x "$bin" ] || die "$bin is not an executable"
command -v jq >/dev/null || die "jq is missing: bash scripts/setup.sh installs it"
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

version=$("$bin" --version | awk '$1 == "dbvm-agent" {print $2}')
[ -n "$version" ] || die "$bin --version does not say 'dbvm-agent VERSION': not the agent?"
sha256=$(sha256sum "$bin" | cut -d' ' -f1)
size=$(stat -c %s "$bin")

# components.json: [{name, version, source, license}] of the crates in the binary.
if objcopy --dump-section .dep-v0="$work/dep-v0.z" "$bin" "$work/discard" 2>/dev/null && [ -s "$work/dep-v0.z" ]; then
  source_of_list="cargo-auditable (.dep-v0 section of the binary)"
  # Compress::Zlib is part of Debian's perl: no other tool needed.
  perl -MCompress::Zlib -0777 -ne 'print uncompress($_) // die "not zlib data\n"' \
    "$work/dep-v0.z" >"$work/dep-v0.json"
  jq '[.packages[] | select((.kind // "runtime") == "runtime" and (.root // false) == false)
       | {name, version, source, license: null}]' "$work/dep-v0.json" >"$work/components.json"
else
  source_of_list="cargo metadata --locked (resolved graph of dbvm-agent, x86_64-unknown-linux-musl)"
  (cd "$root" && cargo metadata --locked --offline --format-version 1 \
    --filter-platform x86_64-unknown-linux-musl) >"$work/metadata.json" ||
    die "cargo metadata failed in $root (is Cargo.lock current? fetch the crates once with cargo fetch)"
  jq '
    (.packages | map({key: .id, value: .}) | from_entries) as $pkg
    | (.resolve.nodes | map({key: .id, value: [.deps[]
        | select(any(.dep_kinds[]; .kind == null)) | .pkg]}) | from_entries) as $edges
    | ([.packages[] | select(.name == "dbvm-agent" and .source == null) | .id][0]) as $start
    | {seen: [$start], todo: [$start]}
    | until(.todo | length == 0;
        ((.todo | map($edges[.] // []) | add // []) | unique) as $next
        | ($next - .seen) as $new
        | .seen += $new | .todo = $new)
    | [.seen[] | $pkg[.]
       | select(.id != $start)
       | select(any(.targets[]; (.kind | index("proc-macro")) != null) | not)
       | {name, version,
          source: (if .source == null then "local" else (.source | sub("\\+.*"; "")) end),
          license}]
    | sort_by(.name, .version)' "$work/metadata.json" >"$work/components.json"
fi

count=$(jq length "$work/components.json")
[ "$count" -gt 0 ] || die "no dependency found for $bin"
jq --arg version "$version" --arg sha256 "$sha256" '{
    bomFormat: "CycloneDX",
    specVersion: "1.5",
    version: 1,
    metadata: {
      component: {type: "application", "bom-ref": "dbvm-agent", name: "dbvm-agent",
                  version: $version, hashes: [{alg: "SHA-256", content: $sha256}]}
    },
    components: [.[] | {
      type: "library",
      "bom-ref": "pkg:cargo/\(.name)@\(.version)",
      name, version,
      purl: "pkg:cargo/\(.name)@\(.version)"
    } + (if .license then {licenses: [{expression: .license}]} else {} end)]
  }' "$work/components.json" >"$out/dbvm-agent.cdx.json"
jq -n --arg version "$version" --arg sha256 "$sha256" --argjson size "$size" \
  --arg sbom_source "$source_of_list" --argjson dependencies "$count" '{
    agent: {name: "dbvm-agent", version: $version, sha256: $sha256, size_bytes: $size},
    sbom: {file: "dbvm-agent.cdx.json", format: "CycloneDX 1.5 JSON",
           source: $sbom_source, dependencies: $dependencies}
  }' | tee "$out/dbvm-agent.manifest.json"
