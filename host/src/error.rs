//! What ends a run early, by kind. Each variant keeps its cause as the error's source;
//! `main` decides how to print the chain and which exit status it gets.

use crate::chain::{ChainError, RestoreError};
use crate::checkpoint::CheckpointError;
use crate::runtime::CallError;
use crate::sink::SinkError;
use crate::source::SourceError;

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A step of the pipeline file cannot be loaded, checked or configured.
    #[error("plugin[{step}]: {source}")]
    Step {
        /// Its position in the pipeline file.
        step: usize,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A step names a plugin of the plugin directory, and there is none.
    #[error("plugin[{step}] names plugin `{name}`, which is `{name}.wasm` in the plugin directory, but none is set: add `pluginDir = \"plugins\"` to the pipeline file or pass --plugin-dir")]
    NoPluginDir {
        /// Its position in the pipeline file.
        step: usize,
        /// The plugin's name.
        name: String,
    },
    /// The steps do not form a chain.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A plugin failed a batch past its failure policy (or its state could not be taken).
    #[error(transparent)]
    Plugin(#[from] CallError),
    /// The checkpoint's plugin state cannot be restored into the chain.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A batch's offsets are reported as written but never arrive.
    #[error("batch {batch_id} cannot be read: {source}")]
    Unreadable {
        /// The batch.
        batch_id: u64,
        /// What is missing.
        source: SourceError,
    },
    /// The sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The dead-letter sink failed.
    #[error("deadLetter: {0}")]
    DeadLetters(#[source] SinkError),
    /// The checkpoint location failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The sink, the checkpoint and the plans do not belong together.
    #[error("{0}")]
    Inconsistent(String),
    /// A stop came while a batch waited for its records.
    #[error("stopped while batch {batch_id} waited for its records ({waiting}); it is not committed and runs again on restart")]
    Stopped {
        /// The batch.
        batch_id: u64,
        /// What it waited for.
        waiting: String,
    },
}

impl RunError {
    /// Whether another process took the task over (its checkpoints or sink fenced this one).
    pub fn is_fenced(&self) -> bool {
        matches!(self, RunError::Checkpoint(CheckpointError::Fenced { .. }) | RunError::Sink(SinkError::Fenced { .. }) | RunError::DeadLetters(SinkError::Fenced { .. }))
    }
}
