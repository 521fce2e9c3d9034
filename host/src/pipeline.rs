//! The micro-batch loop: plan → fetch → plugins → sink → commit, once per trigger
//! interval, until stopped. It wires the other modules together and owns none of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow_array::RecordBatch;
use sluice_sdk::{record_schema, Context, OffsetRange};

use crate::chain::{Chain, Rejected};
use crate::checkpoint::{Checkpoint, CheckpointStore, CheckpointWriter, PlannedBatch, Position, SavedRange, TaskPlan, TaskState, WriteMode};
use crate::config::{Pipeline, PluginSource};
use crate::examples;
use crate::kafka::{KafkaSource, PREFETCH_ROWS};
use crate::metrics::Metrics;
use crate::plan;
use crate::recovery::{self, TASK};
use crate::source::{PartitionLag, Source, SourceError};
use crate::rate::{RateController, RateState};
use crate::runtime::Runtime;
use crate::swap::{self, Found, WatchedStep, Watcher};
use crate::sink::Sink;

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

/// Where the time of one batch went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchDurations {
    /// Planning: high watermarks, rate budgets, ranges (zero for a replayed batch).
    pub plan: Duration,
    /// Waiting for the batch's records.
    pub fetch: Duration,
    /// The plugin chain.
    pub plugins: Duration,
    /// Writing and committing the output and the dead letters.
    pub sink: Duration,
    /// Taking the plugins' state for the checkpoint (and the state copies a failure
    /// policy needs), and waiting for the previous checkpoint's write when it is still going:
    /// a checkpoint is written while the next batch runs.
    pub checkpoint: Duration,
    /// Committing the consumer group's offsets.
    pub commit: Duration,
}

/// One partition in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProgress {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// First offset of the batch (the position before it).
    pub from: i64,
    /// One past the last offset of the batch.
    pub until: i64,
    /// The newest high watermark known when the batch ended.
    pub high: i64,
}

/// What happened in one batch (like Spark's `StreamingQueryProgress`).
#[derive(Debug, Clone)]
pub struct BatchProgress {
    /// Batch id.
    pub batch_id: u64,
    /// When it was planned (its processing time), epoch ms.
    pub timestamp_ms: i64,
    /// Records read per second of wall time since the previous batch started (Spark's
    /// input rate); for the first batch of a run, per second of its own duration.
    pub input_per_sec: f64,
    /// Where the time went.
    pub durations: BatchDurations,
    /// Each plugin step (`name version`) and its time.
    pub step_times: Vec<(String, Duration)>,
    /// Per partition: the batch's range and the high watermark after it.
    pub partitions: Vec<PartitionProgress>,
    /// Records sent to the dead-letter sink.
    pub dead_letters: u64,
    /// Records read.
    pub records: u64,
    /// Rows written to the sink.
    pub output_rows: u64,
    /// Records rejected by plugins.
    pub rejected: Vec<Rejected>,
    /// Time from plan to commit.
    pub duration: Duration,
    /// Records per second of processing.
    pub processed_per_sec: f64,
    /// Records left on the brokers when this batch ended, all partitions.
    pub lag: u64,
    /// Watermark reported by the plugins.
    pub watermark_ms: Option<i64>,
    /// Time spent at the boundary before this batch swapping plugin versions (taking the
    /// running version's state and restoring it into the new one).
    pub swap_time: Duration,
    /// Plugin versions swapped in so far in this run that processed a batch.
    pub swaps: u64,
    /// Plugin versions rejected so far in this run: at preparation, at the swap, or in
    /// their first batch.
    pub swaps_failed: u64,
    /// The trigger interval the batch ran under.
    pub interval: Duration,
    /// One `name version` per failed plugin call the chain got over (retried, rolled back
    /// or sent to the dead letters).
    pub failures: Vec<String>,
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl BatchProgress {
    /// Where the batch's time went, in milliseconds: the record's `duration_ms`.
    pub fn durations_json(&self) -> serde_json::Value {
        let d = &self.durations;
        serde_json::json!({
            "total": ms(self.duration), "plan": ms(d.plan), "fetch": ms(d.fetch), "plugins": ms(d.plugins),
            "sink": ms(d.sink), "checkpoint": ms(d.checkpoint), "commit": ms(d.commit), "swap": ms(self.swap_time),
        })
    }

    /// The record as JSON, the form logged and served (times in milliseconds).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_id": self.batch_id,
            "timestamp_ms": self.timestamp_ms,
            "records": self.records,
            "input_rows_per_sec": self.input_per_sec.round(),
            "processed_rows_per_sec": self.processed_per_sec.round(),
            "output_rows": self.output_rows,
            "duration_ms": self.durations_json(),
            "interval_ms": ms(self.interval),
            "plugins": self.step_times.iter().map(|(step, t)| serde_json::json!({
                "plugin": step,
                "ms": ms(*t),
                "rejected": self.rejected.iter().filter(|r| crate::chain::step_parts(step) == (r.plugin.as_str(), r.version.as_str())).count(),
                "failures": self.failures.iter().filter(|f| *f == step).count(),
            })).collect::<Vec<_>>(),
            "watermark_ms": self.watermark_ms,
            "partitions": self.partitions.iter().map(|p| serde_json::json!({
                "topic": p.topic, "partition": p.partition, "from": p.from, "until": p.until, "high": p.high, "lag": (p.high - p.until).max(0),
            })).collect::<Vec<_>>(),
            "lag": self.lag,
            "rejected": self.rejected.len(),
            "dead_letters": self.dead_letters,
            "plugin_failures": self.failures.len(),
            "swaps": self.swaps,
            "swaps_failed": self.swaps_failed,
        })
    }
}

