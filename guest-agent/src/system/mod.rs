//! The capability every agent has: `ping` (proves the whole path, with progress and
//! sealed secrets both ways) and `facts` (what this VM is); its bundle parts are the
//! VM's system facts (`bundle`).

pub mod bundle;
pub mod facts;
pub mod ping;

use crate::capability::Capability;
use crate::dispatch::Operation;
use std::sync::Arc;

/// `ping` and `facts`.
#[derive(Debug, Default)]
pub struct System;

impl Capability for System {
    fn name(&self) -> &'static str {
        "system"
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        vec![Arc::new(ping::Ping), Arc::new(facts::Facts)]
    }

    fn bundle_parts(&self, request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        bundle::parts(request)
    }
}
