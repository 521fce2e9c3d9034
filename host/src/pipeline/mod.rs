//! The micro-batch loop: plan → fetch → plugins → sink → commit, once per trigger
//! interval, until stopped. It wires the other modules together and owns none of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::chain::{Chain, Stage};
use crate::checkpoint::{CheckpointStore, CheckpointWriter, WriteMode};
use crate::config::{CheckedPipeline, Pipeline, PluginSource};
use crate::control::Control;
use crate::kafka::KafkaSource;
use crate::rate::RateState;
use crate::recovery;
use crate::runtime::Runtime;
use crate::sink::Sink;
use crate::source::{Source, SourceError};
use crate::swap::{self, WatchedStep, Watcher};

mod group;
mod runner;

pub use group::{run_group, run_group_with, GroupIo, Members, Role};

pub use crate::error::RunError;

use runner::{Held, Planned, Runner, Task};

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Until {
    /// Until stopped (SIGINT/SIGTERM): the batch in flight is finished first.
    #[default]
    Stopped,
    /// Until everything available at start has been processed (Spark's
    /// `Trigger.AvailableNow`); then open windows are flushed and the run ends.
    AvailableNow,
}

pub use crate::progress::{BatchDurations, BatchProgress, Observer, PartitionProgress, ProgressHistory};

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Batches run (with records, or the final flush).
    pub batches: u64,
    /// Records read.
    pub records: u64,
    /// Rows written.
    pub output_rows: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Plugin versions swapped in that processed a batch.
    pub swaps: u64,
    /// Plugin versions rejected (see [`BatchProgress::swaps_failed`]).
    pub swaps_failed: u64,
}

/// Load the pipeline's plugins and build the chain.
pub fn build_chain(pipeline: &CheckedPipeline, runtime: &Runtime) -> Result<Chain, RunError> {
    load_chain(pipeline, runtime).map(|(chain, _)| chain)
}

/// [`build_chain`], and the steps from the plugin directory, to watch.
fn load_chain(pipeline: &Pipeline, runtime: &Runtime) -> Result<(Chain, Vec<WatchedStep>), RunError> {
    load_steps(pipeline, runtime, 0..pipeline.steps.len(), None)
}

/// A chain of the pipeline's `steps` (a consumer group's repartition stages run a part of
/// them each), followed by `tail`, and the steps from the plugin directory among them.
fn load_steps(pipeline: &Pipeline, runtime: &Runtime, steps: std::ops::Range<usize>, tail: Option<Box<dyn Stage>>) -> Result<(Chain, Vec<WatchedStep>), RunError> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    let mut watched = Vec::new();
    for (i, step) in pipeline.steps.iter().enumerate().skip(steps.start).take(steps.len()) {
        type Failure = Box<dyn std::error::Error + Send + Sync + 'static>;
        let instance: Result<_, Failure> = match &step.source {
            PluginSource::Builtin(name) => runtime.load_builtin(name, step.limits).map_err(Failure::from).and_then(|p| Ok(p.instantiate(&step.config)?)),
            PluginSource::File(path) => runtime.load_file(path, step.limits).map_err(Failure::from).and_then(|p| Ok(p.instantiate(&step.config)?)),
            PluginSource::Dir(name) => {
                let dir = pipeline.plugin_dir.as_ref().ok_or_else(|| RunError::NoPluginDir { step: i, name: name.clone() })?;
                swap::read_plugin(dir, name, &step.config).map_err(|(_, reason)| Failure::from(reason)).and_then(|files| {
                    watched.push(WatchedStep { step: i, name: name.clone(), inline_config: step.config.clone(), limits: step.limits, digest: files.digest });
                    swap::prepare(runtime, &files, step.limits).map_err(Failure::from)
                })
            }
        };
        stages.push(Box::new(instance.map_err(|source| RunError::Step { step: i, source })?));
    }
    stages.extend(tail);
    let mut chain = Chain::of_stages(stages)?;
    chain.set_policies(pipeline.steps[steps].iter().map(|s| s.failure));
    Ok((chain, watched))
}

/// The wall clock, epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// When to stop.
    pub until: Until,
    /// Resume from the checkpoint's offsets, but start the plugins with fresh state.
    pub ignore_state: bool,
    /// Live tuning: when the control channel asks for a retune, this pipeline file is read
    /// again before the next batch and its rate settings applied; other changes need a
    /// restart.
    pub retune_from: Option<PathBuf>,
    /// What follows the run batch by batch besides the `sluice::progress` log event every
    /// batch emits: the history `/progress` serves, the metrics `/metrics` serves.
    pub observers: Vec<Arc<dyn Observer>>,
    /// How long a batch may wait for offsets the brokers report as written before it fails
    /// (default [`crate::source::STALL_LIMIT`]).
    pub stall_limit: Option<Duration>,
}

impl From<Until> for RunOptions {
    fn from(until: Until) -> Self {
        Self { until, ..Self::default() }
    }
}

/// Run `pipeline` until `options.until`, writing to `sink` and reporting each batch.
pub fn run(
    pipeline: &CheckedPipeline,
    runtime: &Runtime,
    options: impl Into<RunOptions>,
    control: &Control,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    let (mut chain, watched) = load_chain(pipeline, runtime)?;
    let watcher = watch(pipeline, runtime, watched, control);
    run_watched(pipeline, &mut chain, watcher, options.into(), control, sink, progress)
}

