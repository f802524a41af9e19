# Variables of the dbvm Photon OS 5 image build (dbvm-photon.pkr.hcl). Credentials have no
# default and are sensitive (Packer masks them in its output); pass them with
# PKR_VAR_vcenter_username / PKR_VAR_vcenter_password or a .pkrvars.hcl file kept out of
# the repository. See photon/README.md.

variable "vcenter_server" {
  type        = string
  description = "vCenter host name (no scheme)"
}

variable "vcenter_username" {
  type        = string
  sensitive   = true
  description = "vCenter user allowed to create, export and delete VMs"
}

variable "vcenter_password" {
  type        = string
  sensitive   = true
  description = "password of vcenter_username"
}

variable "vcenter_insecure" {
  type        = bool
  default     = false
  description = "skip vCenter certificate verification (lab vCenters with a self-signed certificate only)"
}

variable "vcenter_datacenter" {
  type = string
}

variable "vcenter_cluster" {
  type = string
}

variable "vcenter_datastore" {
  type = string
}

variable "vcenter_folder" {
  type    = string
  default = ""
}

variable "network_management" {
  type        = string
  description = "port group of the management network (eth0: the broker, vCenter)"
}

variable "network_application" {
  type        = string
  description = "port group of the application network (eth1: database clients, DHCP as in DSM 1.5)"
}

variable "photon_iso_path" {
  type        = string
  description = "the Photon OS 5 full ISO on a datastore, for example \"[iso] photon/photon-5.0-dde71ec57.x86_64.iso\""
}

variable "photon_iso_checksum" {
  type        = string
  default     = "none"
  description = "not used with iso_paths (a datastore ISO is not downloaded); kept for a switch to iso_url"
}

variable "dbvm_version" {
  type        = string
  description = "the dbvm-agent RPM's version (the workspace's); names the VM and the OVA"
}

variable "rpm_dir" {
  type        = string
  default     = "../target/rpm"
  description = "where scripts/build-rpms.sh put the signed RPMs (relative to photon/)"
}

variable "image_dir" {
  type        = string
  default     = "../target/images"
  description = "the database images as `docker save` tarballs (postgres.tar, mariadb.tar)"
}

variable "rpm_signing_key" {
  type        = string
  description = "the PUBLIC key (armored) that signed the RPMs, in a file named RPM-GPG-KEY-dbvm.asc: the kickstart imports it and refuses RPMs it did not sign"

  # cd_files puts files at the CD's root under their own names; the kickstart looks for
  # this one by name.
  validation {
    condition     = basename(var.rpm_signing_key) == "RPM-GPG-KEY-dbvm.asc"
    error_message = "The rpm_signing_key file must be named RPM-GPG-KEY-dbvm.asc (gpg --armor --export KEY > target/rpm/RPM-GPG-KEY-dbvm.asc)."
  }
}

variable "output_dir" {
  type    = string
  default = "../target/ova"
}

variable "system_disk_mb" {
  type    = number
  default = 16384
}

variable "data_disk_mb" {
  type        = number
  default     = 65536
  description = "the database's data disk (/var/lib/dbvm-data); a deployment may grow it"
}

variable "cpus" {
  type    = number
  default = 2
}

variable "memory_mb" {
  type    = number
  default = 4096
}
