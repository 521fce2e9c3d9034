//! `sluice demo`: zero setup. Starts librdkafka's in-process mock cluster, produces
//! seed-style ad events into it at a steady rate, and runs the real pipeline loop over
//! it — `json-filter` keeps the clicks, `ad-clicks` aggregates them in sliding windows —
//! printing a progress line per batch and each window as it closes.
//!
//! Event time runs `speedup` times faster than the wall clock so that one-minute windows
//! close within a short demo.

pub mod generator;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::RecordBatch;

use crate::broker::{Broker, Mock};
use crate::config::{Pipeline, PluginSource, Sink as SinkConfig, Source, StartingOffsets, Step};
use crate::control::Control;
use crate::kafka::{Loader, Outgoing};
use crate::pipeline::{self, RunOptions, Until};
use crate::runtime::{Limits, Runtime};
use crate::sink::{Sink, SinkError};
use generator::{EventGenerator, EventSpec};

/// Topic the generated events go to.
pub const TOPIC: &str = "ad-events";
/// Partitions of the topic (events are spread by campaign).
pub const PARTITIONS: i32 = 4;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to run (wall clock).
    pub duration: Duration,
    /// Events per second produced (wall clock).
    pub rate: u64,
    /// Batch interval.
    pub interval: Duration,
    /// Event-time seconds per wall-clock second.
    pub speedup: u64,
    /// Serve the dashboard, metrics and progress records on this address (see
    /// [`DEFAULT_HTTP`]).
    pub http: Option<String>,
}

/// Where `sluice demo` serves its dashboard; when the port is taken, any free port is used.
pub const DEFAULT_HTTP: &str = "127.0.0.1:4040";

impl Default for DemoOptions {
    fn default() -> Self {
        Self { duration: Duration::from_secs(30), rate: 5_000, interval: Duration::from_secs(1), speedup: 10, http: None }
    }
}

/// Totals of a demo run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoSummary {
    /// Events produced.
    pub produced: u64,
    /// Events consumed by the pipeline.
    pub consumed: u64,
    /// Batches run.
    pub batches: u64,
    /// Windows emitted.
    pub windows: u64,
}

/// The json-filter configuration of the demo: keep clicks, keep the fields ad-clicks reads.
pub const FILTER_CONFIG: &str = r#"{"where": [{"field": "event", "op": "eq", "value": "click"}],
 "select": ["campaign_id", "user_id", "cost", "timestamp"]}"#;

/// Prints ad-clicks windows as they close.
struct WindowPrinter<'o> {
    out: &'o mut dyn Write,
    windows: u64,
}

impl Sink for WindowPrinter<'_> {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        for b in batches {
            self.windows += print_windows(b, self.out).map_err(|error| SinkError::Write { target: "stdout".into(), batch_id, error })?;
        }
        Ok(())
    }
}

/// Produce events at `rate` per second until `stop`; returns how many.
fn produce(loader: Loader, options: DemoOptions, stop: Control, produced: Arc<AtomicU64>) {
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: (options.rate / options.speedup.max(1)).max(1), ..EventSpec::default() });
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.is_stopped() {
        let due = (started.elapsed().as_secs_f64() * options.rate as f64) as u64;
        while sent < due {
            let event = gen.next_event();
            let value = serde_json::to_vec(&event).expect("events serialize");
            let campaign: u64 = event.campaign_id.trim_start_matches("campaign-").parse().unwrap_or(0);
            let record = Outgoing { partition: Some((campaign % PARTITIONS as u64) as i32), key: Some(event.campaign_id.as_bytes()), value: Some(&value), headers: &[] };
            if let Err(e) = loader.send(TOPIC, record) {
                tracing::error!("demo producer: {e}");
                return;
            }
            sent += 1;
        }
        produced.store(sent, Ordering::SeqCst);
        stop.sleep(Duration::from_millis(5));
    }
    let _ = loader.flush(Duration::from_secs(5));
    produced.store(sent, Ordering::SeqCst);
}

