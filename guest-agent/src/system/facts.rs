//! `facts`: what this VM is: host name, OS, kernel, CPUs, memory, disks, agent version.

use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use sysinfo::{Disks, System};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {}

pub struct Facts;

pub fn collect() -> serde_json::Value {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpus = sys.cpus();
    let cpu_model = cpus
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    let disks = Disks::new_with_refreshed_list();
    let disks: Vec<serde_json::Value> = disks
        .list()
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name().to_string_lossy(),
                "mount_point": d.mount_point().to_string_lossy(),
                "file_system": d.file_system().to_string_lossy(),
                "total_bytes": d.total_space(),
                "available_bytes": d.available_space(),
                "read_only": d.is_read_only(),
            })
        })
        .collect();
    serde_json::json!({
        "host_name": System::host_name(),
        "os": System::long_os_version(),
        "os_id": System::distribution_id(),
        "kernel": System::kernel_version(),
        "arch": System::cpu_arch(),
        "cpu_count": cpus.len(),
        "cpu_model": cpu_model,
        "memory_total_bytes": sys.total_memory(),
        "memory_available_bytes": sys.available_memory(),
        "swap_total_bytes": sys.total_swap(),
        "uptime_seconds": System::uptime(),
        "boot_time": System::boot_time(),
        "disks": disks,
        "agent_version": dbvm_host::VERSION,
    })
}

#[async_trait]
impl Operation for Facts {
    fn name(&self) -> &'static str {
        "facts"
    }

    fn class(&self) -> OperationClass {
        OperationClass::Query
    }

    async fn run(
        &self,
        _ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let _: Args = parse_args(args)?;
        tokio::task::spawn_blocking(collect)
            .await
            .map_err(|e| OpError::Failed(format!("collecting facts failed: {e}")))
    }
}