/// The progress records of the last batches, newest last.
#[derive(Debug)]
pub struct ProgressHistory {
    keep: usize,
    records: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
}

impl ProgressHistory {
    /// Keep the last `keep` records.
    pub fn new(keep: usize) -> Self {
        Self { keep: keep.max(1), records: Default::default() }
    }

    fn push(&self, record: serde_json::Value) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == self.keep {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The records kept, oldest first.
    pub fn recent(&self) -> Vec<serde_json::Value> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

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
pub fn build_chain(pipeline: &Pipeline, runtime: &Runtime) -> anyhow::Result<Chain> {
    load_chain(pipeline, runtime).map(|(chain, _)| chain)
}

/// [`build_chain`], and the steps from the plugin directory, to watch.
fn load_chain(pipeline: &Pipeline, runtime: &Runtime) -> anyhow::Result<(Chain, Vec<WatchedStep>)> {
    let mut stages = Vec::new();
    let mut watched = Vec::new();
    for (i, step) in pipeline.steps.iter().enumerate() {
        let instance: anyhow::Result<_> = match &step.source {
            PluginSource::Builtin(name) => examples::named(name)
                .map_err(anyhow::Error::msg)
                .and_then(|bytes| Ok(runtime.load(bytes, &format!("builtin:{name}"), step.limits)?.instantiate(&step.config)?)),
            PluginSource::File(path) => runtime.load_file(path, step.limits).map_err(anyhow::Error::from).and_then(|p| Ok(p.instantiate(&step.config)?)),
            PluginSource::Dir(name) => {
                let dir = pipeline.plugin_dir.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("plugin[{i}] names plugin `{name}`, which is `{name}.wasm` in the plugin directory, but none is set: add `pluginDir = \"plugins\"` to the pipeline file or pass --plugin-dir")
                })?;
                swap::read_plugin(dir, name, &step.config).map_err(|(_, reason)| anyhow::anyhow!(reason)).and_then(|files| {
                    watched.push(WatchedStep { step: i, name: name.clone(), inline_config: step.config.clone(), limits: step.limits, digest: files.digest });
                    swap::prepare(runtime, &files, step.limits).map_err(anyhow::Error::msg)
                })
            }
        };
        stages.push(instance.map_err(|e| anyhow::anyhow!("plugin[{i}]: {e}"))?);
    }
    let mut chain = Chain::new(stages)?;
    chain.set_policies(pipeline.steps.iter().map(|s| s.failure));
    Ok((chain, watched))
}

