//! Log bundles on the agent: what a support engineer needs from a sick VM, in one
//! archive, without SSH.
//!
//! Every capability names its own parts ([`crate::capability::Capability::bundle_parts`]);
//! the format, the parts' types and the redaction are the `dbvm-bundle` crate's
//! (re-exported here: the broker makes its own bundle with them). `capability` is the
//! bundle capability: the `bundle.collect` operation and the agent's own parts (its
//! journal or log files, its redacted config, its version and config check); `upload`
//! streams a bundle to the broker while it is written.

pub mod capability;
pub mod upload;

pub use dbvm_bundle::*;
