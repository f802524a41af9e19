//! What dbvm's programs need from the host they run on, written once: logging set-up
//! ([`logging`]), shutdown signals ([`signals`]), systemd readiness notification
//! ([`notify`]) and durable file replacement ([`fs`]). The broker and the agent use all of
//! it; `dbvmctl` uses [`fs`].

#![forbid(unsafe_code)]

pub mod fs;
pub mod logging;
pub mod notify;
pub mod signals;
