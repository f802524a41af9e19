//! The twelve checks, one module each (data and system disk share `disk`).

pub mod binlog;
pub mod cloud_sync;
pub mod connectivity;
pub mod cpu;
pub mod db_service;
pub mod disk;
pub mod max_connections;
pub mod metrics;
pub mod ntp;
pub mod password;
pub mod telegraf;

use super::Check;
use std::sync::Arc;

/// All twelve, in [`dbvm_protocol::health::CHECKS`] order.
pub fn all() -> Vec<Arc<dyn Check>> {
    vec![
        Arc::new(connectivity::Connectivity),
        Arc::new(disk::Disk::new(disk::Which::Data)),
        Arc::new(disk::Disk::new(disk::Which::System)),
        Arc::new(cpu::Cpu::default()),
        Arc::new(max_connections::MaxConnections),
        Arc::new(metrics::Metrics),
        Arc::new(ntp::Ntp),
        Arc::new(telegraf::Telegraf),
        Arc::new(binlog::Binlog),
        Arc::new(cloud_sync::CloudSync),
        Arc::new(db_service::DbService),
        Arc::new(password::PasswordExpiry),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_twelve_are_in_order() {
        let ids: Vec<&str> = super::all().iter().map(|c| c.id()).collect();
        let want: Vec<&str> = dbvm_protocol::health::CHECKS
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, want);
    }
}
