//! The plugin step of the data path: one batch through a chain of plugin instances
//! (transforms, then at most one aggregate), each called once per batch.

use std::time::Duration;

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
    /// Become a fresh instance of the same plugin and config (initial state), after a
    /// failure.
    fn rebuild(&mut self) -> Result<(), CallError> {
        Err(CallError::Plugin { plugin: self.name().to_string(), call: "rebuild", kind: sluice_sdk::ErrorKind::BatchFailed, message: "this step cannot be rebuilt".into() })
    }
}

/// What a step does when a batch fails in it (a trap, or an error for the whole batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Times the batch is tried again, each time with a fresh instance holding the state
    /// of the last checkpoint.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// What happens when the retries failed too.
    pub then: OnFailure,
}

impl FailurePolicy {
    /// Retries by default.
    pub const DEFAULT_RETRIES: u32 = 2;
    /// Backoff by default.
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    /// Stop at the first failure. Without retries no state copies are needed when
    /// checkpointing is off: the benchmarks use it so that they measure the plugins alone.
    pub const STOP_AT_ONCE: Self = Self { retries: 0, backoff: Duration::ZERO, then: OnFailure::Stop };
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self { retries: Self::DEFAULT_RETRIES, backoff: Self::DEFAULT_BACKOFF, then: OnFailure::Stop }
    }
}

/// The last resort of a [`FailurePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Stop the pipeline with the error (the batch is not committed; a restart retries it).
    #[default]
    Stop,
    /// Send every record of the batch to the dead-letter sink, with the error as the
    /// reason, and go on with the next batch.
    DeadLetter,
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
    fn rebuild(&mut self) -> Result<(), CallError> {
        *self = self.fresh()?;
        Ok(())
    }
}

/// A record one stage rejected, located by its source coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Name of the plugin that rejected it.
    pub plugin: String,
    /// That plugin's version.
    pub version: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The plugin's reason.
    pub reason: String,
    /// The record as the plugin got it (one row in the record schema).
    pub record: RecordBatch,
}

/// Headers a dead letter carries besides the record's own.
pub mod dead_letter_headers {
    /// Why the plugin rejected the record.
    pub const REASON: &str = "sluice.error.reason";
    /// The plugin's name.
    pub const PLUGIN: &str = "sluice.error.plugin";
    /// The plugin's version.
    pub const VERSION: &str = "sluice.error.plugin.version";
    /// Where the record came from: topic, partition, offset.
    pub const TOPIC: &str = "sluice.source.topic";
    /// See [`TOPIC`].
    pub const PARTITION: &str = "sluice.source.partition";
    /// See [`TOPIC`].
    pub const OFFSET: &str = "sluice.source.offset";
}

/// Rejected records as dead letters for a Kafka topic, in the record schema: each record's
/// key, value and headers as they were, plus the headers in [`dead_letter_headers`] (why,
/// which plugin and version, and the source coordinates, which the topic would otherwise
/// lose).
pub fn dead_letter_records(rejected: &[Rejected]) -> RecordBatch {
    records_of(rejected, true)
}

/// Rejected records as dead letters for files: the record's columns as they were
/// (`topic`, `partition`, `offset`, `timestamp`, `key`, `value`, `headers`), then `reason`,
/// `plugin` and `plugin_version`.
pub fn dead_letter_rows(rejected: &[Rejected]) -> RecordBatch {
    let records = records_of(rejected, false);
    let mut fields: Vec<arrow_schema::FieldRef> = records.schema().fields().iter().cloned().collect();
    let mut columns = records.columns().to_vec();
    for (name, value) in [
        ("reason", &(|r: &Rejected| r.reason.clone()) as &dyn Fn(&Rejected) -> String),
        ("plugin", &|r: &Rejected| r.plugin.clone()),
        ("plugin_version", &|r: &Rejected| r.version.clone()),
    ] {
        fields.push(std::sync::Arc::new(arrow_schema::Field::new(name, arrow_schema::DataType::Utf8, false)));
        columns.push(std::sync::Arc::new(arrow_array::StringArray::from_iter_values(rejected.iter().map(value))));
    }
    RecordBatch::try_new(std::sync::Arc::new(arrow_schema::Schema::new(fields)), columns).expect("columns match their fields")
}

