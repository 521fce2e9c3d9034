//! The plugin step of the data path: one batch through a chain of plugin instances
//! (transforms, then at most one aggregate), each called once per batch.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sluice_sdk::{is_record_schema, record_schema, Context, Finished, PluginKind};

use crate::checkpoint::{PluginIdentity, SavedPlugin};
use crate::runtime::{CallError, PluginInstance};

/// One step of a chain: a WebAssembly plugin instance, or (in benchmarks) the same plugin
/// compiled natively.
pub trait Stage {
    /// Plugin name.
    fn name(&self) -> &str;
    /// Plugin version.
    fn version(&self) -> &str;
    /// Transform or aggregate.
    fn kind(&self) -> PluginKind;
    /// The schema of its output.
    fn output_schema(&self) -> &SchemaRef;
    /// Process one batch in the record schema.
    fn process(&mut self, batch: &RecordBatch, ctx: &Context) -> Result<Finished, CallError>;
    /// Who it is, for checkpoints.
    fn identity(&self) -> PluginIdentity;
    /// Its state, for a checkpoint.
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError>;
    /// Restore state written by a plugin whose state version was `state_version`.
    fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError>;
}

impl Stage for PluginInstance {
    fn name(&self) -> &str {
        &self.info().name
    }
    fn version(&self) -> &str {
        &self.info().version
    }
    fn kind(&self) -> PluginKind {
        self.info().kind
    }
    fn output_schema(&self) -> &SchemaRef {
        PluginInstance::output_schema(self)
    }
    fn process(&mut self, batch: &RecordBatch, ctx: &Context) -> Result<Finished, CallError> {
        PluginInstance::process(self, batch, ctx)
    }
    fn identity(&self) -> PluginIdentity {
        let info = self.info();
        PluginIdentity { name: info.name.clone(), version: info.version.clone(), content_hash: info.content_hash.clone(), state_version: info.state_version }
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        PluginInstance::snapshot(self)
    }
    fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
        PluginInstance::restore(self, state, state_version)
    }
}

/// A record one stage rejected, located by its source coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Name of the plugin that rejected it.
    pub plugin: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The plugin's reason.
    pub reason: String,
}

/// The result of one batch through the chain.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Output of the last stage.
    pub batches: Vec<RecordBatch>,
    /// Records rejected by any stage.
    pub rejected: Vec<Rejected>,
    /// Watermark reported by the last stage that reports one.
    pub watermark_ms: Option<i64>,
    /// Records dropped as late.
    pub late_records: u64,
}

/// Why a chain cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// An aggregate is followed by another plugin.
    #[error("plugin {0} is an aggregate and must be the last step of the chain")]
    AggregateNotLast(String),
    /// A transform whose output another plugin reads does not keep the record schema.
    #[error("plugin {0} is followed by another plugin, so its output must be the Kafka record schema")]
    NotRecordSchema(String),
    /// No plugins.
    #[error("a chain needs at least one plugin")]
    Empty,
}

/// Why saved state cannot be handed to the chain.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The chain has other steps than the checkpoint.
    #[error("the checkpoint holds state of the plugins [{saved}] but the pipeline has [{now}]; keep the steps, or run with --ignore-state to start them fresh at the checkpoint's offsets")]
    DifferentSteps {
        /// Names in the checkpoint.
        saved: String,
        /// Names now.
        now: String,
    },
    /// A plugin refused the state (an incompatible state version without a migration).
    #[error("{error}; the checkpoint's state was written by {name} {version} (state version {state_version}); install a version that can read it, or run with --ignore-state to start it fresh at the checkpoint's offsets")]
    Refused {
        /// Plugin that wrote the state.
        name: String,
        /// Its version.
        version: String,
        /// Its state version.
        state_version: u32,
        /// What the plugin said.
        error: CallError,
    },
}

/// Plugin instances run in order on every batch.
pub struct Chain {
    stages: Vec<Box<dyn Stage>>,
}

impl Chain {
    /// Check the order of `instances` and build the chain.
    pub fn new(instances: Vec<PluginInstance>) -> Result<Self, ChainError> {
        Self::of_stages(instances.into_iter().map(|i| Box::new(i) as Box<dyn Stage>).collect())
    }

