//! The traits plugin authors implement, and the types they see.

use arrow_schema::SchemaRef;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Batch, Output};

/// What kind of plugin this is (see the WIT's `plugin-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Stateless, per batch.
    Transform,
    /// Stateful across batches; checkpointed by the host.
    Aggregate,
}

/// A half-open range of offsets `[from, until)` of one partition in this batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetRange {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// First offset in the batch.
    pub from: i64,
    /// One past the last offset in the batch.
    pub until: i64,
}

/// Everything about a batch that is not in its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Id of the micro-batch; a re-run batch keeps its id.
    pub batch_id: u64,
    /// Offsets covered by the batch, per partition.
    pub offset_ranges: Vec<OffsetRange>,
    /// Wall-clock time at which the host planned the batch, epoch milliseconds.
    pub processing_time_ms: i64,
    /// Lower bound for the event-time watermark imposed by the host; `i64::MAX` at the
    /// final flush.
    pub watermark_ms: Option<i64>,
}

impl Context {
    /// True for the final flush at end of input: every open window should be emitted.
    pub fn is_final(&self) -> bool {
        self.watermark_ms == Some(i64::MAX)
    }
}

/// Which call failed and why. The host reports the message with the plugin's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// The three kinds of whole-call failure (see the WIT's `plugin-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration is unusable.
    InvalidConfig,
    /// The batch as a whole cannot be processed.
    BatchFailed,
    /// Saved state cannot be read or migrated.
    IncompatibleState,
}

impl Error {
    /// The configuration is unusable; say which key and what is expected.
    pub fn config(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::InvalidConfig, message: message.into() }
    }

    /// The whole batch failed. Prefer [`Output::reject`] for problems with single records.
    pub fn batch(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::BatchFailed, message: message.into() }
    }

    /// Saved state cannot be read or migrated.
    pub fn incompatible_state(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::IncompatibleState, message: message.into() }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ErrorKind::InvalidConfig => "invalid config",
            ErrorKind::BatchFailed => "batch failed",
            ErrorKind::IncompatibleState => "incompatible state",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for Error {}

impl From<arrow_schema::ArrowError> for Error {
    fn from(e: arrow_schema::ArrowError) -> Self {
        Error::batch(e.to_string())
    }
}

/// A stateless plugin: every output row depends only on the batch it came in.
///
/// Export it with [`export_transform!`](crate::export_transform).
pub trait Transform: Sized + 'static {
    /// Configuration, deserialized from the pipeline's JSON. Use
    /// `#[serde(deny_unknown_fields)]` so that typos are reported.
    type Config: DeserializeOwned + Default;

    /// The output schema for `config`. Defaults to the record schema, which a transform
    /// that is not last in its chain must keep.
    fn output_schema(_config: &Self::Config) -> SchemaRef {
        crate::record_schema()
    }

    /// Build an instance from its configuration; check the configuration here.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// Process one batch, writing output rows and rejected records to `out`.
    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error>;
}

/// A stateful plugin whose state the host checkpoints with the offsets it belongs to.
///
/// Export it with [`export_aggregate!`](crate::export_aggregate).
pub trait Aggregate: Sized + 'static {
    /// Configuration, deserialized from the pipeline's JSON.
    type Config: DeserializeOwned + Default;

    /// Everything that must survive a restart. Serialized with `postcard`.
    type State: Serialize + DeserializeOwned;

    /// Version of the [`State`](Self::State) layout. Bump it when old bytes no longer
    /// deserialize, and teach [`migrate`](Self::migrate) to read the old layout.
    const STATE_VERSION: u32 = 1;

    /// The output schema for `config`.
    fn output_schema(config: &Self::Config) -> SchemaRef;

    /// Build an instance with fresh state from its configuration.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// Process one batch, emitting whatever became final (or changed, in update mode).
    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error>;

    /// The state to checkpoint.
    fn state(&self) -> &Self::State;

    /// Replace the state with a restored one.
    fn set_state(&mut self, state: Self::State);

    /// Read state written by another state version. The default refuses, and the host
    /// keeps running the plugin that wrote it (or stops with this message).
    fn migrate(from_version: u32, _bytes: &[u8]) -> Result<Self::State, Error> {
        Err(Error::incompatible_state(format!(
            "state was written with state version {from_version}, this plugin reads version {} \
             and has no migration from it; run the old plugin version, or restart with fresh state",
            Self::STATE_VERSION
        )))
    }
}

/// Configuration of a plugin that takes none: accepts only `{}` (or no config at all).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}