/// The wall clock, epoch milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// When to stop.
    pub until: Until,
    /// Resume from the checkpoint's offsets, but start the plugins with fresh state.
    pub ignore_state: bool,
    /// Live tuning: when the flag is set, the pipeline file is read again before the next
    /// batch and its rate settings applied; other changes need a restart.
    pub retune: Option<(Arc<AtomicBool>, PathBuf)>,
    /// Where the progress record of each batch is kept (besides the `sluice::progress` log
    /// event every batch emits).
    pub history: Option<Arc<ProgressHistory>>,
    /// Metrics to keep up to date after each batch (served on `/metrics`).
    pub metrics: Option<Arc<Metrics>>,
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
    pipeline: &Pipeline,
    runtime: &Runtime,
    options: impl Into<RunOptions>,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    let (mut chain, watched) = load_chain(pipeline, runtime)?;
    let watcher = match (&pipeline.plugin_dir, watched.is_empty()) {
        (Some(dir), false) => {
            tracing::info!("watching {} for new versions of {}", dir.display(), watched.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", "));
            Some(Watcher::start(runtime.clone(), dir.clone(), watched, swap::POLL))
        }
        _ => None,
    };
    run_watched(pipeline, &mut chain, watcher, options.into(), stop, sink, progress)
}

/// Whether a source error means "the brokers are away for now".
fn is_waiting_error(e: &SourceError) -> bool {
    match e {
        SourceError::FetchTimeout { .. } => true,
        SourceError::Kafka { error, .. } => crate::kafka::is_transient(error),
        _ => false,
    }
}

/// The least read-ahead, records, however small rate control makes the batches.
const MIN_READ_AHEAD: usize = 10_000;

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
    pub fn of_pipeline(pipeline: &'a Pipeline, sink: &'a mut dyn Sink) -> anyhow::Result<Self> {
        let checkpoints = pipeline.checkpoint.as_ref().map(CheckpointStore::open).transpose()?.map(Arc::new);
        let dead_letters = match &pipeline.dead_letter {
            Some(config) => Some(crate::sink::open(config, &pipeline.kafka).map_err(|e| anyhow::anyhow!("deadLetter: {e}"))?),
            None => None,
        };
        let connect: Connect<'a> =
            Box::new(move |resume| KafkaSource::connect(&pipeline.source, &pipeline.kafka, resume).map(|s| Box::new(s) as Box<dyn Source>));
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
    pipeline: &Pipeline,
    chain: &mut Chain,
    options: impl Into<RunOptions>,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    run_watched(pipeline, chain, None, options.into(), stop, sink, progress)
}

fn run_watched(
    pipeline: &Pipeline,
    chain: &mut Chain,
    watcher: Option<Watcher>,
    options: RunOptions,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    let io = Io::of_pipeline(pipeline, sink)?;
    run_io(pipeline, chain, watcher, io, options, stop, progress)
}

/// [`run_chain`] on the source and stores in `io`: they replace the pipeline's Kafka
/// connection, `sink`, `deadLetter` and `checkpoint` location; its name, topics, rate,
/// trigger and `maxOffsetsPerTrigger` settings still apply.
pub fn run_with(pipeline: &Pipeline, chain: &mut Chain, io: Io<'_>, options: impl Into<RunOptions>, stop: &AtomicBool, progress: &mut dyn FnMut(&BatchProgress)) -> anyhow::Result<RunSummary> {
    run_io(pipeline, chain, None, io, options.into(), stop, progress)
}

fn run_io(
    pipeline: &Pipeline,
    chain: &mut Chain,
    watcher: Option<Watcher>,
    io: Io<'_>,
    options: RunOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    let Io { connect, checkpoints, checkpoint_writes, sink, dead_letters } = io;
    let resume = recovery::recover(pipeline, checkpoints.as_deref(), chain, &*sink, options.ignore_state)?;
    let source = connect(resume.positions.as_ref())?;
    let mut rate = RateController::new(
        pipeline.backpressure.map(|b| (b.pid, b.initial_rate)),
        pipeline.source.partition_rates,
        pipeline.trigger_interval,
        pipeline.adaptive_interval,
    );
    if let Some(saved) = resume.rate_controller.clone() {
        match serde_json::from_value::<RateState>(saved) {
            Ok(state) => rate.restore(state),
            Err(e) => tracing::warn!("the checkpoint's rate-controller state cannot be read ({e}); the rate starts over"),
        }
    }
    let mut runner = Runner {
        history: options.history.clone(),
        metrics: options.metrics.clone(),
        last_start: None,
        dead_letters,
        watcher,
        swap_time: Duration::ZERO,
        retune: options.retune,
        running: pipeline.clone(),
        rate,
        chain,
        sink,
        source,
        writer: checkpoints.clone().map(|c| CheckpointWriter::new(c, checkpoint_writes)),
        checkpoints,
        watermark: resume.watermark_ms,
        summary: RunSummary::default(),
        fetch_timeout: pipeline.trigger_interval.max(Duration::from_secs(30)).min(options.stall_limit.unwrap_or(crate::source::STALL_LIMIT)),
        stall_limit: options.stall_limit.unwrap_or(crate::source::STALL_LIMIT),
    };
    for plan in &resume.replay {
        if stop.load(Ordering::SeqCst) {
            return runner.finish();
        }
        tracing::info!("replaying batch {} with its recorded offset ranges", plan.batch_id);
        let lag = runner.source.lag()?;
        runner.batch(plan, None, Duration::ZERO, &lag, stop, progress)?;
    }
    runner.run(options.until, resume.next_batch_id, stop, progress)
}