    /// Check the order of `stages` and build the chain.
    pub fn of_stages(stages: Vec<Box<dyn Stage>>) -> Result<Self, ChainError> {
        if stages.is_empty() {
            return Err(ChainError::Empty);
        }
        for stage in &stages[..stages.len() - 1] {
            if stage.kind() == PluginKind::Aggregate {
                return Err(ChainError::AggregateNotLast(stage.name().to_string()));
            }
            if !is_record_schema(stage.output_schema()) {
                return Err(ChainError::NotRecordSchema(stage.name().to_string()));
            }
        }
        Ok(Self { stages })
    }

    /// A chain without plugins whose batches produce no output: what the broker and the
    /// source deliver on their own, for benchmarks.
    pub fn consume_only() -> Self {
        Self { stages: Vec::new() }
    }

    /// The steps, in order.
    pub fn stages(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }

    /// The state of every step, for a checkpoint; stateless transforms have none.
    pub fn snapshot(&mut self) -> Result<Vec<SavedPlugin>, CallError> {
        self.stages
            .iter_mut()
            .map(|s| {
                let state = if s.kind() == PluginKind::Aggregate { Some(s.snapshot()?) } else { None };
                Ok(SavedPlugin { identity: s.identity(), state })
            })
            .collect()
    }

    /// Hand each step the state a checkpoint saved for it. Steps are matched by position
    /// and name; a changed version with the same state version restores as-is, another
    /// state version goes to the plugin's migration.
    pub fn restore(&mut self, saved: &[SavedPlugin]) -> Result<(), RestoreError> {
        let names = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(", ");
        let same = saved.len() == self.stages.len() && saved.iter().zip(&self.stages).all(|(p, s)| p.identity.name == s.name());
        if !same {
            return Err(RestoreError::DifferentSteps {
                saved: names(&mut saved.iter().map(|p| p.identity.name.clone())),
                now: names(&mut self.stages.iter().map(|s| s.name().to_string())),
            });
        }
        for (p, stage) in saved.iter().zip(self.stages.iter_mut()) {
            let Some(state) = &p.state else { continue };
            let now = stage.identity();
            if now.content_hash != p.identity.content_hash {
                tracing::info!(
                    "plugin {}: restoring state written by version {} (state version {}) into version {} (state version {})",
                    now.name, p.identity.version, p.identity.state_version, now.version, now.state_version
                );
            }
            stage.restore(state, p.identity.state_version).map_err(|error| RestoreError::Refused {
                name: p.identity.name.clone(),
                version: p.identity.version.clone(),
                state_version: p.identity.state_version,
                error,
            })?;
        }
        Ok(())
    }

    /// Run `batch` (record schema) through every stage.
    pub fn process(&mut self, batch: RecordBatch, ctx: &Context) -> Result<ChainOutput, CallError> {
        let mut out = ChainOutput::default();
        let mut input = batch;
        let last = self.stages.len().saturating_sub(1);
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let finished = stage.process(&input, ctx)?;
            let name = stage.name();
            for e in finished.record_errors {
                out.rejected.push(locate(&input, e.row as usize, name, e.reason));
            }
            out.late_records += finished.late_records;
            if finished.watermark_ms.is_some() {
                out.watermark_ms = finished.watermark_ms;
            }
            if i == last {
                out.batches = finished.batches;
            } else {
                input = match finished.batches.len() {
                    0 => RecordBatch::new_empty(record_schema()),
                    1 => finished.batches.into_iter().next().expect("one batch"),
                    _ => arrow_select::concat::concat_batches(&record_schema(), &finished.batches)
                        .expect("batches checked against the record schema"),
                };
            }
        }
        Ok(out)
    }
}

fn locate(batch: &RecordBatch, row: usize, plugin: &str, reason: String) -> Rejected {
    Rejected {
        plugin: plugin.to_string(),
        topic: batch.column(0).as_string::<i32>().value(row).to_string(),
        partition: batch.column(1).as_primitive::<Int32Type>().value(row),
        offset: batch.column(2).as_primitive::<Int64Type>().value(row),
        reason,
    }
}
