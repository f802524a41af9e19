//! The operations this agent executes, one module each.

pub mod facts;
pub mod ping;
