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
use crate::checkpoint::{self, Checkpoint, CheckpointStore, Metadata, PlannedBatch, Position, Recovered, SavedRange, TaskPlan, TaskState};
use crate::config::{Pipeline, PluginSource};
use crate::examples;
use crate::kafka::{KafkaSource, PartitionLag};
use crate::rate::{RateController, RateState};
use crate::runtime::Runtime;
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

/// What happened in one batch, for progress lines.
#[derive(Debug, Clone)]
pub struct BatchProgress {
    /// Batch id.
    pub batch_id: u64,
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
}

/// Load the pipeline's plugins and build the chain.
pub fn build_chain(pipeline: &Pipeline, runtime: &Runtime) -> anyhow::Result<Chain> {
    let mut stages = Vec::new();
    for (i, step) in pipeline.steps.iter().enumerate() {
        let loaded = match &step.source {
            PluginSource::Builtin(name) => {
                let bytes = examples::named(name).map_err(|e| anyhow::anyhow!("plugin[{i}]: {e}"))?;
                runtime.load(bytes, &format!("builtin:{name}"), step.limits)
            }
            PluginSource::File(path) => runtime.load_file(path, step.limits),
        }
        .map_err(|e| anyhow::anyhow!("plugin[{i}]: {e}"))?;
        stages.push(loaded.instantiate(&step.config).map_err(|e| anyhow::anyhow!("plugin[{i}]: {e}"))?);
    }
    Ok(Chain::new(stages)?)
}

fn now_ms() -> i64 {
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
    let mut chain = build_chain(pipeline, runtime)?;
    run_chain(pipeline, &mut chain, options, stop, sink, progress)
}

/// The one task over all partitions (see DESIGN.md: state is kept per task so that one
/// task per partition can be added later).
const TASK: u32 = 0;

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
    let options = options.into();
    let checkpoints = pipeline.checkpoint.as_ref().map(CheckpointStore::open).transpose()?;
    let recovered = match &checkpoints {
        Some(c) => c.recover()?,
        None => Recovered::default(),
    };
    for w in &recovered.warnings {
        tracing::warn!("{w}");
    }
    if let Some(c) = &checkpoints {
        match (&recovered.checkpoint, recovered.replay.len()) {
            (Some(ck), n) => tracing::info!("checkpoint {}: resuming after batch {}, {n} planned batches to replay", c.shown(), ck.batch_id),
            (None, 0) => tracing::debug!("checkpoint {}: no checkpoint yet, starting at the consumer group's committed offsets, else at source.startingOffsets", c.shown()),
            (None, n) => tracing::info!("checkpoint {}: no batch committed yet, {n} planned batches to replay", c.shown()),
        }
    }
    if let Some(m) = &recovered.metadata {
        if m.topics != pipeline.source.topics {
            tracing::warn!("the checkpoint was written for topics {:?}; the pipeline now reads {:?}", m.topics, pipeline.source.topics);
        }
    }
    let task = recovered.checkpoint.as_ref().and_then(|c| c.tasks.iter().find(|t| t.task == TASK));
    if let Some(task) = task {
        if options.ignore_state {
            tracing::warn!("--ignore-state: the plugins start with fresh state at the checkpoint's offsets");
        } else {
            chain.restore(&task.plugins)?;
        }
    }
    // Where each partition continues: after the checkpoint, or where the first replayed
    // batch starts when no checkpoint was committed yet.
    let resume: Option<BTreeMap<(String, i32), i64>> = match (task, recovered.replay.first()) {
        (Some(task), _) => Some(checkpoint::positions(task)),
        (None, Some(plan)) => Some(plan.tasks.iter().flat_map(|t| &t.ranges).map(|r| ((r.topic.clone(), r.partition), r.from)).collect()),
        (None, None) => None,
    };
    let source = KafkaSource::connect(&pipeline.source, &pipeline.kafka, resume.as_ref())?;
    let next_batch_id = match recovered.next_batch_id() {
        Some(id) => id,
        None => sink.last_batch_id()?.map_or(0, |last| last + 1),
    };
    if let Some(c) = &checkpoints {
        if recovered.metadata.is_none() {
            c.create(&Metadata {
                format_version: checkpoint::FORMAT_VERSION,
                pipeline: pipeline.name.clone(),
                topics: pipeline.source.topics.clone(),
                first_batch_id: next_batch_id,
            })?;
        }
        if let Some(last) = sink.last_batch_id()?.filter(|&last| last >= next_batch_id) {
            anyhow::bail!(
                "the sink already holds committed output of batch {last}, but checkpoint {} continues at batch {next_batch_id}: they were not used together. Point checkpoint.location at the checkpoint this output was written with, or write to a new sink location",
                c.shown()
            );
        }
    }
    let mut rate = RateController::new(
        pipeline.backpressure.map(|b| (b.pid, b.initial_rate)),
        pipeline.source.partition_rates,
        pipeline.trigger_interval,
        pipeline.adaptive_interval,
    );
    if let Some(saved) = recovered.checkpoint.as_ref().and_then(|c| c.rate_controller.clone()) {
        match serde_json::from_value::<RateState>(saved) {
            Ok(state) => rate.restore(state),
            Err(e) => tracing::warn!("the checkpoint's rate-controller state cannot be read ({e}); the rate starts over"),
        }
    }
    let mut runner = Runner {
        retune: options.retune,
        running: pipeline.clone(),
        rate,
        chain,
        sink,
        source,
        checkpoints,
        watermark: task.and_then(|t| t.watermark_ms),
        summary: RunSummary::default(),
        fetch_timeout: pipeline.trigger_interval.max(Duration::from_secs(30)),
    };
    for plan in &recovered.replay {
        if stop.load(Ordering::SeqCst) {
            return Ok(runner.summary);
        }
        tracing::info!("replaying batch {} with its recorded offset ranges", plan.batch_id);
        let lag = runner.source.lag()?;
        runner.batch(plan, None, &lag, progress)?;
    }
    runner.run(options.until, next_batch_id, stop, progress)
}

