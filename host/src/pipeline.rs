//! The micro-batch loop: plan → fetch → plugins → sink → commit, once per trigger
//! interval, until stopped. It wires the other modules together and owns none of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow_array::RecordBatch;
use sluice_sdk::{record_schema, Context, OffsetRange};

use crate::chain::{Chain, Rejected};
use crate::config::{Pipeline, PluginSource};
use crate::examples;
use crate::kafka::{KafkaSource, PartitionLag};
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
    /// Records left on the brokers after this batch, all partitions.
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

/// Run `pipeline` until `until`, writing to `sink` and reporting each batch.
pub fn run(
    pipeline: &Pipeline,
    runtime: &Runtime,
    until: Until,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    let mut chain = build_chain(pipeline, runtime)?;
    run_chain(pipeline, &mut chain, until, stop, sink, progress)
}

/// [`run`] with a chain built by the caller (the pipeline's `steps` are not used).
pub fn run_chain(
    pipeline: &Pipeline,
    chain: &mut Chain,
    until: Until,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(&BatchProgress),
) -> anyhow::Result<RunSummary> {
    let mut source = KafkaSource::connect(&pipeline.source, &pipeline.kafka)?;
    let targets: Option<Vec<PartitionLag>> = match until {
        Until::AvailableNow => Some(source.lag()?),
        Until::Stopped => None,
    };
    let fetch_timeout = pipeline.trigger_interval.max(Duration::from_secs(30));
    let mut summary = RunSummary::default();
    let first_batch_id = sink.last_batch_id()?.map_or(0, |last| last + 1);
    let mut watermark = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(summary);
        }
        let tick = Instant::now();
        let mut lag = source.lag()?;
        if let Some(targets) = &targets {
            for (p, t) in lag.iter_mut().zip(targets) {
                p.high = p.high.min(t.high);
            }
        }
        let ranges: Vec<OffsetRange> = source.plan(&lag);
        let records: i64 = ranges.iter().map(|r| r.until - r.from).sum();
        let caught_up = targets.is_some() && records == 0;
        if records > 0 || caught_up {
            let batch = if records > 0 { source.fetch(&ranges, fetch_timeout)? } else { RecordBatch::new_empty(record_schema()) };
            let ctx = Context {
                batch_id: first_batch_id + summary.batches,
                offset_ranges: ranges.clone(),
                processing_time_ms: now_ms(),
                watermark_ms: if caught_up { Some(i64::MAX) } else { watermark },
            };
            let out = chain.process(batch, &ctx)?;
            sink.write(ctx.batch_id, &out.batches)?;
            source.commit(&ranges)?;
            watermark = out.watermark_ms.or(watermark);
            let output_rows: u64 = out.batches.iter().map(|b| b.num_rows() as u64).sum();
            let duration = tick.elapsed();
            let left: u64 = lag.iter().zip(&ranges).map(|(p, r)| (p.high - r.until).max(0) as u64).sum();
            summary.batches += 1;
            summary.records += records as u64;
            summary.output_rows += output_rows;
            summary.rejected += out.rejected.len() as u64;
            progress(&BatchProgress {
                batch_id: ctx.batch_id,
                records: records as u64,
                output_rows,
                rejected: out.rejected,
                duration,
                processed_per_sec: records as f64 / duration.as_secs_f64().max(1e-9),
                lag: left,
                watermark_ms: watermark,
            });
        }
        if caught_up {
            return Ok(summary);
        }
        // Wait for the next trigger, waking early to stop.
        while tick.elapsed() < pipeline.trigger_interval && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(pipeline.trigger_interval));
        }
    }
}
