//! The plugin step of the data path: one batch through a chain of plugin instances
//! (transforms, then at most one aggregate), each called once per batch.

use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sluice_sdk::{is_record_schema, record_schema, Context, Finished, PluginKind};

pub use crate::config::{FailurePolicy, OnFailure};

use crate::checkpoint::{PluginIdentity, SavedPlugin};
use crate::control::Control;
use crate::runtime::{CallError, PluginInstance};

mod rejected;

pub use rejected::{dead_letter_records, dead_letter_rows, Rejected};
use rejected::{locate, originals};

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
    /// good.
    pub promoted: Vec<StepId>,
    /// Each step and the time it took, retries included.
    pub step_times: Vec<(StepId, Duration)>,
    /// One entry per failed plugin call that the chain got over: retried, rolled back to
    /// the version before, or sent to the dead letters.
    pub failures: Vec<StepId>,
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
    steps: Vec<Step>,
    /// The run's control channel: a stop ends a retry's backoff.
    control: Control,
}

/// One step of a chain and what the chain keeps about it.
struct Step {
    stage: Box<dyn Stage>,
    /// The version a swap replaced, kept until the new one has processed a batch.
    replaced: Option<Box<dyn Stage>>,
    /// What to do when a batch fails in it.
    policy: FailurePolicy,
    /// For an aggregate, its state at the last snapshot and the state version it was
    /// written with: what a rebuilt instance starts from.
    saved: Option<(Vec<u8>, u32)>,
}

impl Step {
    fn new(stage: Box<dyn Stage>) -> Self {
        Self { stage, replaced: None, policy: FailurePolicy::default(), saved: None }
    }
}

/// A plugin step as progress, metrics and logs name it: the plugin's name and version
/// (shown as `name version`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
}

impl StepId {
    /// `name` at `version`.
    pub fn new(name: &str, version: &str) -> Self {
        Self { name: name.to_string(), version: version.to_string() }
    }

