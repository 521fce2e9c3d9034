//! The loop itself: plan, fetch, plugins, sink, checkpoint and commit for each batch, and
//! the waits between batches on the run's control channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use sluice_sdk::{record_schema, Context, OffsetRange};

use crate::chain::{Chain, StepId};
use crate::checkpoint::{Checkpoint, CheckpointStore, CheckpointWriter, PlannedBatch, Position, SavedRange, TaskPlan, TaskState};
use crate::config::Pipeline;
use crate::control::{Control, Wake};
use crate::kafka::PREFETCH_ROWS;
use crate::plan;
use crate::rate::RateController;
use crate::recovery::TASK;
use crate::repartition::Counted;
use crate::sink::Sink;
use crate::source::{PartitionLag, Source, SourceError};
use crate::swap::{Found, Watcher};

use super::{now_ms, BatchDurations, BatchProgress, Observer, PartitionProgress, RunError, RunOptions, RunSummary, Until};

/// Whether a source error means "the brokers are away for now".
fn is_waiting_error(e: &SourceError) -> bool {
    match e {
        SourceError::FetchTimeout { .. } => true,
        SourceError::Kafka { error, .. } => crate::kafka::is_transient(error),
        _ => false,
    }
}

/// What a batch waits for, from the error of a fetch that did not finish.
fn waiting_for(e: &SourceError) -> String {
    match e {
        SourceError::FetchTimeout { pending, .. } => format!("still waiting for {}", pending.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// The longest a fetch waits before the loop looks at its control channel again.
const FETCH_SLICE: Duration = Duration::from_millis(500);

/// The least read-ahead, records, however small rate control makes the batches.
const MIN_READ_AHEAD: usize = 10_000;

/// Mutable access to a value a task borrows (a run over all partitions uses the caller's
/// chain and sink) or owns (a consumer-group task builds its own).
pub(super) enum Held<'a, T: ?Sized> {
    Borrowed(&'a mut T),
    Owned(Box<T>),
}

impl<T: ?Sized> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

impl<T: ?Sized> std::ops::DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

/// What one task has of its own: its plugin chain (and so the aggregate's state), sinks,
/// checkpoints and watermark. A run over all partitions is one task; a consumer-group run
/// has one per source partition it owns.
pub(super) struct Task<'a> {
    /// `topic/partition` of a consumer-group task; `None` for all partitions.
    pub(super) name: Option<String>,
    pub(super) chain: Held<'a, Chain>,
    pub(super) sink: Held<'a, dyn Sink + 'a>,
    /// Where rejected records go.
    pub(super) dead_letters: Option<Box<dyn Sink>>,
    pub(super) checkpoints: Option<Arc<CheckpointStore>>,
    /// Commits the checkpoints while the next batch runs.
    pub(super) writer: Option<CheckpointWriter>,
    pub(super) watermark: Option<i64>,
    /// A task of a repartition topic: what it counted of each source partition, to drop
    /// records a replay of the source task produced again.
    pub(super) counted: Option<Counted>,
}

impl Task<'_> {
    /// Wait until the task's last checkpoint is written.
    pub(super) fn flush(&mut self) -> Result<(), RunError> {
        if let Some(writer) = &mut self.writer {
            writer.flush()?;
        }
        Ok(())
    }
}

/// How a batch came to be run.
#[derive(Debug, Clone, Copy)]
pub(super) enum Planned {
    /// Planned now: written to the offset log before it is fetched. `scheduling_delay` (how
    /// late it started) is given when rate control learns from this batch alone.
    New { scheduling_delay: Option<Duration> },
    /// In the offset log already, run again with its recorded plan.
    Replay,
}

/// The loop's state.
pub(super) struct Runner<'a> {
    pub(super) observers: Vec<Arc<dyn Observer>>,
    /// When the previous batch started.
    pub(super) last_start: Option<Instant>,
    pub(super) watcher: Option<Watcher>,
    /// Time spent swapping plugins since the last batch.
    pub(super) swap_time: Duration,
    pub(super) retune_from: Option<PathBuf>,
    pub(super) control: Control,
    /// The settings in effect (changed by live tuning).
    pub(super) running: Pipeline,
    pub(super) rate: RateController,
    pub(super) source: Box<dyn Source + 'a>,
    pub(super) summary: RunSummary,
    pub(super) fetch_timeout: Duration,
    pub(super) stall_limit: Duration,
}

