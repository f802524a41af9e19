#!/usr/bin/env bash
# Turns the OVF directory Packer's vsphere-iso export wrote into dbvm's OVA: puts the
# ProductSection of ovf-properties.xml into the descriptor's VirtualSystem, makes VMware
# Tools the OVF environment's transport (guestinfo.ovfEnv, which the agent's first boot
# reads), rewrites the manifest (SHA256 of every file) and packs the OVA (a ustar archive
# whose first member is the descriptor, as the OVF specification requires).
#
#   bash photon/make-ova.sh OVF_DIR PROPERTIES_XML OUT.ova
#
# The post-processor of dbvm-photon.pkr.hcl runs it; tests/tests/photon.rs runs it on a
# descriptor shaped like vSphere's export.
set -euo pipefail

die() {
  echo "make-ova.sh: $*" >&2
  exit 1
}
[ $# -eq 3 ] || die "usage: bash photon/make-ova.sh OVF_DIR PROPERTIES_XML OUT.ova"
dir=$1 props=$2 out=$3
[ -d "$dir" ] || die "$dir is not a directory (the export's output_directory)"
[ -f "$props" ] || die "$props is missing"
mapfile -t ovfs < <(find "$dir" -maxdepth 1 -name '*.ovf' -printf '%f\n')
[ ${#ovfs[@]} -eq 1 ] || die "$dir holds ${#ovfs[@]} .ovf files; expected exactly one"
ovf=${ovfs[0]}
base=${ovf%.ovf}
grep -q '</\([A-Za-z]*:\)\?VirtualSystem>' "$dir/$ovf" || die "$dir/$ovf has no VirtualSystem element"
if grep -q 'dbvm.agent_id' "$dir/$ovf"; then
  die "$dir/$ovf already carries dbvm's properties (run on a fresh export)"
fi

# The fragment without its XML declaration, before the VirtualSystem's end tag; the
# transport attribute on the VirtualHardwareSection (its namespace prefix is the one the
# descriptor binds to the OVF envelope namespace, "ovf" in vSphere's exports).
PROPS=$(grep -v '^<?xml' "$props") perl -0pi -e '
  my $p = $ENV{PROPS};
  s{(</(?:\w+:)?VirtualSystem>)}{$p\n$1};
  s{<((?:\w+:)?VirtualHardwareSection)(?![^>]*transport=)}{<$1 ovf:transport="com.vmware.guestInfo"};
' "$dir/$ovf"

# The manifest, again: the descriptor changed, and SHA256 whatever the export used.
disks=()
while IFS= read -r f; do disks+=("$f"); done < <(find "$dir" -maxdepth 1 -type f ! -name '*.ovf' ! -name '*.mf' ! -name '*.ova' -printf '%f\n' | sort)
(
  cd "$dir"
  for f in "$ovf" "${disks[@]}"; do
    printf 'SHA256(%s)= %s\n' "$f" "$(sha256sum "$f" | cut -d' ' -f1)"
  done
) >"$dir/$base.mf"

mkdir -p "$(dirname "$out")"
tar --format=ustar -C "$dir" -cf "$out.tmp" "$ovf" "$base.mf" "${disks[@]}"
mv "$out.tmp" "$out"
echo "make-ova.sh: $out ($(du -h "$out" | cut -f1))" >&2