/// A watcher of the plugin directory for the steps that come from it, if any.
fn watch(pipeline: &Pipeline, runtime: &Runtime, watched: Vec<WatchedStep>, control: &Control) -> Option<Watcher> {
    match (&pipeline.plugin_dir, watched.is_empty()) {
        (Some(dir), false) => {
            tracing::info!("watching {} for new versions of {}", dir.display(), watched.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", "));
            Some(Watcher::start(runtime.clone(), dir.clone(), watched, swap::POLL, control.clone()))
        }
        _ => None,
    }
}

/// Connects the source at the positions recovery chose (`None`: a new run).
pub type Connect<'a> = Box<dyn FnOnce(Option<&BTreeMap<(String, i32), i64>>) -> Result<Box<dyn Source>, SourceError> + 'a>;

/// What a run reads from and writes to. [`run`] and [`run_chain`] build it from the
/// pipeline file (Kafka, the configured checkpoint location and dead-letter sink); tests
/// and the crash simulation build their own.
pub struct Io<'a> {
    /// The source, connected once recovery knows where to start.
    pub connect: Connect<'a>,
    /// Where checkpoints go, if checkpointing is on.
    pub checkpoints: Option<Arc<CheckpointStore>>,
    /// How checkpoints are written.
    pub checkpoint_writes: WriteMode,
    /// Where the output goes.
    pub sink: &'a mut dyn Sink,
    /// Where rejected records go, if anywhere.
    pub dead_letters: Option<Box<dyn Sink>>,
}

impl<'a> Io<'a> {
    /// Kafka, the checkpoint location and the dead-letter sink of `pipeline`, and `sink`.
    pub fn of_pipeline(pipeline: &'a CheckedPipeline, sink: &'a mut dyn Sink) -> Result<Self, RunError> {
        let checkpoints = pipeline.checkpoint.as_ref().map(CheckpointStore::open).transpose()?.map(Arc::new);
        let dead_letters = match &pipeline.dead_letter {
            Some(config) => Some(crate::sink::open(config, &pipeline.kafka).map_err(RunError::DeadLetters)?),
            None => None,
        };
        let connect: Connect<'a> = Box::new(move |resume| KafkaSource::connect(&pipeline.source, &pipeline.kafka, resume).map(|s| Box::new(s) as Box<dyn Source>));
        Ok(Self { connect, checkpoints, checkpoint_writes: WriteMode::Background, sink, dead_letters })
    }
}

/// [`run`] with a chain built by the caller (the pipeline's `steps` are not used).
///
/// With checkpointing on, the run first recovers: it restores plugin state and the
/// watermark from the newest usable checkpoint, continues from its offsets, and replays
/// batches that were planned after it with their recorded plans (a batch the sink already
/// committed is replayed for plugin state only, and not written again).
pub fn run_chain(
    pipeline: &CheckedPipeline,
    chain: &mut Chain,
    options: impl Into<RunOptions>,
    control: &Control,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    run_watched(pipeline, chain, None, options.into(), control, sink, progress)
}

fn run_watched(
    pipeline: &CheckedPipeline,
    chain: &mut Chain,
    watcher: Option<Watcher>,
    options: RunOptions,
    control: &Control,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    let io = Io::of_pipeline(pipeline, sink)?;
    run_io(pipeline, chain, watcher, io, options, control, progress)
}

/// [`run_chain`] on the source and stores in `io`: they replace the pipeline's Kafka
/// connection, `sink`, `deadLetter` and `checkpoint` location; its name, topics, rate,
/// trigger and `maxOffsetsPerTrigger` settings still apply.
pub fn run_with(
    pipeline: &CheckedPipeline,
    chain: &mut Chain,
    io: Io<'_>,
    options: impl Into<RunOptions>,
    control: &Control,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    run_io(pipeline, chain, None, io, options.into(), control, progress)
}

fn run_io(
    pipeline: &Pipeline,
    chain: &mut Chain,
    watcher: Option<Watcher>,
    io: Io<'_>,
    options: RunOptions,
    control: &Control,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    if pipeline.source.assignment == crate::config::Assignment::Group {
        return Err(RunError::Inconsistent("source.assignment = \"group\": run the pipeline with `pipeline::run_group`, which opens a sink view and checkpoints per task".into()));
    }
    let Io { connect, checkpoints, checkpoint_writes, sink, dead_letters } = io;
    chain.set_control(control.clone());
    let resume = recovery::recover(pipeline, checkpoints.as_deref(), chain, &*sink, options.ignore_state)?;
    let source = connect(resume.positions.as_ref())?;
    let mut runner = Runner::new(pipeline, &options, control, source, watcher);
    if let Some(saved) = resume.rate_controller.clone() {
        match serde_json::from_value::<RateState>(saved) {
            Ok(state) => runner.rate.restore(state),
            Err(e) => tracing::warn!("the checkpoint's rate-controller state cannot be read ({e}); the rate starts over"),
        }
    }
    let mut task = Task {
        name: None,
        chain: Held::Borrowed(chain),
        sink: Held::Borrowed(sink),
        dead_letters,
        writer: checkpoints.clone().map(|c| CheckpointWriter::new(c, checkpoint_writes)),
        checkpoints,
        watermark: resume.watermark_ms,
        counted: None,
    };
    for plan in &resume.replay {
        if control.is_stopped() {
            return runner.finish(&mut task);
        }
        tracing::info!("replaying batch {} with its recorded offset ranges", plan.batch_id);
        let lag = runner.source.lag()?;
        runner.batch(&mut task, plan, Planned::Replay, Duration::ZERO, &lag, progress)?;
    }
    runner.run(&mut task, options.until, resume.next_batch_id, progress)
}