    /// What `stage` runs.
    pub fn of(stage: &dyn Stage) -> Self {
        Self::new(stage.name(), stage.version())
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

fn shown(stage: &dyn Stage) -> String {
    StepId::of(stage).to_string()
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
        Ok(Self { steps: stages.into_iter().map(Step::new).collect(), control: Control::new() })
    }

    /// A chain without plugins whose batches produce no output: what the broker and the
    /// source deliver on their own, for benchmarks.
    pub fn consume_only() -> Self {
        Self { steps: Vec::new(), control: Control::new() }
    }

    /// The steps' stages, in order, taken out of the chain.
    pub fn into_stages(self) -> Vec<Box<dyn Stage>> {
        self.steps.into_iter().map(|s| s.stage).collect()
    }

    /// The steps, in order.
    pub fn stages(&self) -> impl Iterator<Item = &dyn Stage> {
        self.steps.iter().map(|s| s.stage.as_ref())
    }

    /// Set what each step does when a batch fails in it (by position; missing ones keep
    /// the default).
    pub fn set_policies(&mut self, policies: impl IntoIterator<Item = FailurePolicy>) {
        for (step, policy) in self.steps.iter_mut().zip(policies) {
            step.policy = policy;
        }
    }

    /// Listen to `control` for a stop while a failed batch waits to be retried.
    pub fn set_control(&mut self, control: Control) {
        self.control = control;
    }

    /// Whether a failure policy needs the aggregates' state after every batch (to rebuild
    /// an instance from), which a checkpoint otherwise provides.
    pub fn needs_state_copies(&self) -> bool {
        self.steps.iter().any(|s| s.stage.kind() == PluginKind::Aggregate && (s.policy.retries > 0 || s.policy.then == OnFailure::DeadLetter))
    }

    /// The state of every step, for a checkpoint; stateless transforms have none. It is
    /// also what an instance rebuilt after a failure starts from.
    pub fn snapshot(&mut self) -> Result<Vec<SavedPlugin>, CallError> {
        let mut saved = Vec::with_capacity(self.steps.len());
        for step in &mut self.steps {
            let s = &mut step.stage;
            let state = if s.kind() == PluginKind::Aggregate { Some(s.snapshot()?) } else { None };
            let identity = s.identity();
            step.saved = state.clone().map(|state| (state, identity.state_version));
            saved.push(SavedPlugin { identity, state });
        }
        Ok(saved)
    }

    /// Hand each step the state a checkpoint saved for it. Steps are matched by position
    /// and name; a changed version with the same state version restores as-is, another
    /// state version goes to the plugin's migration.
    pub fn restore(&mut self, saved: &[SavedPlugin]) -> Result<(), RestoreError> {
        let names = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(", ");
        let same = saved.len() == self.steps.len() && saved.iter().zip(&self.steps).all(|(p, s)| p.identity.name == s.stage.name());
        if !same {
            return Err(RestoreError::DifferentSteps {
                saved: names(&mut saved.iter().map(|p| p.identity.name.clone())),
                now: names(&mut self.steps.iter().map(|s| s.stage.name().to_string())),
            });
        }
        for (p, stage) in saved.iter().zip(self.steps.iter_mut().map(|s| &mut s.stage)) {
            let Some(state) = &p.state else { continue };
            let now = stage.identity();
            if now.content_hash != p.identity.content_hash {
                tracing::info!(
                    "plugin {}: restoring state written by version {} (state version {}) into version {} (state version {})",
                    now.name,
                    p.identity.version,
                    p.identity.state_version,
                    now.version,
                    now.state_version
                );
            }
            stage.restore(state, p.identity.state_version).map_err(|error| RestoreError::Refused {
                name: p.identity.name.clone(),
                version: p.identity.version.clone(),
                state_version: p.identity.state_version,
                error,
            })?;
        }
        for (step, p) in self.steps.iter_mut().zip(saved) {
            step.saved = p.state.clone().map(|state| (state, p.identity.state_version));
        }
        Ok(())
    }

    /// Put `new` in place of step `index` from the next batch on. An aggregate's state
    /// passes from the running version to `new` (through `new`'s migration when the state
    /// versions differ). The running version is kept until `new` has processed a batch:
    /// should that fail, it takes over again and processes the batch itself. On an error
    /// nothing changes.
    pub fn swap(&mut self, index: usize, mut new: Box<dyn Stage>) -> Result<(), SwapError> {
        let last = self.steps.len().checked_sub(1).ok_or(SwapError::NoStep(index))?;
        if index > last {
            return Err(SwapError::NoStep(index));
        }
        if index < last && new.kind() == PluginKind::Aggregate {
            return Err(ChainError::AggregateNotLast(new.name().to_string()).into());
        }
        if index < last && !is_record_schema(new.output_schema()) {
            return Err(ChainError::NotRecordSchema(new.name().to_string()).into());
        }
        let step = &mut self.steps[index];
        let running = &mut step.stage;
        if running.kind() == PluginKind::Aggregate {
            if new.kind() != PluginKind::Aggregate || new.name() != running.name() {
                return Err(SwapError::NotSamePlugin { step: index, running: running.name().to_string(), new: new.name().to_string() });
            }
            let state = running.snapshot().map_err(|error| SwapError::Snapshot { running: shown(running.as_ref()), error })?;
            let state_version = running.identity().state_version;
            new.restore(&state, state_version).map_err(|error| SwapError::Restore { running: shown(running.as_ref()), new: shown(new.as_ref()), state_version, error })?;
            step.saved = Some((state, state_version));
        }
        let before = std::mem::replace(&mut step.stage, new);
        // Two swaps before a batch: the proven version stays the one to fall back to.
        if step.replaced.is_none() {
            step.replaced = Some(before);
        }
        Ok(())
    }

    /// Run `batch` (record schema) through every stage.
    pub fn process(&mut self, batch: RecordBatch, ctx: &Context) -> Result<ChainOutput, CallError> {
        let mut out = ChainOutput::default();
        let source = batch.clone();
        let mut input = batch;
        let last = self.steps.len().saturating_sub(1);
        for i in 0..self.steps.len() {
            let started = std::time::Instant::now();
            let step = &mut self.steps[i];
            let stage = &mut step.stage;
            let finished = match (stage.process(&input, ctx), step.replaced.take()) {
                (Ok(finished), Some(before)) => {
                    tracing::info!("plugin step {i}: {} processed its first batch and replaces {} for good", shown(stage.as_ref()), shown(before.as_ref()));
                    out.promoted.push(StepId::of(stage.as_ref()));
                    finished
                }
                (Ok(finished), None) => finished,
                (Err(error), Some(before)) => {
                    let failed = std::mem::replace(stage, before);
                    let rolled = RolledBack { step: i, failed: shown(failed.as_ref()), running: shown(stage.as_ref()), error: error.to_string() };
                    tracing::error!("plugin step {i}: {} failed its first batch ({}); {} runs on and processes the batch", rolled.failed, rolled.error, rolled.running);
                    out.failures.push(StepId::of(failed.as_ref()));
                    out.rolled_back.push(rolled);
                    stage.process(&input, ctx)?
                }
                (Err(error), None) => self.recover(i, &input, ctx, error, &mut out)?,
            };
            let stage = &self.steps[i].stage;
            out.step_times.push((StepId::of(stage.as_ref()), started.elapsed()));
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
                    _ => arrow_select::concat::concat_batches(&record_schema(), &finished.batches).expect("batches checked against the record schema"),
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
        let policy = self.steps[i].policy;
        let id = StepId::of(self.steps[i].stage.as_ref());
        let name = id.to_string();
        out.failures.push(id.clone());
        let mut error = error;
        for attempt in 1..=policy.retries {
            let wait = policy.backoff.saturating_mul(1 << (attempt - 1).min(16));
            tracing::warn!(
                "plugin step {i}: {name} failed batch {} ({error}); retry {attempt} of {} in {} ms with a fresh instance",
                ctx.batch_id,
                policy.retries,
                wait.as_millis()
            );
            if self.control.sleep(wait) {
                return Err(CallError::Stopped { plugin: name, batch_id: ctx.batch_id, after: Box::new(error) });
            }
            match self.fresh(i).and_then(|()| self.steps[i].stage.process(input, ctx)) {
                Ok(finished) => {
                    tracing::info!("plugin step {i}: {name} processed batch {} on retry {attempt}", ctx.batch_id);
                    return Ok(finished);
                }
                Err(e) => {
                    out.failures.push(id.clone());
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
                    out.rejected.push(locate(input, row, self.steps[i].stage.as_ref(), reason.clone()));
                }
                Ok(Finished::default())
            }
        }
    }

    /// Replace step `i` by a fresh instance holding its state at the last snapshot.
    fn fresh(&mut self, i: usize) -> Result<(), CallError> {
        let step = &mut self.steps[i];
        step.stage.rebuild()?;
        if let Some((state, state_version)) = &step.saved {
            step.stage.restore(state, *state_version)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