impl<'a> Runner<'a> {
    /// A loop over `source` with `pipeline`'s settings and rate control from scratch.
    pub(super) fn new(pipeline: &Pipeline, options: &RunOptions, control: &Control, source: Box<dyn Source + 'a>, watcher: Option<Watcher>) -> Self {
        let stall_limit = options.stall_limit.unwrap_or(crate::source::STALL_LIMIT);
        Self {
            observers: options.observers.clone(),
            last_start: None,
            watcher,
            swap_time: Duration::ZERO,
            retune_from: options.retune_from.clone(),
            control: control.clone(),
            running: pipeline.clone(),
            rate: RateController::new(
                pipeline.backpressure.map(|b| (b.pid, b.initial_rate)),
                pipeline.source.partition_rates,
                pipeline.trigger_interval,
                pipeline.adaptive_interval,
            ),
            source,
            summary: RunSummary::default(),
            fetch_timeout: pipeline.trigger_interval.max(Duration::from_secs(30)).min(stall_limit),
            stall_limit,
        }
    }
}

impl Runner<'_> {
    /// Plan and run batches from `batch_id` on, once per trigger interval, until `until`;
    /// then wait for the last checkpoint.
    pub(super) fn run(mut self, task: &mut Task<'_>, until: Until, batch_id: u64, progress: &mut dyn FnMut(&BatchProgress)) -> Result<RunSummary, RunError> {
        self.run_batches(task, until, batch_id, progress)?;
        self.finish(task)
    }

    /// Wait until the last checkpoint is written; the summary of the run.
    pub(super) fn finish(self, task: &mut Task<'_>) -> Result<RunSummary, RunError> {
        task.flush()?;
        Ok(self.summary)
    }

    fn run_batches(&mut self, task: &mut Task<'_>, until: Until, mut batch_id: u64, progress: &mut dyn FnMut(&BatchProgress)) -> Result<(), RunError> {
        let targets: Option<Vec<PartitionLag>> = match until {
            Until::AvailableNow => Some(self.source.lag()?),
            Until::Stopped => None,
        };
        // When the current batch was due: a batch that starts later (because the one before
        // overran the interval) has a scheduling delay, which rate control counts.
        let mut due = Instant::now();
        loop {
            if self.control.is_stopped() {
                return Ok(());
            }
            if self.control.take_retune() {
                self.retune();
            }
            self.swap_plugins(&mut task.chain);
            let tick = Instant::now();
            let scheduling_delay = tick.saturating_duration_since(due);
            let lag = match self.source.lag() {
                Ok(lag) => lag,
                Err(e) if !self.control.is_stopped() => {
                    // The brokers are away: plan again once they answer.
                    tracing::warn!("cannot plan batch {batch_id}: {e}; trying again");
                    self.control.sleep(self.rate.interval().min(Duration::from_secs(5)));
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
            let flush = caught_up && task.checkpoints.is_none();
            if records > 0 || flush {
                if task.sink.is_committed(batch_id) {
                    return Err(RunError::Inconsistent(format!(
                        "the sink already holds committed output of batch {batch_id}, which this run is about to plan anew; the sink and the checkpoint were not used together"
                    )));
                }
                let plan = PlannedBatch::new(
                    batch_id,
                    now_ms(),
                    vec![TaskPlan { task: TASK, ranges: ranges.iter().map(SavedRange::from).collect(), watermark_ms: if flush { Some(i64::MAX) } else { task.watermark } }],
                );
                self.batch(task, &plan, Planned::New { scheduling_delay: Some(scheduling_delay) }, tick.elapsed(), &lag, progress)?;
                batch_id += 1;
            }
            if caught_up {
                return Ok(());
            }
            let interval = self.rate.interval();
            due = tick + interval;
            // Wait for the next trigger; a stop ends the wait, a retune or a new plugin
            // version is taken in while it goes on.
            loop {
                match self.control.wait_until(due) {
                    Wake::Deadline | Wake::Stop => break,
                    Wake::Retune => self.retune(),
                    Wake::Swap => self.swap_plugins(&mut task.chain),
                }
            }
        }
    }

    /// At a batch boundary: hand new plugin versions the watcher prepared to the chain.
    fn swap_plugins(&mut self, chain: &mut Chain) {
        let Some(watcher) = &self.watcher else { return };
        let started = Instant::now();
        let found = watcher.found();
        let any = !found.is_empty();
        for found in found {
            match found {
                Found::Ready { step, instance, file } => {
                    let new = StepId::of(instance.as_ref());
                    match chain.swap(step, instance) {
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
    pub(super) fn retune(&mut self) {
        let Some(path) = self.retune_from.clone() else {
            tracing::warn!("a retune was asked for, but this run has no pipeline file to read again");
            return;
        };
        let path = path.as_path();
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
        let mut rest = (*new).clone();
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
    fn fetch(&mut self, batch_id: u64, ranges: &[OffsetRange]) -> Result<RecordBatch, RunError> {
        let started = Instant::now();
        let mut next_warning = self.fetch_timeout;
        loop {
            // Short waits, so that a stop is seen within a second; a warning every fetch
            // timeout. A wait that times out takes nothing from the source.
            let slice = self.fetch_timeout.min(FETCH_SLICE);
            let asked = Instant::now();
            match self.source.fetch(ranges, slice) {
                Err(e @ (SourceError::FetchTimeout { .. } | SourceError::Kafka { .. })) if is_waiting_error(&e) => {
                    if self.control.is_stopped() {
                        return Err(RunError::Stopped { batch_id, waiting: waiting_for(&e) });
                    }
                    let waited = started.elapsed();
                    if waited >= self.stall_limit {
                        if let Some(missing) = self.missing(&e, waited) {
                            return Err(RunError::Unreadable { batch_id, source: missing });
                        }
                    }
                    if waited >= next_warning {
                        tracing::warn!("batch {batch_id}: waiting for its records for {} s ({})", waited.as_secs(), waiting_for(&e));
                        next_warning = waited + self.fetch_timeout;
                    }
                    // A source that gave up before the slice was over (an error, an in-memory
                    // source) is asked again after a pause; one that waited the whole slice at once.
                    if asked.elapsed() < slice {
                        self.control.sleep(Duration::from_millis(200));
                    }
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
    pub(super) fn batch(
        &mut self,
        task: &mut Task<'_>,
        plan: &PlannedBatch,
        planned: Planned,
        planning: Duration,
        lag: &[PartitionLag],
        progress: &mut dyn FnMut(&BatchProgress),
    ) -> Result<(), RunError> {
        let tick = Instant::now();
        let interval = self.rate.interval();
        let since_last = self.last_start.replace(tick).map(|t| tick.duration_since(t));
        let task_plan = plan.tasks.iter().find(|t| t.task == TASK).ok_or_else(|| RunError::Inconsistent(format!("batch {} has no plan for task {TASK}", plan.batch_id)))?;
        let ranges: Vec<OffsetRange> = task_plan.ranges.iter().map(OffsetRange::from).collect();
        let offsets = plan::offsets_in(&ranges);
        if let (Some(c), Planned::New { .. }) = (&task.checkpoints, planned) {
            c.plan(plan)?;
        }
        let batch = if offsets > 0 { self.fetch(plan.batch_id, &ranges)? } else { RecordBatch::new_empty(record_schema()) };
        // Records read, not offsets planned: a range may hold fewer records than offsets.
        let records = batch.num_rows();
        let batch = match task.counted.as_mut() {
            None => batch,
            Some(counted) => {
                let (batch, filtered) =
                    counted.filter(batch).map_err(|e| RunError::Inconsistent(format!("batch {}: reading the repartition topic's records: {e}", plan.batch_id)))?;
                if filtered.duplicates > 0 {
                    tracing::info!(
                        "batch {}: {} records of the repartition topic were counted before (a source task's batch produced again) and are skipped",
                        plan.batch_id,
                        filtered.duplicates
                    );
                }
                batch
            }
        };
        let fetched = tick.elapsed();
        let ctx = Context { batch_id: plan.batch_id, offset_ranges: ranges.clone(), processing_time_ms: plan.processing_time_ms, watermark_ms: task_plan.watermark_ms };
        let out = task.chain.process(batch, &ctx)?;
        let processed = tick.elapsed();
        self.summary.swaps += out.promoted.len() as u64;
        self.summary.swaps_failed += out.rolled_back.len() as u64;
        if task.sink.is_committed(plan.batch_id) {
            tracing::info!("batch {} is already committed in the sink; it was replayed to rebuild plugin state and is not written again", plan.batch_id);
        } else {
            task.sink.write(plan.batch_id, &out.batches)?;
            task.sink.commit(plan.batch_id)?;
        }
        // Dead letters are written under the batch's id too, before its checkpoint: a
        // replayed batch does not write them twice (exactly once in a file sink).
        let mut dead_letters = 0;
        if let Some(dead) = task.dead_letters.as_mut() {
            if !out.rejected.is_empty() && !dead.is_committed(plan.batch_id) {
                let letters = match self.running.dead_letter {
                    Some(crate::config::Sink::Kafka { .. }) => crate::chain::dead_letter_records(&out.rejected),
                    _ => crate::chain::dead_letter_rows(&out.rejected),
                };
                dead.write(plan.batch_id, &[letters]).map_err(RunError::DeadLetters)?;
                dead.commit(plan.batch_id).map_err(RunError::DeadLetters)?;
                dead_letters = out.rejected.len() as u64;
            }
        }
        let sunk = tick.elapsed();
        // Where each partition continues: in the checkpoint and in progress.
        let after = plan::positions_after(lag, &ranges);
        task.watermark = out.watermark_ms.or(task.watermark);
        if let Planned::New { scheduling_delay: Some(delay) } = planned {
            self.rate.after_batch(now_ms(), records as u64, tick.elapsed(), delay);
        }
        if let Some(writer) = &mut task.writer {
            let positions = after.iter().map(|((topic, partition), &next)| Position { topic: topic.clone(), partition: *partition, next }).collect();
            let plugins = task.chain.snapshot()?;
            writer.commit(Checkpoint {
                batch_id: plan.batch_id,
                created_ms: now_ms(),
                tasks: vec![TaskState { task: TASK, positions, plugins, watermark_ms: task.watermark, upstream: task.counted.as_ref().map(Counted::marks).unwrap_or_default() }],
                rate_controller: Some(serde_json::to_value(self.rate.state()).expect("rate state serializes")),
            })?;
        }
        if task.checkpoints.is_none() && task.chain.needs_state_copies() {
            // What a failure policy rebuilds an instance from (a checkpoint does this too).
            task.chain.snapshot()?;
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
            task: task.name.clone(),
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
            watermark_ms: task.watermark,
            swap_time: std::mem::take(&mut self.swap_time),
            swaps: self.summary.swaps,
            swaps_failed: self.summary.swaps_failed,
            interval,
            failures: out.failures,
        };
        let json = report.to_json();
        tracing::info!(target: "sluice::progress", progress = %json);
        for observer in &self.observers {
            observer.batch(&report, &json);
        }
        progress(&report);
        Ok(())
    }
}
