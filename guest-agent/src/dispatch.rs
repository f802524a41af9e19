//! The dispatcher: operations by name, each behind the [`Operation`] trait. The core
//! fills it from the capabilities' [`crate::capability::Capability::operations`]; it
//! names no operation itself.

use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::CommandBody;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Why an operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The arguments were refused before anything changed.
    #[error("bad arguments: {0}")]
    BadArguments(String),
    /// The operation ran and failed.
    #[error("{0}")]
    Failed(String),
}

/// A progress report from a running operation.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub id: Uuid,
    pub percent: u8,
    pub message: String,
}

/// What an operation gets besides its arguments.
#[derive(Clone)]
pub struct OpContext {
    pub command: CommandBody,
    pub sealing_key: Arc<SealingKey>,
    pub agent_id: String,
    progress: mpsc::UnboundedSender<ProgressUpdate>,
}

impl std::fmt::Debug for OpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpContext")
            .field("command", &self.command.id)
            .finish()
    }
}

impl OpContext {
    pub fn new(
        command: CommandBody,
        sealing_key: Arc<SealingKey>,
        agent_id: String,
        progress: mpsc::UnboundedSender<ProgressUpdate>,
    ) -> Self {
        Self {
            command,
            sealing_key,
            agent_id,
            progress,
        }
    }

    /// Reports progress (best effort: lost if the link is down).
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        let _ = self.progress.send(ProgressUpdate {
            id: self.command.id,
            percent: percent.min(100),
            message: message.into(),
        });
    }
}

#[async_trait]
pub trait Operation: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Its admission class: the broker counts it against this class's limit. It must be
    /// the class the broker derives from the name ([`OperationClass::of`]), which a test
    /// checks for every operation of a fully configured agent.
    fn class(&self) -> OperationClass;
    async fn run(
        &self,
        ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError>;
}

/// Operations by name.
#[derive(Default, Clone)]
pub struct Dispatcher {
    ops: BTreeMap<&'static str, Arc<dyn Operation>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ops.keys()).finish()
    }
}

impl Dispatcher {
    /// Adds an operation; a second one of the same name is a programming error, refused.
    pub fn register(&mut self, op: Arc<dyn Operation>) -> Result<(), String> {
        let name = op.name();
        if self.ops.insert(name, op).is_some() {
            return Err(format!("two capabilities offer the operation {name:?}"));
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Operation>> {
        self.ops.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.ops.keys().map(|s| s.to_string()).collect()
    }

    /// Every operation, for checks over all of them.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Operation>> {
        self.ops.values()
    }
}

/// Decodes JSON arguments into an operation's typed arguments, refusing unknown fields.
pub fn parse_args<T: serde::de::DeserializeOwned>(args: serde_json::Value) -> Result<T, OpError> {
    serde_json::from_value(args).map_err(|e| OpError::BadArguments(e.to_string()))
}
