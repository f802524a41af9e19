//! Check 5, Max connections: client connections in use against the configured maximum.

use crate::health::{grade, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct MaxConnections;

#[async_trait]
impl Check for MaxConnections {
    fn id(&self) -> &'static str {
        "max_connections"
    }

    async fn run(&self, run: &Run) -> Finding {
        let db = run.db().await;
        let facts = match db.facts() {
            Ok(f) => f,
            Err(unknown) => return unknown,
        };
        let t = &run.settings().thresholds;
        let max = facts.info.max_connections as f64;
        // PostgreSQL keeps superuser_reserved_connections back from everyone else.
        let usable = (max - facts.reserved_connections as f64).max(1.0);
        let used = facts.info.connections as f64;
        let pct = 100.0 * used / usable;
        let status = grade(pct, t.connections_warning_pct, t.connections_critical_pct);
        let mut msg = format!("{used:.0} of {usable:.0} client connections in use ({pct:.0}%)");
        if facts.reserved_connections > 0 {
            msg.push_str(&format!(
                "; max_connections {max:.0} with {} reserved for superusers",
                facts.reserved_connections
            ));
        }
        if status > HealthStatus::Ok {
            msg.push_str(": find idle or leaked connections, add a pooler, or raise max_connections (db.set_parameters, needs a restart)");
        }
        Finding::new(status, msg).figures([
            ("connections", used),
            ("max_connections", max),
            ("usable_connections", usable),
            ("used_pct", pct),
        ])
    }
}
