//! The operations this agent executes, one module each.

pub mod database;
pub mod facts;
pub mod firewall;
pub mod health;
pub mod ping;
