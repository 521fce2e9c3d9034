//! `sluice demo`: seed-style ad events through the embedded example plugins —
//! `json-filter` keeps the clicks, `ad-clicks` aggregates them in sliding windows — with a
//! progress line per batch and each window printed as it closes.
//!
//! Until the Kafka source lands, events come from an in-process generator, paced in real
//! time. Event time runs `speedup` times faster than the wall clock so that one-minute
//! windows close within a short demo.

pub mod generator;

use std::io::Write;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::RecordBatch;
use sluice_sdk::{Context, OffsetRange, RecordParts, RecordsBuilder};

use crate::chain::Chain;
use crate::examples;
use crate::runtime::{Limits, Runtime};
use generator::{EventGenerator, EventSpec};

/// Topic name the generated events carry.
pub const TOPIC: &str = "ad-events";
/// Partitions the generated events are spread over (by campaign).
pub const PARTITIONS: i32 = 4;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to run (wall clock).
    pub duration: Duration,
    /// Events per second (wall clock).
    pub rate: u64,
    /// Batch interval.
    pub interval: Duration,
    /// Event-time seconds per wall-clock second.
    pub speedup: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { duration: Duration::from_secs(30), rate: 5_000, interval: Duration::from_secs(1), speedup: 10 }
    }
}

/// Totals of a demo run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoSummary {
    /// Batches run, including the final flush.
    pub batches: u64,
    /// Events generated.
    pub events: u64,
    /// Windows emitted.
    pub windows: u64,
    /// Clicks counted in emitted windows (each click counts once per window it falls in).
    pub window_clicks: u64,
}

/// The json-filter configuration of the demo: keep clicks, keep the fields ad-clicks reads.
pub const FILTER_CONFIG: &str = r#"{"where": [{"field": "event", "op": "eq", "value": "click"}],
 "select": ["campaign_id", "user_id", "cost", "timestamp"]}"#;

/// Run the demo, writing windows to `out` and progress lines to `progress`.
pub fn run(options: &DemoOptions, out: &mut dyn Write, progress: &mut dyn Write) -> anyhow::Result<DemoSummary> {
    let runtime = Runtime::with_default_cache()?;
    let filter = runtime.load(examples::JSON_FILTER, "builtin:json-filter", Limits::default())?;
    let clicks = runtime.load(examples::AD_CLICKS, "builtin:ad-clicks", Limits::default())?;
    let mut chain = Chain::new(vec![filter.instantiate(FILTER_CONFIG)?, clicks.instantiate("{}")?])?;

    let per_batch = (options.rate as f64 * options.interval.as_secs_f64()).round().max(1.0) as usize;
    let mut gen = EventGenerator::new(EventSpec {
        events_per_sec: (options.rate / options.speedup.max(1)).max(1),
        ..EventSpec::default()
    });
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut summary = DemoSummary::default();
    let mut watermark = None;
    let started = Instant::now();
    writeln!(
        progress,
        "sluice demo: {} events/s in batches every {} ms for {} s (event time ×{}), json-filter → ad-clicks",
        options.rate,
        options.interval.as_millis(),
        options.duration.as_secs(),
        options.speedup
    )?;

    loop {
        let batch_started = Instant::now();
        let last = batch_started.duration_since(started) >= options.duration;
        let (batch, ranges) = if last {
            (RecordsBuilder::default().finish(), Vec::new())
        } else {
            next_batch(&mut gen, per_batch, &mut offsets)
        };
        let ctx = Context {
            batch_id: summary.batches,
            offset_ranges: ranges,
            processing_time_ms: 0,
            watermark_ms: if last { Some(i64::MAX) } else { watermark },
        };
        let processing = Instant::now();
        let result = chain.process(batch, &ctx)?;
        let took = processing.elapsed();
        watermark = result.watermark_ms.or(watermark);
        summary.batches += 1;
        let mut windows = 0;
        for b in &result.batches {
            windows += b.num_rows() as u64;
            summary.window_clicks += print_windows(b, out)?;
        }
        summary.windows += windows;
        if !last {
            summary.events += per_batch as u64;
            writeln!(
                progress,
                "batch {:>3} | {:>6} events | {:>6.0} events/s in | {:>9.0} events/s processed | {:>7.2} ms | {} windows closed | watermark {} | lag n/a (no broker yet)",
                ctx.batch_id,
                per_batch,
                per_batch as f64 / options.interval.as_secs_f64(),
                per_batch as f64 / took.as_secs_f64().max(1e-9),
                took.as_secs_f64() * 1000.0,
                windows,
                watermark.map(clock).unwrap_or_else(|| "-".into()),
            )?;
        }
        for r in &result.rejected {
            writeln!(progress, "rejected {}/{}@{} by {}: {}", r.topic, r.partition, r.offset, r.plugin, r.reason)?;
        }
        if last {
            break;
        }
        if let Some(rest) = options.interval.checked_sub(batch_started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    writeln!(
        progress,
        "done: {} events in {} batches, {} windows emitted",
        summary.events, summary.batches, summary.windows
    )?;
    Ok(summary)
}

fn next_batch(gen: &mut EventGenerator, n: usize, offsets: &mut [i64]) -> (RecordBatch, Vec<OffsetRange>) {
    let from = offsets.to_vec();
    let mut builder = RecordsBuilder::with_capacity(n, n * 120);
    for _ in 0..n {
        let event = gen.next_event();
        let value = serde_json::to_vec(&event).expect("events serialize");
        let campaign: u64 = event.campaign_id.trim_start_matches("campaign-").parse().unwrap_or(0);
        let partition = (campaign % PARTITIONS as u64) as usize;
        let parts = RecordParts {
            topic: TOPIC,
            partition: partition as i32,
            offset: offsets[partition],
            timestamp: Some(event.timestamp),
            key: Some(event.campaign_id.as_bytes()),
            value: Some(&value),
        };
        builder.append(parts, []);
        offsets[partition] += 1;
    }
    let ranges = (0..offsets.len())
        .filter(|&p| offsets[p] > from[p])
        .map(|p| OffsetRange { topic: TOPIC.into(), partition: p as i32, from: from[p], until: offsets[p] })
        .collect();
    (builder.finish(), ranges)
}

fn print_windows(batch: &RecordBatch, out: &mut dyn Write) -> std::io::Result<u64> {
    let col = |name: &str| batch.column_by_name(name).expect("ad-clicks output column");
    let start = col("window_start").as_primitive::<Int64Type>();
    let end = col("window_end").as_primitive::<Int64Type>();
    let campaign = col("campaign_id").as_string::<i32>();
    let clicks = col("clicks").as_primitive::<Int64Type>();
    let cost = col("total_cost").as_primitive::<Float64Type>();
    let users = col("unique_users").as_primitive::<Int64Type>();
    let mut total = 0;
    for i in 0..batch.num_rows() {
        writeln!(
            out,
            "window {}-{}  {}  clicks={:<5} total_cost={:<9.2} unique_users={}",
            clock(start.value(i)),
            clock(end.value(i)),
            campaign.value(i),
            clicks.value(i),
            cost.value(i),
            users.value(i)
        )?;
        total += clicks.value(i) as u64;
    }
    Ok(total)
}

/// `HH:MM:SS` (UTC) of an epoch-millisecond time.
fn clock(ms: i64) -> String {
    if ms == i64::MAX {
        return "end".into();
    }
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}
