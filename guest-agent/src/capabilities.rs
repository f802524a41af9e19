//! The agent's capabilities, made from its configuration in one place. A capability that
//! another needs (the firewall for the database, the database for health) is made first
//! and handed over here; nothing else wires capabilities together.
//!
//! Adding a capability: its module, its config section in [`crate::config::Config`], and
//! its line below.

use crate::capability::{Capability, Context};
use crate::config::Config;
use crate::db::manager::FirewallHook;
use crate::health::Check;
use std::sync::Arc;

/// Why the capabilities could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("firewall: {0}")]
    Firewall(#[from] crate::firewall::FirewallError),
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
}

/// Every capability the configuration asks for, in the order they were made: `system`
/// and `upgrade` always; `firewall` with `[firewall]`; `database` and `backup` with
/// `[database]`; `health` unless `health.enabled = false` (after those: it runs the checks
/// the others contribute); `bundle` always, last (its bundles gather every other
/// capability's parts).
pub fn build(config: &Config, ctx: &Context) -> Result<Vec<Arc<dyn Capability>>, BuildError> {
    let mut all: Vec<Arc<dyn Capability>> = vec![
        Arc::new(crate::system::System),
        Arc::new(crate::upgrade::Upgrade::new(
            ctx.state_dir.clone(),
            config.broker.ca_cert.clone(),
            ctx.lifecycle.clone(),
        )),
    ];

    let firewall = match &config.firewall {
        Some(cfg) => Some(Arc::new(crate::firewall::Firewall::new(cfg.clone())?)),
        None => None,
    };
    let hook = firewall.as_ref().map(|f| {
        Arc::new(crate::firewall::capability::AgentFirewall(f.clone())) as Arc<dyn FirewallHook>
    });
    let db = match &config.database {
        Some(settings) => Some(crate::db::DbManager::open(
            settings.clone(),
            &ctx.state_dir,
            hook,
        )?),
        None => None,
    };
    if let Some(firewall) = firewall {
        all.push(Arc::new(crate::firewall::capability::FirewallCapability {
            firewall,
            db: db.clone(),
        }));
    }
    if let Some(db) = &db {
        all.push(Arc::new(crate::db::ops::Database(db.clone())));
        let backups = crate::backup::BackupManager::new(
            db.clone(),
            config.backup.clone(),
            &ctx.agent_id,
            &ctx.state_dir,
        );
        backups.set_outbox(ctx.outbox.clone());
        all.push(Arc::new(crate::backup::capability::Backups(backups)));
    }

    if config.health.enabled {
        let contributed: Vec<Arc<dyn Check>> = all.iter().flat_map(|c| c.checks()).collect();
        let monitor =
            crate::health::Monitor::new(ctx, config.health.clone(), db.clone(), contributed);
        all.push(Arc::new(crate::health::capability::Health(monitor)));
    }
    // Last: its bundles gather the parts of every capability made before it.
    let bundles = crate::bundle::capability::Bundles::new(
        ctx,
        config.bundle.clone(),
        config.file.clone(),
        all.clone(),
    )
    .uploading_with(config.broker.ca_cert.clone());
    all.push(Arc::new(bundles));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::api::OperationClass;

    fn full_config(dir: &std::path::Path) -> Config {
        let text = format!(
            r#"agent_id = "db1"
state_dir = "{d}/state"
[broker]
address = "localhost:7443"
ca_cert = "{d}/ca.crt"
[database]
runtime = "process"
data_root = "{d}/db"
[firewall]
"#,
            d = dir.display()
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn every_operation_has_the_admission_class_the_broker_gives_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let config = full_config(dir.path());
        let ctx = Context::standalone("db1", dir.path().join("state"));
        let caps = build(&config, &ctx).unwrap();
        let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            ["system", "upgrade", "firewall", "database", "backup", "health", "bundle"]
        );
        let mut seen = std::collections::BTreeSet::new();
        for c in &caps {
            for op in c.operations() {
                assert!(seen.insert(op.name()), "{} offered twice", op.name());
                assert_eq!(
                    op.class(),
                    OperationClass::of(op.name()),
                    "{} (capability {}) declares {:?} but the broker counts it as {:?}",
                    op.name(),
                    c.name(),
                    op.class(),
                    OperationClass::of(op.name())
                );
            }
        }
        for op in ["ping", "facts", "health", "db.create", "firewall.apply"] {
            assert!(seen.contains(op), "{op} missing");
        }
        // Only the database capability names the database kind (none made yet here).
        assert!(caps.iter().all(|c| c.db_kind().is_none()));
    }

    #[test]
    fn a_bare_config_makes_system_health_and_bundle_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = full_config(dir.path());
        config.database = None;
        config.firewall = None;
        let ctx = Context::standalone("db1", dir.path().join("state"));
        let names: Vec<&str> = build(&config, &ctx)
            .unwrap()
            .iter()
            .map(|c| c.name())
            .collect();
        assert_eq!(names, ["system", "upgrade", "health", "bundle"]);
        config.health.enabled = false;
        let names: Vec<&str> = build(&config, &ctx)
            .unwrap()
            .iter()
            .map(|c| c.name())
            .collect();
        assert_eq!(names, ["system", "upgrade", "bundle"]);
    }
}
