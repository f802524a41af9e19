#!/bin/sh
# dbvm image seal: the last step of an image build, run by dbvm-seal.service at the first
# boot of the build VM. It bakes the database images into Docker's store and removes
# everything that boot made specific to this VM, then powers off (Packer waits for it).
#
# Why bake the images here rather than at each VM's first boot: a deployed VM then needs
# no registry and no extra minutes (the 2 s enrollment target), the images are checked
# once (their dbvm.* labels) by the builder instead of failing on a customer's VM, and the
# tarballs do not sit on every data store twice.
set -eu

say() { echo "dbvm-seal: $*"; }

for tar in /var/lib/dbvm/images/*.tar; do
  [ -e "$tar" ] || continue
  say "loading $tar"
  docker load -i "$tar"
  rm -f "$tar"
done
for tag in dbvm/postgres:15 dbvm/mariadb:10.11; do
  engine=$(docker image inspect --format '{{index .Config.Labels "dbvm.engine"}}' "$tag")
  [ -n "$engine" ] || { say "$tag has no dbvm.engine label: not an image build-image.sh made"; exit 1; }
done
rmdir /var/lib/dbvm/images 2>/dev/null || true

# The services that ran during this boot and what they wrote.
systemctl stop dbvm-agent.service telegraf.service docker.service docker.socket || true
# Docker's engine identity: 20.10 keeps a private key in /etc/docker/key.json, newer ones
# an engine id; each VM must make its own.
rm -f /etc/docker/key.json /var/lib/docker/engine-id
rm -rf /var/lib/docker/network/files
# The agent never got a config (agent_id is empty), but its state directory must be empty.
find /var/lib/dbvm-agent -mindepth 1 -delete
rm -f /etc/dbvm/enrollment.token /etc/dbvm/fleet-ca.crt
rm -f /var/lib/telegraf/*
# Host identity: machine id (empty: systemd makes one at the next boot and runs the
# first-boot units), SSH host keys (sshd-keygen makes them), DHCP leases, the random seed,
# logs and shell history.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
rm -rf /var/lib/systemd/network/* /var/lib/systemd/random-seed /var/log/journal/* /root/.bash_history
# Gone for good: this unit, this script and the marker.
systemctl --root=/ disable dbvm-seal.service || true
rm -f /etc/dbvm/seal-pending /usr/lib/systemd/system/dbvm-seal.service
rm -f "$0"
sync
say "sealed; powering off"
systemctl --no-block poweroff