fn records_of(rejected: &[Rejected], with_error_headers: bool) -> RecordBatch {
    let mut out = sluice_sdk::RecordsBuilder::default();
    for r in rejected {
        let batch = sluice_sdk::Batch::new(r.record.clone()).expect("a slice of a record-schema batch");
        let record = batch.records().next().expect("one row");
        let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
        let extra = [
            (dead_letter_headers::REASON, Some(r.reason.as_bytes())),
            (dead_letter_headers::PLUGIN, Some(r.plugin.as_bytes())),
            (dead_letter_headers::VERSION, Some(r.version.as_bytes())),
            (dead_letter_headers::TOPIC, Some(r.topic.as_bytes())),
            (dead_letter_headers::PARTITION, Some(partition.as_bytes())),
            (dead_letter_headers::OFFSET, Some(offset.as_bytes())),
        ];
        let extra = if with_error_headers { &extra[..] } else { &[] };
        out.append(
            sluice_sdk::RecordParts { topic: record.topic(), partition: record.partition(), offset: record.offset(), timestamp: record.timestamp(), key: record.key(), value: record.value() },
            record.headers().chain(extra.iter().copied()),
        );
    }
    out.finish()
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
    /// Newly swapped-in plugin versions that failed their first batch; the version before
    /// processed it instead and runs on.
    pub rolled_back: Vec<RolledBack>,
    /// Newly swapped-in plugin versions that processed their first batch and now run for
    /// good (`name version`).
    pub promoted: Vec<String>,
    /// Each step (`name version`) and the time it took, retries included.
    pub step_times: Vec<(String, std::time::Duration)>,
    /// One `name version` per failed plugin call that the chain got over: retried, rolled
    /// back to the version before, or sent to the dead letters.
    pub failures: Vec<String>,
}

/// A swapped-in version that failed its first batch.
#[derive(Debug, Clone)]
pub struct RolledBack {
    /// Step index.
    pub step: usize,
    /// The version that failed (`name version`).
    pub failed: String,
    /// The version that runs again.
    pub running: String,
    /// Why it failed.
    pub error: String,
}

/// Why a new plugin version cannot take over a step; the running one stays.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// There is no such step.
    #[error("the chain has no step {0}")]
    NoStep(usize),
    /// The new version breaks the chain's order rules.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// An aggregate's state would have no owner.
    #[error("step {step} runs aggregate {running}, whose window state only another version of {running} can take over, but the new plugin is {new}; to replace it by another plugin, restart with --ignore-state")]
    NotSamePlugin {
        /// Step index.
        step: usize,
        /// Running plugin.
        running: String,
        /// New plugin name.
        new: String,
    },
    /// The running version's state could not be taken.
    #[error("taking the state of the running {running}: {error}")]
    Snapshot {
        /// Running plugin and version.
        running: String,
        /// What failed.
        error: CallError,
    },
    /// The new version refused the running version's state.
    #[error("{new} refused the state of {running} (state version {state_version}): {error}; give the new version a migration from state version {state_version}, or restart with --ignore-state")]
    Restore {
        /// Running plugin and version.
        running: String,
        /// New plugin and version.
        new: String,
        /// The running version's state version.
        state_version: u32,
        /// What the new version said.
        error: CallError,
    },
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
    /// Per step, the version a swap replaced, kept until the new one has processed a batch.
    replaced: Vec<Option<Box<dyn Stage>>>,
    /// Per step, what to do when a batch fails in it.
    policies: Vec<FailurePolicy>,
    /// Per aggregate step, its state at the last snapshot and the state version it was
    /// written with: what a rebuilt instance starts from.
    saved: Vec<Option<(Vec<u8>, u32)>>,
}

fn shown(stage: &dyn Stage) -> String {
    format!("{} {}", stage.name(), stage.version())
}

