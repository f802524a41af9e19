//! Operations that have not moved into their capability's module yet.

pub mod firewall;