/// The loop's state.
struct Runner<'a> {
    retune: Option<(Arc<AtomicBool>, PathBuf)>,
    /// The settings in effect (changed by live tuning).
    running: Pipeline,
    rate: RateController,
    chain: &'a mut Chain,
    sink: &'a mut dyn Sink,
    source: KafkaSource,
    checkpoints: Option<CheckpointStore>,
    watermark: Option<i64>,
    summary: RunSummary,
    fetch_timeout: Duration,
}

impl Runner<'_> {
    /// Plan and run batches from `batch_id` on, once per trigger interval, until `until`.
    fn run(mut self, until: Until, mut batch_id: u64, stop: &AtomicBool, progress: &mut dyn FnMut(&BatchProgress)) -> anyhow::Result<RunSummary> {
        let targets: Option<Vec<PartitionLag>> = match until {
            Until::AvailableNow => Some(self.source.lag()?),
            Until::Stopped => None,
        };
        // When the current batch was due: a batch that starts later (because the one before
        // overran the interval) has a scheduling delay, which rate control counts.
        let mut due = Instant::now();
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(self.summary);
            }
            if let Some((flag, path)) = &self.retune {
                if flag.swap(false, Ordering::SeqCst) {
                    let path = path.clone();
                    self.retune(&path);
                }
            }
            let tick = Instant::now();
            let scheduling_delay = tick.saturating_duration_since(due);
            let mut lag = self.source.lag()?;
            if let Some(targets) = &targets {
                for (p, t) in lag.iter_mut().zip(targets) {
                    p.high = p.high.min(t.high);
                }
            }
            // Rate control caps each partition; records over the budget wait in Kafka.
            let mut capped = lag.clone();
            let lags: Vec<u64> = lag.iter().map(|p| (p.high - p.next).max(0) as u64).collect();
            if let Some(budgets) = self.rate.budgets(&lags) {
                for (p, budget) in capped.iter_mut().zip(budgets) {
                    p.high = p.high.min(p.next + budget as i64);
                }
            }
            let ranges: Vec<OffsetRange> = self.source.plan(&capped);
            let records: i64 = ranges.iter().map(|r| r.until - r.from).sum();
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
                self.batch(&plan, Some(scheduling_delay), &lag, progress)?;
                batch_id += 1;
            }
            if caught_up {
                return Ok(self.summary);
            }
            let interval = self.rate.interval();
            due = tick + interval;
            // Wait for the next trigger, waking early to stop.
            while tick.elapsed() < interval && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10).min(interval));
            }
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
            self.source.set_max_offsets_per_trigger(new.source.max_offsets_per_trigger);
        }
        // Everything else needs a restart: compare with the tunable parts made equal.
        let mut rest = new.clone();
        rest.backpressure = self.running.backpressure;
        rest.source.partition_rates = self.running.source.partition_rates;
        rest.source.max_offsets_per_trigger = self.running.source.max_offsets_per_trigger;
        rest.trigger_interval = self.running.trigger_interval;
        rest.adaptive_interval = self.running.adaptive_interval;
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

    /// Run one planned batch: offset log, fetch, plugins, sink, rate update, checkpoint and
    /// commit log, consumer-group offsets. `scheduling_delay` is how late a new batch
    /// started; `None` for a replayed one (already in the offset log, and not a lesson for
    /// rate control). `lag` is the state before it, for progress.
    fn batch(&mut self, plan: &PlannedBatch, scheduling_delay: Option<Duration>, lag: &[PartitionLag], progress: &mut dyn FnMut(&BatchProgress)) -> anyhow::Result<()> {
        let tick = Instant::now();
        let task = plan.tasks.iter().find(|t| t.task == TASK).ok_or_else(|| anyhow::anyhow!("batch {} has no plan for task {TASK}", plan.batch_id))?;
        let ranges: Vec<OffsetRange> = task.ranges.iter().map(OffsetRange::from).collect();
        let records: i64 = ranges.iter().map(|r| r.until - r.from).sum();
        if let (Some(c), Some(_)) = (&self.checkpoints, scheduling_delay) {
            c.plan(plan)?;
        }
        let batch = if records > 0 { self.source.fetch(&ranges, self.fetch_timeout)? } else { RecordBatch::new_empty(record_schema()) };
        let ctx = Context { batch_id: plan.batch_id, offset_ranges: ranges.clone(), processing_time_ms: plan.processing_time_ms, watermark_ms: task.watermark_ms };
        let out = self.chain.process(batch, &ctx)?;
        if self.sink.is_committed(plan.batch_id) {
            tracing::info!("batch {} is already committed in the sink; it was replayed to rebuild plugin state and is not written again", plan.batch_id);
        } else {
            self.sink.write(plan.batch_id, &out.batches)?;
            self.sink.commit(plan.batch_id)?;
        }
        self.watermark = out.watermark_ms.or(self.watermark);
        if let Some(delay) = scheduling_delay {
            self.rate.after_batch(now_ms(), records as u64, tick.elapsed(), delay);
        }
        if let Some(c) = &self.checkpoints {
            let positions = self
                .source
                .positions_after(&ranges)
                .into_iter()
                .map(|((topic, partition), next)| Position { topic, partition, next })
                .collect();
            c.commit(&Checkpoint {
                batch_id: plan.batch_id,
                created_ms: now_ms(),
                tasks: vec![TaskState { task: TASK, positions, plugins: self.chain.snapshot()?, watermark_ms: self.watermark }],
                rate_controller: Some(serde_json::to_value(self.rate.state()).expect("rate state serializes")),
            })?;
        }
        self.source.commit(&ranges)?;
        let output_rows: u64 = out.batches.iter().map(|b| b.num_rows() as u64).sum();
        let duration = tick.elapsed();
        let left = self.source.remaining_after(lag, &ranges);
        self.summary.batches += 1;
        self.summary.records += records as u64;
        self.summary.output_rows += output_rows;
        self.summary.rejected += out.rejected.len() as u64;
        progress(&BatchProgress {
            batch_id: plan.batch_id,
            records: records as u64,
            output_rows,
            rejected: out.rejected,
            duration,
            processed_per_sec: records as f64 / duration.as_secs_f64().max(1e-9),
            lag: left,
            watermark_ms: self.watermark,
        });
        Ok(())
    }
}