/// The loop's state.
struct Runner<'a> {
    history: Option<Arc<ProgressHistory>>,
    metrics: Option<Arc<Metrics>>,
    /// When the previous batch started.
    last_start: Option<Instant>,
    /// Where rejected records go.
    dead_letters: Option<Box<dyn Sink>>,
    watcher: Option<Watcher>,
    /// Time spent swapping plugins since the last batch.
    swap_time: Duration,
    retune: Option<(Arc<AtomicBool>, PathBuf)>,
    /// The settings in effect (changed by live tuning).
    running: Pipeline,
    rate: RateController,
    chain: &'a mut Chain,
    sink: &'a mut dyn Sink,
    source: Box<dyn Source>,
    checkpoints: Option<Arc<CheckpointStore>>,
    /// Commits the checkpoints while the next batch runs.
    writer: Option<CheckpointWriter>,
    watermark: Option<i64>,
    summary: RunSummary,
    fetch_timeout: Duration,
    stall_limit: Duration,
}

impl Runner<'_> {
    /// Plan and run batches from `batch_id` on, once per trigger interval, until `until`;
    /// then wait for the last checkpoint.
    fn run(mut self, until: Until, batch_id: u64, stop: &AtomicBool, progress: &mut dyn FnMut(&BatchProgress)) -> anyhow::Result<RunSummary> {
        self.run_batches(until, batch_id, stop, progress)?;
        self.finish()
    }

    /// Wait until the last checkpoint is written; the summary of the run.
    fn finish(mut self) -> anyhow::Result<RunSummary> {
        if let Some(writer) = &mut self.writer {
            writer.flush()?;
        }
        Ok(self.summary)
    }

    fn run_batches(&mut self, until: Until, mut batch_id: u64, stop: &AtomicBool, progress: &mut dyn FnMut(&BatchProgress)) -> anyhow::Result<()> {
        let targets: Option<Vec<PartitionLag>> = match until {
            Until::AvailableNow => Some(self.source.lag()?),
            Until::Stopped => None,
        };
        // When the current batch was due: a batch that starts later (because the one before
        // overran the interval) has a scheduling delay, which rate control counts.
        let mut due = Instant::now();
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Some((flag, path)) = &self.retune {
                if flag.swap(false, Ordering::SeqCst) {
                    let path = path.clone();
                    self.retune(&path);
                }
            }
            self.swap_plugins();
            let tick = Instant::now();
            let scheduling_delay = tick.saturating_duration_since(due);
            let lag = match self.source.lag() {
                Ok(lag) => lag,
                Err(e) if !stop.load(Ordering::SeqCst) => {
                    // The brokers are away: plan again once they answer.
                    tracing::warn!("cannot plan batch {batch_id}: {e}; trying again");
                    std::thread::sleep(self.rate.interval().min(Duration::from_secs(5)));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // Rate control caps each partition; records over the budget wait in Kafka.
            let budgets = self.rate.budgets(&plan::lags(&lag, targets.as_deref()));
            let max_records = self.running.source.max_offsets_per_trigger;
            // When batches are capped, read ahead about one more batch, not the backlog.
            let batch_cap = [budgets.as_ref().map(|b| b.iter().sum::<u64>()), max_records].into_iter().flatten().min();
            self.source.set_read_ahead(batch_cap.map_or(PREFETCH_ROWS, |cap| (2 * cap as usize).max(MIN_READ_AHEAD)));
            let ranges = plan::ranges(&lag, plan::Limits { targets: targets.as_deref(), budgets: budgets.as_deref(), max_records });
            let records = plan::offsets_in(&ranges);
            let caught_up = targets.is_some() && records == 0;
            // Without a checkpoint, the last batch of an available-now run flushes open
            // windows; with one, they stay in the checkpoint for the next run.
            let flush = caught_up && self.checkpoints.is_none();
            if records > 0 || flush {
                if self.sink.is_committed(batch_id) {
                    anyhow::bail!("the sink already holds committed output of batch {batch_id}, which this run is about to plan anew; the sink and the checkpoint were not used together");
                }
                let plan = PlannedBatch {
                    batch_id,
                    processing_time_ms: now_ms(),
                    tasks: vec![TaskPlan {
                        task: TASK,
                        ranges: ranges.iter().map(SavedRange::from).collect(),
                        watermark_ms: if flush { Some(i64::MAX) } else { self.watermark },
                    }],
                };
                self.batch(&plan, Some(scheduling_delay), tick.elapsed(), &lag, stop, progress)?;
                batch_id += 1;
            }
            if caught_up {
                return Ok(());
            }
            let interval = self.rate.interval();
            due = tick + interval;
            // Wait for the next trigger, waking early to stop.
            while tick.elapsed() < interval && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10).min(interval));
            }
        }
    }

    /// At a batch boundary: hand new plugin versions the watcher prepared to the chain.
    fn swap_plugins(&mut self) {
        let Some(watcher) = &self.watcher else { return };
        let started = Instant::now();
        let found = watcher.found();
        let any = !found.is_empty();
        for found in found {
            match found {
                Found::Ready { step, instance, file } => {
                    let new = format!("{} {}", instance.info().name, instance.info().version);
                    match self.chain.swap(step, Box::new(instance)) {
                        Ok(()) => tracing::info!("plugin step {step}: {new} from {} takes over from the next batch on", file.display()),
                        Err(e) => {
                            self.summary.swaps_failed += 1;
                            tracing::error!("plugin step {step}: {new} from {} is not swapped in, the running version stays: {e}", file.display());
                        }
                    }
                }
                Found::Rejected { step, file, reason } => {
                    self.summary.swaps_failed += 1;
                    tracing::error!("plugin step {step}: the new version in {} is not swapped in, the running version stays: {reason}", file.display());
                }
            }
        }
        if any {
            self.swap_time += started.elapsed();
        }
    }

    /// Read the pipeline file again and apply its rate settings (backpressure, partition
    /// rates, `maxOffsetsPerTrigger`, trigger interval and bounds) from the next batch on.
    /// A file that does not load keeps the current settings; other changes are reported
    /// as needing a restart.
    fn retune(&mut self, path: &std::path::Path) {
        let new = match Pipeline::load(path) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("not retuned, the current settings stay: {e}");
                return;
            }
        };
        let mut changed = self.rate.retune(new.backpressure.map(|b| (b.pid, b.initial_rate)), new.source.partition_rates, new.trigger_interval, new.adaptive_interval);
        if new.source.max_offsets_per_trigger != self.running.source.max_offsets_per_trigger {
            changed.push(format!("maxOffsetsPerTrigger {:?} -> {:?}", self.running.source.max_offsets_per_trigger, new.source.max_offsets_per_trigger));
        }
        // Everything else needs a restart: compare with the tunable parts made equal.
        let mut rest = new.clone();
        rest.backpressure = self.running.backpressure;
        rest.source.partition_rates = self.running.source.partition_rates;
        rest.source.max_offsets_per_trigger = self.running.source.max_offsets_per_trigger;
        rest.trigger_interval = self.running.trigger_interval;
        rest.adaptive_interval = self.running.adaptive_interval;
        // The plugin directory may come from the command line; plugins in it swap by themselves.
        rest.plugin_dir.clone_from(&self.running.plugin_dir);
        if rest != self.running {
            tracing::warn!("{}: changes other than rate settings (source topics, plugins, sink, checkpoint, [kafka]) take effect after a restart", path.display());
        }
        self.running.backpressure = new.backpressure;
        self.running.source.partition_rates = new.source.partition_rates;
        self.running.source.max_offsets_per_trigger = new.source.max_offsets_per_trigger;
        self.running.trigger_interval = new.trigger_interval;
        self.running.adaptive_interval = new.adaptive_interval;
        if changed.is_empty() {
            tracing::info!("retuned from {}: no rate setting changed", path.display());
        } else {
            tracing::info!("retuned from {}: {}", path.display(), changed.join("; "));
        }
    }

    /// Fetch a batch's ranges, waiting as long as the brokers are away (a warning at every
    /// fetch timeout), until stopped. When the brokers answer and report records beyond a
    /// range, but none arrive for the stall limit ([`RunOptions::stall_limit`]), the offsets the batch needs
    /// are not there to be read: the batch fails with what is missing and what to do,
    /// instead of waiting forever.
    fn fetch(&mut self, batch_id: u64, ranges: &[OffsetRange], stop: &AtomicBool) -> anyhow::Result<RecordBatch> {
        let started = Instant::now();
        loop {
            match self.source.fetch(ranges, self.fetch_timeout) {
                Err(e @ (SourceError::FetchTimeout { .. } | SourceError::Kafka { .. })) if is_waiting_error(&e) => {
                    if stop.load(Ordering::SeqCst) {
                        anyhow::bail!("stopped while batch {batch_id} waited for its records ({e}); it is not committed and runs again on restart");
                    }
                    let waited = started.elapsed();
                    if waited >= self.stall_limit {
                        if let Some(missing) = self.missing(&e, waited) {
                            return Err(anyhow::anyhow!("batch {batch_id} cannot be read: {missing}"));
                        }
                    }
                    tracing::warn!("batch {batch_id}: waiting for its records for {} s ({e})", waited.as_secs());
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return Ok(other?),
            }
        }
    }

    /// When the brokers answer and report a pending range's end as written, what is
    /// missing (the first such partition).
    fn missing(&mut self, timeout: &SourceError, waited: Duration) -> Option<SourceError> {
        let SourceError::FetchTimeout { pending, .. } = timeout else { return None };
        let lag = self.source.lag().ok()?;
        pending.iter().find_map(|p| {
            let high = lag.iter().find(|l| l.topic == p.topic && l.partition == p.partition)?.high;
            (high >= p.until).then(|| crate::source::missing_offsets(&p.topic, p.partition, p.reached, p.until, high, waited))
        })
    }

    /// Run one planned batch: offset log, fetch, plugins, sink, rate update, checkpoint and
    /// commit log, consumer-group offsets. `scheduling_delay` is how late a new batch
    /// started; `None` for a replayed one (already in the offset log, and not a lesson for
    /// rate control). `lag` is the state before it, for progress.
    fn batch(
        &mut self,
        plan: &PlannedBatch,
        scheduling_delay: Option<Duration>,
        planning: Duration,
        lag: &[PartitionLag],
        stop: &AtomicBool,
        progress: &mut dyn FnMut(&BatchProgress),
    ) -> anyhow::Result<()> {
        let tick = Instant::now();
        let interval = self.rate.interval();
        let since_last = self.last_start.replace(tick).map(|t| tick.duration_since(t));
        let task = plan.tasks.iter().find(|t| t.task == TASK).ok_or_else(|| anyhow::anyhow!("batch {} has no plan for task {TASK}", plan.batch_id))?;
        let ranges: Vec<OffsetRange> = task.ranges.iter().map(OffsetRange::from).collect();
        let offsets = plan::offsets_in(&ranges);
        if let (Some(c), Some(_)) = (&self.checkpoints, scheduling_delay) {
            c.plan(plan)?;
        }
        let batch = if offsets > 0 { self.fetch(plan.batch_id, &ranges, stop)? } else { RecordBatch::new_empty(record_schema()) };
        // Records read, not offsets planned: a range may hold fewer records than offsets.
        let records = batch.num_rows();
        let fetched = tick.elapsed();
        let ctx = Context { batch_id: plan.batch_id, offset_ranges: ranges.clone(), processing_time_ms: plan.processing_time_ms, watermark_ms: task.watermark_ms };
        let out = self.chain.process(batch, &ctx)?;
        let processed = tick.elapsed();
        self.summary.swaps += out.promoted.len() as u64;
        self.summary.swaps_failed += out.rolled_back.len() as u64;
        if self.sink.is_committed(plan.batch_id) {
            tracing::info!("batch {} is already committed in the sink; it was replayed to rebuild plugin state and is not written again", plan.batch_id);
        } else {
            self.sink.write(plan.batch_id, &out.batches)?;
            self.sink.commit(plan.batch_id)?;
        }
        // Dead letters are written under the batch's id too, before its checkpoint: a
        // replayed batch does not write them twice (exactly once in a file sink).
        let mut dead_letters = 0;
        if let Some(dead) = self.dead_letters.as_mut() {
            if !out.rejected.is_empty() && !dead.is_committed(plan.batch_id) {
                let letters = match self.running.dead_letter {
                    Some(crate::config::Sink::Kafka { .. }) => crate::chain::dead_letter_records(&out.rejected),
                    _ => crate::chain::dead_letter_rows(&out.rejected),
                };
                dead.write(plan.batch_id, &[letters]).map_err(|e| anyhow::anyhow!("dead letters: {e}"))?;
                dead.commit(plan.batch_id).map_err(|e| anyhow::anyhow!("dead letters: {e}"))?;
                dead_letters = out.rejected.len() as u64;
            }
        }
        let sunk = tick.elapsed();
        // Where each partition continues: in the checkpoint and in progress.
        let after = plan::positions_after(lag, &ranges);
        self.watermark = out.watermark_ms.or(self.watermark);
        if let Some(delay) = scheduling_delay {
            self.rate.after_batch(now_ms(), records as u64, tick.elapsed(), delay);
        }
        if let Some(writer) = &mut self.writer {
            let positions = after.iter().map(|((topic, partition), &next)| Position { topic: topic.clone(), partition: *partition, next }).collect();
            let plugins = self.chain.snapshot()?;
            writer.commit(Checkpoint {
                batch_id: plan.batch_id,
                created_ms: now_ms(),
                tasks: vec![TaskState { task: TASK, positions, plugins, watermark_ms: self.watermark }],
                rate_controller: Some(serde_json::to_value(self.rate.state()).expect("rate state serializes")),
            })?;
        }
        if self.checkpoints.is_none() && self.chain.needs_state_copies() {
            // What a failure policy rebuilds an instance from (a checkpoint does this too).
            self.chain.snapshot()?;
        }
        let checkpointed = tick.elapsed();
        if let Err(e) = self.source.commit(&ranges) {
            // Only lag tools read the group's offsets when there is a checkpoint; without one
            // a restart would read this batch again (at least once). The next batch's commit
            // covers this one.
            tracing::warn!("batch {}: committing the consumer group's offsets failed: {e}", plan.batch_id);
        }
        let output_rows: u64 = out.batches.iter().map(|b| b.num_rows() as u64).sum();
        let processing = tick.elapsed();
        // The whole batch, planning included (as Spark's trigger execution time): asking
        // a slow broker for its offsets makes a batch late as much as a slow fetch does.
        let duration = planning + processing;
        let partitions: Vec<PartitionProgress> = lag
            .iter()
            .map(|p| {
                let until = after[&(p.topic.clone(), p.partition)];
                let high = self.source.known_high(&p.topic, p.partition).unwrap_or(p.high).max(p.high);
                PartitionProgress { topic: p.topic.clone(), partition: p.partition, from: p.next.min(until), until, high }
            })
            .collect();
        let left = partitions.iter().map(|p| (p.high - p.until).max(0) as u64).sum();
        self.summary.batches += 1;
        self.summary.records += records as u64;
        self.summary.output_rows += output_rows;
        self.summary.rejected += out.rejected.len() as u64;
        let report = BatchProgress {
            batch_id: plan.batch_id,
            timestamp_ms: plan.processing_time_ms,
            input_per_sec: records as f64 / since_last.unwrap_or(duration).as_secs_f64().max(1e-9),
            durations: BatchDurations {
                plan: planning,
                fetch: fetched,
                plugins: processed - fetched,
                sink: sunk - processed,
                checkpoint: checkpointed - sunk,
                commit: processing - checkpointed,
            },
            step_times: out.step_times,
            partitions,
            dead_letters,
            records: records as u64,
            output_rows,
            rejected: out.rejected,
            duration,
            processed_per_sec: records as f64 / duration.as_secs_f64().max(1e-9),
            lag: left,
            watermark_ms: self.watermark,
            swap_time: std::mem::take(&mut self.swap_time),
            swaps: self.summary.swaps,
            swaps_failed: self.summary.swaps_failed,
            interval,
            failures: out.failures,
        };
        let json = report.to_json();
        tracing::info!(target: "sluice::progress", progress = %json);
        if let Some(history) = &self.history {
            history.push(json);
        }
        if let Some(metrics) = &self.metrics {
            metrics.record(&report);
        }
        progress(&report);
        Ok(())
    }
}
