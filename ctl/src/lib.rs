//! dbvmctl as a library: what a control plane needs to drive dbvm agents through a broker.
//!
//! - [`Home`]: the directory holding the fleet CA, certificates and the control plane's
//!   keys, and [`keys`] to create them;
//! - [`sign_command`] and [`parse_args`]: build and sign a command;
//! - [`Client`]: the broker's HTTPS API (submit, wait, agents, health, enrollment tokens, artifacts,
//!   events);
//! - [`send`]: a command end to end (seal secrets, sign, submit, wait, open the result),
//!   as `dbvmctl send` does it;
//! - [`health`]: an agent's health report, stored by the broker or run fresh;
//! - [`reveal()`] and [`redact`]: sealed values in results;
//! - [`backup`]: storage arguments and the backup listing for `dbvmctl backup`, `backups`,
//!   `restore` and `recover`;
//! - [`upgrade`]: a new agent binary uploaded to the broker and rolled out in waves of
//!   signed `agent.upgrade` commands, as `dbvmctl upgrade` does it;
//! - [`output`]: the human renderings `dbvmctl` prints.
//!
//! Wire types come from `dbvm-protocol`; nothing here defines an encoding.

pub mod args;
pub mod backup;
pub mod bundle;
pub mod client;
pub mod health;
pub mod home;
pub mod keys;
pub mod output;
pub mod reveal;
pub mod send;
pub mod sign;
pub mod sse;
pub mod upgrade;

pub use args::{parse_args, parse_secrets, read_secret_files, seal_secrets, ArgsError};
pub use client::{Client, ClientError, EventStream};
pub use home::{Home, HomeError, HomeFile};
pub use keys::{
    ca_init, ca_issue, keygen, CaInitOptions, CaInitOutput, CaIssueOutput, KeygenOutput, KeysError,
};
pub use reveal::{redact, reveal, RevealError};
pub use send::{SendError, Sender};
pub use sign::{sign_command, SignError};
pub use upgrade::{UpgradeArgs, UpgradeError};
