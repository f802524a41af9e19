# The dbvm database VM image: Photon OS 5 installed on vSphere by Packer's vsphere-iso
# builder from the Photon ISO and photon/kickstart.json, exported as OVF, then turned into
# an OVA with the dbvm OVF properties (photon/make-ova.sh, photon/ovf-properties.xml).
#
#   cd photon && packer build -var-file=my.pkrvars.hcl .
#
# Why a post-processor adds the OVF properties: vsphere-iso (Packer 1.6.6, Debian 12's)
# has no block that declares vApp properties (its `vapp` block exists only on
# vsphere-clone, and only fills values of properties an imported OVF already declares),
# so the exported descriptor gets its ProductSection from ovf-properties.xml.
#
# Why no communicator: the image holds no login. The installer reboots into the new
# system once; dbvm-seal.service (from the kickstart) loads the database images, removes
# everything that boot made host-specific and powers the VM off; Packer waits for that
# power-off (shutdown_timeout) and exports.

locals {
  vm_name = "dbvm-photon5-${var.dbvm_version}"
}

source "vsphere-iso" "dbvm" {
  vcenter_server      = var.vcenter_server
  username            = var.vcenter_username
  password            = var.vcenter_password
  insecure_connection = var.vcenter_insecure
  datacenter          = var.vcenter_datacenter
  cluster             = var.vcenter_cluster
  datastore           = var.vcenter_datastore
  folder              = var.vcenter_folder

  vm_name       = local.vm_name
  guest_os_type = "vmwarePhoton64Guest"
  vm_version    = 17
  firmware      = "efi"
  CPUs          = var.cpus
  RAM           = var.memory_mb
  notes         = "dbvm database VM ${var.dbvm_version} (Photon OS 5): identity from OVF properties at first boot"

  # Two disks as DSM's database VMs have: the system disk (/dev/sda) and the database's
  # data disk (/dev/sdb, one ext4 filesystem, so the health checks can tell them apart).
  disk_controller_type = ["pvscsi"]
  storage {
    disk_size             = var.system_disk_mb
    disk_thin_provisioned = true
  }
  storage {
    disk_size             = var.data_disk_mb
    disk_thin_provisioned = true
  }

  # eth0 management (broker, vCenter), eth1 application (database clients): the order of
  # the adapters is the order of the interface names, which the firewall relies on.
  network_adapters {
    network      = var.network_management
    network_card = "vmxnet3"
  }
  network_adapters {
    network      = var.network_application
    network_card = "vmxnet3"
  }

  iso_paths = [var.photon_iso_path]
  # The second CD-ROM (/dev/sr1, label DBVM): the kickstart and everything it installs.
  # A CD rather than Packer's HTTP server: the installer reads it without network, and
  # the Photon installer refuses http:// kickstarts unless told the install is insecure.
  cd_label = "DBVM"
  cd_files = [
    "./kickstart.json",
    "./telegraf.conf",
    "./seal.sh",
    "./dbvm-seal.service",
    var.rpm_signing_key,
    "${var.rpm_dir}/dbvm-agent-${var.dbvm_version}-1.x86_64.rpm",
    "${var.image_dir}/postgres.tar",
    "${var.image_dir}/mariadb.tar",
  ]
  boot_wait = "5s"
  boot_command = [
    "<esc><wait>c<wait>",
    "linux /isolinux/vmlinuz root=/dev/ram0 loglevel=3 photon.media=cdrom ks=/dev/sr1:/kickstart.json",
    "<enter>",
    "initrd /isolinux/initrd.img",
    "<enter>",
    "boot",
    "<enter>",
  ]

  communicator     = "none"
  shutdown_timeout = "45m"
  remove_cdrom     = true

  export {
    output_directory = "${var.output_dir}/${local.vm_name}"
    force            = true
  }
}

build {
  sources = ["source.vsphere-iso.dbvm"]

  post-processor "shell-local" {
    inline = [
      "bash ./make-ova.sh '${var.output_dir}/${local.vm_name}' ./ovf-properties.xml '${var.output_dir}/${local.vm_name}.ova'",
    ]
  }
}
