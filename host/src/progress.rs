//! The progress record of one batch (Spark's `StreamingQueryProgress`) and the observers
//! that follow a run batch by batch: the history `/progress` serves, the Prometheus
//! metrics, the log.

use std::time::Duration;

use crate::chain::{Rejected, StepId};

/// Something that follows a run batch by batch. The loop calls every observer of
/// [`RunOptions::observers`](crate::pipeline::RunOptions::observers) after each batch, with
/// the batch's progress and its JSON record (the form logged and served).
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Batch `progress` is done.
    fn batch(&self, progress: &BatchProgress, record: &serde_json::Value);

    /// The tasks (`topic/partition`) this process owns now, in a consumer-group run.
    fn tasks(&self, _owned: &[String]) {}
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
#[derive(Debug, Clone, Default)]
pub struct BatchProgress {
    /// Batch id (of its task, in a consumer-group run).
    pub batch_id: u64,
    /// The task (`topic/partition`) in a consumer-group run; `None` for a run over all
    /// partitions.
    pub task: Option<String>,
    /// When it was planned (its processing time), epoch ms.
    pub timestamp_ms: i64,
    /// Records read per second of wall time since the previous batch started (Spark's
    /// input rate); for the first batch of a run, per second of its own duration.
    pub input_per_sec: f64,
    /// Where the time went.
    pub durations: BatchDurations,
    /// Each plugin step (`name version`) and its time.
    pub step_times: Vec<(StepId, Duration)>,
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
    pub failures: Vec<StepId>,
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
            "task": self.task,
            "timestamp_ms": self.timestamp_ms,
            "records": self.records,
            "input_rows_per_sec": self.input_per_sec.round(),
            "processed_rows_per_sec": self.processed_per_sec.round(),
            "output_rows": self.output_rows,
            "duration_ms": self.durations_json(),
            "interval_ms": ms(self.interval),
            "plugins": self.step_times.iter().map(|(step, t)| serde_json::json!({
                "plugin": step.to_string(),
                "ms": ms(*t),
                "rejected": self.rejected.iter().filter(|r| step.name == r.plugin && step.version == r.version).count(),
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

/// The progress records of the last batches, newest last; in a consumer-group run also the
/// tasks this process owns, each with its last record.
#[derive(Debug)]
pub struct ProgressHistory {
    keep: usize,
    records: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// `None` outside a consumer-group run.
    tasks: std::sync::Mutex<Option<std::collections::BTreeMap<String, Option<serde_json::Value>>>>,
}

impl ProgressHistory {
    /// Keep the last `keep` records.
    pub fn new(keep: usize) -> Self {
        Self { keep: keep.max(1), records: Default::default(), tasks: Default::default() }
    }

    fn push(&self, record: serde_json::Value) {
        if let Some(task) = record["task"].as_str() {
            if let Some(tasks) = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                if let Some(last) = tasks.get_mut(task) {
                    *last = Some(record.clone());
                }
            }
        }
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

    /// In a consumer-group run, the tasks this process owns, in order, each with the
    /// progress record of its last batch (`null` before its first): `[{"task", "last"}]`.
    pub fn owned_tasks(&self) -> Option<Vec<serde_json::Value>> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        Some(tasks.as_ref()?.iter().map(|(task, last)| serde_json::json!({"task": task, "last": last})).collect())
    }
}

impl Observer for ProgressHistory {
    fn batch(&self, _: &BatchProgress, record: &serde_json::Value) {
        self.push(record.clone());
    }

    fn tasks(&self, owned: &[String]) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let before = tasks.take().unwrap_or_default();
        // A task kept keeps its last record; one that left is forgotten.
        *tasks = Some(owned.iter().map(|t| (t.clone(), before.get(t).cloned().flatten())).collect());
    }
}
