//! What dbvm's programs need from the host they run on, written once: logging set-up
//! ([`logging`]), shutdown signals ([`signals`]), systemd readiness notification
//! ([`notify`]), durable file replacement and early write-back ([`fs`]). The broker and
//! the agent use all of it; `dbvmctl` uses [`fs`].

#![forbid(unsafe_code)]

pub mod fs;
pub mod logging;
pub mod notify;
pub mod signals;

/// The version dbvm's programs report (`--version`, the agent's `Hello`, `facts`, logs):
/// `DBVM_BUILD_VERSION` when the build sets it (`scripts/build-rpms.sh --version V`
/// builds the binaries its packages hold with their package's version), else the
/// workspace's.
pub const VERSION: &str = match option_env!("DBVM_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