/// A step as the chain reports it (`name version`, see [`ChainOutput::step_times`]) →
/// (`name`, `version`).
pub(crate) fn step_parts(shown: &str) -> (&str, &str) {
    shown.rsplit_once(' ').unwrap_or((shown, ""))
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
        let replaced = stages.iter().map(|_| None).collect();
        let (policies, saved) = (vec![FailurePolicy::default(); stages.len()], vec![None; stages.len()]);
        Ok(Self { stages, replaced, policies, saved })
    }

    /// A chain without plugins whose batches produce no output: what the broker and the
    /// source deliver on their own, for benchmarks.
    pub fn consume_only() -> Self {
        Self { stages: Vec::new(), replaced: Vec::new(), policies: Vec::new(), saved: Vec::new() }
    }

    /// The steps, in order.
    pub fn stages(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }

    /// Set what each step does when a batch fails in it (by position; missing ones keep
    /// the default).
    pub fn set_policies(&mut self, policies: impl IntoIterator<Item = FailurePolicy>) {
        for (slot, policy) in self.policies.iter_mut().zip(policies) {
            *slot = policy;
        }
    }

    /// Whether a failure policy needs the aggregates' state after every batch (to rebuild
    /// an instance from), which a checkpoint otherwise provides.
    pub fn needs_state_copies(&self) -> bool {
        self.stages.iter().zip(&self.policies).any(|(s, p)| s.kind() == PluginKind::Aggregate && (p.retries > 0 || p.then == OnFailure::DeadLetter))
    }

    /// The state of every step, for a checkpoint; stateless transforms have none. It is
    /// also what an instance rebuilt after a failure starts from.
    pub fn snapshot(&mut self) -> Result<Vec<SavedPlugin>, CallError> {
        let saved: Vec<SavedPlugin> = self
            .stages
            .iter_mut()
            .map(|s| {
                let state = if s.kind() == PluginKind::Aggregate { Some(s.snapshot()?) } else { None };
                Ok(SavedPlugin { identity: s.identity(), state })
            })
            .collect::<Result<_, CallError>>()?;
        for (slot, p) in self.saved.iter_mut().zip(&saved) {
            *slot = p.state.clone().map(|state| (state, p.identity.state_version));
        }
        Ok(saved)
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
        for (slot, p) in self.saved.iter_mut().zip(saved) {
            *slot = p.state.clone().map(|state| (state, p.identity.state_version));
        }
        Ok(())
    }

    /// Put `new` in place of step `index` from the next batch on. An aggregate's state
    /// passes from the running version to `new` (through `new`'s migration when the state
    /// versions differ). The running version is kept until `new` has processed a batch:
    /// should that fail, it takes over again and processes the batch itself. On an error
    /// nothing changes.
    pub fn swap(&mut self, index: usize, mut new: Box<dyn Stage>) -> Result<(), SwapError> {
        let last = self.stages.len().checked_sub(1).ok_or(SwapError::NoStep(index))?;
        if index > last {
            return Err(SwapError::NoStep(index));
        }
        if index < last && new.kind() == PluginKind::Aggregate {
            return Err(ChainError::AggregateNotLast(new.name().to_string()).into());
        }
        if index < last && !is_record_schema(new.output_schema()) {
            return Err(ChainError::NotRecordSchema(new.name().to_string()).into());
        }
        let running = &mut self.stages[index];
        if running.kind() == PluginKind::Aggregate {
            if new.kind() != PluginKind::Aggregate || new.name() != running.name() {
                return Err(SwapError::NotSamePlugin { step: index, running: running.name().to_string(), new: new.name().to_string() });
            }
            let state = running.snapshot().map_err(|error| SwapError::Snapshot { running: shown(running.as_ref()), error })?;
            let state_version = running.identity().state_version;
            new.restore(&state, state_version).map_err(|error| SwapError::Restore { running: shown(running.as_ref()), new: shown(new.as_ref()), state_version, error })?;
            self.saved[index] = Some((state, state_version));
        }
        let running = &mut self.stages[index];
        let before = std::mem::replace(running, new);
        // Two swaps before a batch: the proven version stays the one to fall back to.
        let slot = &mut self.replaced[index];
        if slot.is_none() {
            *slot = Some(before);
        }
        Ok(())
    }

    /// Run `batch` (record schema) through every stage.
    pub fn process(&mut self, batch: RecordBatch, ctx: &Context) -> Result<ChainOutput, CallError> {
        let mut out = ChainOutput::default();
        let source = batch.clone();
        let mut input = batch;
        let last = self.stages.len().saturating_sub(1);
        for i in 0..self.stages.len() {
            let started = std::time::Instant::now();
            let stage = &mut self.stages[i];
            let finished = match (stage.process(&input, ctx), self.replaced[i].take()) {
                (Ok(finished), Some(before)) => {
                    tracing::info!("plugin step {i}: {} processed its first batch and replaces {} for good", shown(stage.as_ref()), shown(before.as_ref()));
                    out.promoted.push(shown(stage.as_ref()));
                    finished
                }
                (Ok(finished), None) => finished,
                (Err(error), Some(before)) => {
                    let failed = std::mem::replace(stage, before);
                    let rolled = RolledBack { step: i, failed: shown(failed.as_ref()), running: shown(stage.as_ref()), error: error.to_string() };
                    tracing::error!("plugin step {i}: {} failed its first batch ({}); {} runs on and processes the batch", rolled.failed, rolled.error, rolled.running);
                    out.failures.push(rolled.failed.clone());
                    out.rolled_back.push(rolled);
                    stage.process(&input, ctx)?
                }
                (Err(error), None) => self.recover(i, &input, ctx, error, &mut out)?,
            };
            let stage = &self.stages[i];
            out.step_times.push((shown(stage.as_ref()), started.elapsed()));
            for e in finished.record_errors {
                out.rejected.push(locate(&input, e.row as usize, stage.as_ref(), e.reason));
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
        if last > 0 {
            // Later steps saw what transforms made of a record: dead letters carry the
            // record as it came from Kafka.
            originals(&source, &mut out.rejected);
        }
        Ok(out)
    }

    /// Step `i` failed on `input`: apply its [`FailurePolicy`].
    fn recover(&mut self, i: usize, input: &RecordBatch, ctx: &Context, error: CallError, out: &mut ChainOutput) -> Result<Finished, CallError> {
        let policy = self.policies[i];
        let name = shown(self.stages[i].as_ref());
        out.failures.push(name.clone());
        let mut error = error;
        for attempt in 1..=policy.retries {
            let wait = policy.backoff.saturating_mul(1 << (attempt - 1).min(16));
            tracing::warn!("plugin step {i}: {name} failed batch {} ({error}); retry {attempt} of {} in {} ms with a fresh instance", ctx.batch_id, policy.retries, wait.as_millis());
            std::thread::sleep(wait);
            match self.fresh(i).and_then(|()| self.stages[i].process(input, ctx)) {
                Ok(finished) => {
                    tracing::info!("plugin step {i}: {name} processed batch {} on retry {attempt}", ctx.batch_id);
                    return Ok(finished);
                }
                Err(e) => {
                    out.failures.push(name.clone());
                    error = e;
                }
            }
        }
        match policy.then {
            OnFailure::Stop => Err(error),
            OnFailure::DeadLetter => {
                let tries = policy.retries + 1;
                tracing::error!("plugin step {i}: {name} failed batch {} {tries} times ({error}); its {} records go to the dead letters", ctx.batch_id, input.num_rows());
                // The instance that goes on must not hold half of this batch.
                self.fresh(i)?;
                let reason = format!("the whole batch {} failed in {name} {tries} times: {error}", ctx.batch_id);
                for row in 0..input.num_rows() {
                    out.rejected.push(locate(input, row, self.stages[i].as_ref(), reason.clone()));
                }
                Ok(Finished::default())
            }
        }
    }

    /// Replace step `i` by a fresh instance holding its state at the last snapshot.
    fn fresh(&mut self, i: usize) -> Result<(), CallError> {
        let stage = &mut self.stages[i];
        stage.rebuild()?;
        if let Some((state, state_version)) = &self.saved[i] {
            stage.restore(state, *state_version)?;
        }
        Ok(())
    }
}

/// Replace each rejected record by the source record with the same coordinates.
fn originals(source: &RecordBatch, rejected: &mut [Rejected]) {
    if rejected.is_empty() {
        return;
    }
    let (topics, partitions, offsets) =
        (source.column(0).as_string::<i32>(), source.column(1).as_primitive::<Int32Type>(), source.column(2).as_primitive::<Int64Type>());
    let rows: std::collections::HashMap<(&str, i32, i64), usize> =
        (0..source.num_rows()).map(|i| ((topics.value(i), partitions.value(i), offsets.value(i)), i)).collect();
    for r in rejected {
        if let Some(&row) = rows.get(&(r.topic.as_str(), r.partition, r.offset)) {
            r.record = source.slice(row, 1);
        }
    }
}

fn locate(batch: &RecordBatch, row: usize, stage: &dyn Stage, reason: String) -> Rejected {
    Rejected {
        plugin: stage.name().to_string(),
        version: stage.version().to_string(),
        topic: batch.column(0).as_string::<i32>().value(row).to_string(),
        partition: batch.column(1).as_primitive::<Int32Type>().value(row),
        offset: batch.column(2).as_primitive::<Int64Type>().value(row),
        reason,
        record: batch.slice(row, 1),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array};
    use arrow_schema::{DataType, Field, Schema};
    use sluice_sdk::{RecordParts, RecordsBuilder};

    use super::*;

    /// An aggregate that counts records; its state is the count. `fail_first` makes its
    /// first `process` call fail.
    struct Counter {
        name: &'static str,
        version: &'static str,
        state_version: u32,
        count: i64,
        fail_first: bool,
        /// Calls to `process` that fail, shared by the instance and its rebuilds.
        failures: Arc<std::sync::atomic::AtomicU32>,
        schema: SchemaRef,
    }

    fn failed(message: &str) -> CallError {
        CallError::Plugin { plugin: "count".into(), call: "process", kind: sluice_sdk::ErrorKind::BatchFailed, message: message.into() }
    }

    fn counter(name: &'static str, version: &'static str, state_version: u32) -> Box<Counter> {
        let schema = Arc::new(Schema::new(vec![Field::new("count", DataType::Int64, false)]));
        Box::new(Counter { name, version, state_version, count: 0, fail_first: false, failures: Default::default(), schema })
    }

    impl Stage for Counter {
        fn name(&self) -> &str {
            self.name
        }
        fn version(&self) -> &str {
            self.version
        }
        fn kind(&self) -> PluginKind {
            PluginKind::Aggregate
        }
        fn output_schema(&self) -> &SchemaRef {
            &self.schema
        }
        fn process(&mut self, batch: &RecordBatch, _ctx: &Context) -> Result<Finished, CallError> {
            if std::mem::take(&mut self.fail_first) {
                return Err(failed("broken on purpose"));
            }
            let failing = self.failures.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if failing {
                // Half the batch counted, then a failure: a rebuilt instance must not keep it.
                self.count += batch.num_rows() as i64 / 2;
                return Err(failed("trapped on purpose"));
            }
            self.count += batch.num_rows() as i64;
            let column: ArrayRef = Arc::new(Int64Array::from(vec![self.count]));
            Ok(Finished { batches: vec![RecordBatch::try_new(self.schema.clone(), vec![column]).unwrap()], ..Finished::default() })
        }
        fn identity(&self) -> PluginIdentity {
            PluginIdentity { name: self.name.into(), version: self.version.into(), content_hash: self.version.into(), state_version: self.state_version }
        }
        fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
            Ok(self.count.to_le_bytes().to_vec())
        }
        fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
            if state_version != self.state_version {
                return Err(failed(&format!("cannot read state version {state_version}")));
            }
            self.count = i64::from_le_bytes(state.try_into().unwrap());
            Ok(())
        }
        fn rebuild(&mut self) -> Result<(), CallError> {
            self.count = 0;
            Ok(())
        }
    }

    fn policy(retries: u32, then: OnFailure) -> FailurePolicy {
        FailurePolicy { retries, backoff: Duration::from_millis(1), then }
    }

    /// A chain of one counter that fails its next `failures` batches, after a first batch
    /// of 3 records and a checkpoint.
    fn failing_after_a_checkpoint(failures: u32, policy: FailurePolicy) -> Chain {
        let c = counter("count", "1", 1);
        let shared = c.failures.clone();
        let mut chain = Chain::of_stages(vec![c]).unwrap();
        chain.set_policies([policy]);
        chain.process(records(3), &Context::default()).unwrap();
        chain.snapshot().unwrap();
        shared.store(failures, std::sync::atomic::Ordering::SeqCst);
        chain
    }

    #[test]
    fn a_failed_batch_is_retried_on_a_fresh_instance_holding_the_checkpointed_state() {
        let mut chain = failing_after_a_checkpoint(2, policy(2, OnFailure::Stop));
        let out = chain.process(records(4), &Context::default()).unwrap();
        assert_eq!(count(&out), 7, "3 before, 4 now, nothing of the failed attempts");
        assert!(out.rejected.is_empty());
        assert_eq!(out.failures, vec!["count 1".to_string(); 2], "both failed calls are counted");
    }

    #[test]
    fn when_the_retries_fail_too_the_run_stops_or_the_batch_goes_to_the_dead_letters() {
        let mut chain = failing_after_a_checkpoint(3, policy(2, OnFailure::Stop));
        let e = chain.process(records(4), &Context::default()).unwrap_err();
        assert!(e.to_string().contains("trapped on purpose"), "{e}");

        let mut chain = failing_after_a_checkpoint(3, policy(2, OnFailure::DeadLetter));
        let out = chain.process(records(4), &Context::default()).unwrap();
        assert!(out.batches.is_empty());
        assert_eq!(out.rejected.len(), 4);
        assert_eq!(out.failures.len(), 3);
        assert!(out.rejected[0].reason.contains("failed in count 1 3 times") && out.rejected[0].reason.contains("trapped on purpose"), "{}", out.rejected[0].reason);
        let out = chain.process(records(2), &Context::default()).unwrap();
        assert_eq!(count(&out), 5, "the next batch goes on from the checkpointed state");
    }

    fn records(n: i64) -> RecordBatch {
        let mut b = RecordsBuilder::default();
        for offset in 0..n {
            b.append(RecordParts { topic: "t", partition: 0, offset, timestamp: None, key: None, value: Some(b"{}") }, []);
        }
        b.finish()
    }

    fn count(out: &ChainOutput) -> i64 {
        out.batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    #[test]
    fn a_swapped_in_version_takes_over_the_state_and_is_kept_after_its_first_batch() {
        let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
        assert_eq!(count(&chain.process(records(3), &Context::default()).unwrap()), 3);
        chain.swap(0, counter("count", "2", 1)).unwrap();
        let out = chain.process(records(2), &Context::default()).unwrap();
        assert_eq!((count(&out), out.promoted.clone()), (5, vec!["count 2".to_string()]));
        assert_eq!(chain.stages().next().unwrap().version(), "2");
        let out = chain.process(records(1), &Context::default()).unwrap();
        assert!(out.promoted.is_empty() && out.rolled_back.is_empty());
    }

    #[test]
    fn a_version_that_fails_its_first_batch_gives_way_to_the_one_before_which_processes_it() {
        let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
        chain.process(records(3), &Context::default()).unwrap();
        let mut broken = counter("count", "2", 1);
        broken.fail_first = true;
        chain.swap(0, broken).unwrap();
        let out = chain.process(records(2), &Context::default()).unwrap();
        assert_eq!(count(&out), 5, "the batch was processed once, by version 1");
        assert_eq!(out.rolled_back.len(), 1);
        assert_eq!(out.failures, vec!["count 2".to_string()]);
        assert_eq!((out.rolled_back[0].failed.as_str(), out.rolled_back[0].running.as_str()), ("count 2", "count 1"));
        assert!(out.rolled_back[0].error.contains("broken on purpose"));
        assert_eq!(chain.stages().next().unwrap().version(), "1");
    }

    #[test]
    fn a_swap_that_would_lose_or_misread_state_is_refused_and_changes_nothing() {
        let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
        chain.process(records(3), &Context::default()).unwrap();
        let e = chain.swap(0, counter("other", "1", 1)).unwrap_err();
        assert!(e.to_string().contains("only another version of count can take over"), "{e}");
        let e = chain.swap(0, counter("count", "2", 2)).unwrap_err();
        assert!(e.to_string().contains("refused the state of count 1 (state version 1)") && e.to_string().contains("migration"), "{e}");
        assert!(matches!(chain.swap(1, counter("count", "2", 1)), Err(SwapError::NoStep(1))));
        let out = chain.process(records(1), &Context::default()).unwrap();
        assert_eq!((count(&out), chain.stages().next().unwrap().version()), (4, "1"));
    }

    #[test]
    fn an_aggregate_cannot_be_swapped_in_before_the_last_step() {
        let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
        chain.stages.insert(0, counter("first", "1", 1));
        chain.replaced.insert(0, None);
        chain.policies.insert(0, FailurePolicy::default());
        chain.saved.insert(0, None);
        let e = chain.swap(0, counter("first", "2", 1)).unwrap_err();
        assert!(matches!(e, SwapError::Chain(ChainError::AggregateNotLast(_))), "{e}");
    }
}