/// Run the demo until `options.duration` has passed or `stop` is set; windows go to
/// `out`, progress lines to `progress`.
pub fn run(options: &DemoOptions, stop: Control, out: &mut dyn Write, progress: &mut dyn Write) -> anyhow::Result<DemoSummary> {
    let cluster = Mock::start()?;
    cluster.create_topic(TOPIC, PARTITIONS)?;
    let bootstrap = cluster.bootstrap();

    let step = |name: &str, config: &str| Step { source: PluginSource::Builtin(name.into()), config: config.into(), limits: Limits::default(), failure: Default::default() };
    let pipeline = Pipeline {
        name: "demo".into(),
        source: Source {
            topics: vec![TOPIC.into()],
            starting_offsets: StartingOffsets::Earliest,
            max_offsets_per_trigger: None,
            partition_rates: Default::default(),
            group_id: "sluice-demo".into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: options.interval,
        adaptive_interval: None,
        kafka: BTreeMap::from([("bootstrap.servers".to_string(), bootstrap.clone())]),
        steps: vec![step("json-filter", FILTER_CONFIG), step("ad-clicks", "{}")],
        plugin_dir: None,
        sink: SinkConfig::Jsonl { path: "-".into() },
        dead_letter: None,
        checkpoint: Some(crate::config::Checkpointing { location: "memory://".into(), options: Default::default(), retain: crate::config::DEFAULT_RETAIN }),
        backpressure: None,
    }
    .check()?;
    writeln!(
        progress,
        "sluice demo: mock Kafka cluster at {bootstrap}, topic {TOPIC} ({PARTITIONS} partitions), {} events/s, batches every {} ms, for {} s (event time ×{}); json-filter -> ad-clicks",
        options.rate,
        options.interval.as_millis(),
        options.duration.as_secs(),
        options.speedup
    )?;

    // Compile the plugins before the clock starts (the runtime keeps them for the run).
    let runtime = Runtime::with_default_cache()?;
    for name in ["json-filter", "ad-clicks"] {
        runtime.load_builtin(name, Limits::default())?;
    }

    let observed = crate::http::Observed::new(&pipeline.name);
    let _server = match &options.http {
        Some(addr) => {
            let server = match crate::http::Server::start(addr, observed.clone()) {
                Err(e) if addr == DEFAULT_HTTP => {
                    tracing::info!("{e}; using any free port");
                    crate::http::Server::start("127.0.0.1:0", observed.clone())?
                }
                started => started?,
            };
            writeln!(progress, "dashboard: {} (Prometheus metrics at {}metrics)", server.url(), server.url())?;
            Some(server)
        }
        None => None,
    };
    let options_run = RunOptions { until: Until::Stopped, observers: observed.observers(), ..RunOptions::default() };

    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let loader = Loader::connect(&bootstrap, &[])?;
        let (options, stop, produced) = (options.clone(), stop.clone(), produced.clone());
        std::thread::spawn(move || produce(loader, options, stop, produced))
    };
    let timer = {
        let (stop, duration) = (stop.clone(), options.duration);
        std::thread::spawn(move || {
            stop.sleep(duration);
            stop.stop();
        })
    };

    let mut printer = WindowPrinter { out, windows: 0 };
    let mut consumed = 0;
    let result = pipeline::run(&pipeline, &runtime, options_run, &stop, &mut printer, &mut |p| {
        consumed += p.records;
        let _ = writeln!(
            progress,
            "batch {:>3} | {:>6} events | {:>7.0} events/s in | {:>9.0} events/s processed | {:>7.1} ms | {} windows closed | lag {} | watermark {}",
            p.batch_id,
            p.records,
            p.records as f64 / options.interval.as_secs_f64(),
            p.processed_per_sec,
            p.duration.as_secs_f64() * 1000.0,
            p.output_rows,
            p.lag,
            p.watermark_ms.map(clock).unwrap_or_else(|| "-".into()),
        );
        for r in &p.rejected {
            let _ = writeln!(progress, "rejected {}/{}@{} by {}: {}", r.topic, r.partition, r.offset, r.plugin, r.reason);
        }
    });
    stop.stop();
    let _ = timer.join();
    let _ = producer.join();
    let summary = result?;
    let summary = DemoSummary { produced: produced.load(Ordering::SeqCst), consumed, batches: summary.batches, windows: printer.windows };
    writeln!(
        progress,
        "done: {} events produced, {} consumed in {} batches, {} windows emitted; windows still open when the demo stopped are not shown",
        summary.produced, summary.consumed, summary.batches, summary.windows
    )?;
    Ok(summary)
}

fn print_windows(batch: &RecordBatch, out: &mut dyn Write) -> std::io::Result<u64> {
    let col = |name: &str| batch.column_by_name(name).expect("ad-clicks output column");
    let start = col("window_start").as_primitive::<Int64Type>();
    let end = col("window_end").as_primitive::<Int64Type>();
    let campaign = col("campaign_id").as_string::<i32>();
    let clicks = col("clicks").as_primitive::<Int64Type>();
    let cost = col("total_cost").as_primitive::<Float64Type>();
    let users = col("unique_users").as_primitive::<Int64Type>();
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
    }
    Ok(batch.num_rows() as u64)
}

/// `HH:MM:SS` (UTC) of an epoch-millisecond time.
fn clock(ms: i64) -> String {
    if ms == i64::MAX {
        return "end".into();
    }
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}
