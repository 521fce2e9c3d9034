//! `sluice-bench pipeline`: whole pipelines on a real broker, in one run. N seed-style
//! events are produced to a topic, then each pipeline reads all of them from the earliest
//! offset with its own consumer group, through the real micro-batch loop (plan, exact
//! fetch, Arrow batch, plugins, sink, offset commit), into a sink that discards:
//!
//! * consume-only — no plugins: what the broker and the source deliver;
//! * json-filter and ad-clicks, each natively compiled into the host and as WebAssembly.
//!
//! Records/s are compared with consume-only and, for each plugin, WebAssembly with native.

use sluice::control::Control;
use std::io::Write;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use sluice_sdk::testing::{AggregateDriver, TransformDriver};

use super::{per_sec, NativeStage};
use crate::broker::ApacheKafka;
use sluice::broker::Broker;
use sluice::chain::{Chain, FailurePolicy, Stage};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::demo::FILTER_CONFIG;
use sluice::kafka::{Loader, Outgoing};
use sluice::pipeline::{run_chain, Until};
use sluice::runtime::{Limits, Runtime};
use sluice::sink::{Sink, SinkError};

/// The topic the benchmark produces to and reads.
pub const TOPIC: &str = "sluice-bench-events";

/// Options of `sluice-bench pipeline`.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    /// Events to produce and read.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Most records per batch (`maxOffsetsPerTrigger`).
    #[arg(long, default_value_t = 100_000)]
    pub batch: u64,
    /// Repetitions of each pipeline; the fastest is reported.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Use this broker (`host:port`) instead of starting Apache Kafka; the topic
    /// `sluice-bench-events` must not exist yet.
    #[arg(long)]
    pub bootstrap: Option<String>,
}

/// One measured pipeline.
#[derive(Debug, Clone)]
pub struct PipelineRow {
    /// What ran.
    pub pipeline: &'static str,
    /// Records read.
    pub records: u64,
    /// Rows the sink received.
    pub output_rows: u64,
    /// Batches.
    pub batches: u64,
    /// Records per second, from connecting to the final commit.
    pub records_per_sec: f64,
}

/// Takes every batch and keeps nothing.
pub(crate) struct Discard;

impl Sink for Discard {
    fn write(&mut self, _batch_id: u64, _batches: &[RecordBatch]) -> Result<(), SinkError> {
        Ok(())
    }
}

type ChainFn = fn(&Runtime) -> anyhow::Result<Chain>;

pub(crate) fn wasm(runtime: &Runtime, name: &str, config: &str) -> anyhow::Result<Chain> {
    let plugin = runtime.load_builtin(name, Limits::default())?;
    let mut chain = Chain::new(vec![plugin.instantiate(config)?])?;
    chain.set_policies([FailurePolicy::STOP_AT_ONCE]);
    Ok(chain)
}

fn native(stage: impl Stage + 'static) -> anyhow::Result<Chain> {
    let mut chain = Chain::of_stages(vec![Box::new(stage)])?;
    chain.set_policies([FailurePolicy::STOP_AT_ONCE]);
    Ok(chain)
}

const CASES: [(&str, ChainFn); 5] = [
    ("consume-only", |_| Ok(Chain::consume_only())),
    ("json-filter native", |_| native(NativeStage::<TransformDriver<json_filter::JsonFilter>>::new("json-filter", FILTER_CONFIG)?)),
    ("json-filter WASM", |r| wasm(r, "json-filter", FILTER_CONFIG)),
    ("ad-clicks native", |_| native(NativeStage::<AggregateDriver<ad_clicks::AdClicks>>::new("ad-clicks", "{}")?)),
    ("ad-clicks WASM", |r| wasm(r, "ad-clicks", "{}")),
];

/// Produce `n` events round-robin over the partitions, keyed by campaign; returns the
/// time it took until every record was acknowledged.
pub(crate) fn produce(broker: &dyn Broker, partitions: i32, n: usize) -> anyhow::Result<Duration> {
    let mut gen = EventGenerator::new(EventSpec::default());
    let events: Vec<(String, Vec<u8>)> = (0..n)
        .map(|_| {
            let e = gen.next_event();
            let value = serde_json::to_vec(&e).expect("events serialize");
            (e.campaign_id, value)
        })
        .collect();
    let loader = Loader::connect(&broker.bootstrap(), &[])?;
    let started = Instant::now();
    let records: Vec<(&str, Outgoing)> = events
        .iter()
        .enumerate()
        .map(|(i, (key, value))| (TOPIC, Outgoing { partition: Some(i as i32 % partitions), key: Some(key.as_bytes()), value: Some(value), headers: &[] }))
        .collect();
    for (topic, record) in records {
        loader.send(topic, record)?;
    }
    loader.flush(Duration::from_secs(300))?;
    Ok(started.elapsed())
}

/// Create the topic on `broker`, produce the events, run every pipeline over them and
/// print a table to `out`.
pub fn run_on(args: &PipelineBenchArgs, broker: &dyn Broker, out: &mut dyn Write) -> anyhow::Result<Vec<PipelineRow>> {
    if args.records == 0 || args.repeat == 0 || args.batch == 0 || args.partitions < 1 {
        anyhow::bail!("--records, --repeat, --batch and --partitions must be at least 1");
    }
    broker.create_topic(TOPIC, args.partitions)?;
    let produced = produce(broker, args.partitions, args.records)?;
    let bootstrap = broker.bootstrap();
    writeln!(
        out,
        "sluice-bench pipeline: {} events produced to {} partitions at {:.0} records/s; batches of at most {} records; best of {}",
        args.records,
        args.partitions,
        per_sec(args.records as u64, produced),
        args.batch,
        args.repeat
    )?;
    let runtime = Runtime::new(sluice::runtime::default_cache_dir())?;
    // Repetitions take the pipelines in turn, every other one in reverse order: the broker's
    // speed drifts over a run (the broker's, here), and with a fixed
    // order the WASM pipeline of each pair would always meet the broker after its native
    // twin did.
    let mut best: Vec<Option<PipelineRow>> = vec![None; CASES.len()];
    for rep in 0..args.repeat {
        let order: Vec<usize> = if rep % 2 == 0 { (0..CASES.len()).collect() } else { (0..CASES.len()).rev().collect() };
        for i in order {
            let (name, make) = CASES[i];
            let group = format!("sluice-bench-{}-{rep}", name.replace(' ', "-"));
            let mut pipeline = super::bench_pipeline(&group, TOPIC, bootstrap.clone(), Duration::ZERO);
            pipeline.source.max_offsets_per_trigger = Some(args.batch);
            let pipeline = pipeline.check()?;
            let mut chain = make(&runtime)?;
            let started = Instant::now();
            let summary = run_chain(&pipeline, &mut chain, Until::AvailableNow, &Control::new(), &mut Discard, &mut |_| {})?;
            let elapsed = started.elapsed();
            anyhow::ensure!(summary.records == args.records as u64, "{name}: read {} records of the {} produced", summary.records, args.records);
            let row = PipelineRow {
                pipeline: name,
                records: summary.records,
                output_rows: summary.output_rows,
                batches: summary.batches,
                records_per_sec: per_sec(summary.records, elapsed),
            };
            if best[i].as_ref().is_none_or(|b| row.records_per_sec > b.records_per_sec) {
                best[i] = Some(row);
            }
        }
    }
    let rows_out: Vec<PipelineRow> = best.into_iter().map(|b| b.expect("at least one repetition")).collect();
    for pair in rows_out[1..].chunks(2) {
        if let [n, w] = pair {
            anyhow::ensure!(n.output_rows == w.output_rows, "{} wrote {} rows but {} wrote {}", n.pipeline, n.output_rows, w.pipeline, w.output_rows);
        }
    }
    let consume = rows_out[0].records_per_sec;
    writeln!(out, "| pipeline | records/s | output rows | batches | vs consume-only | WASM / native |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (i, r) in rows_out.iter().enumerate() {
        let vs_native = if i >= 2 && i % 2 == 0 { format!("{:.2}×", r.records_per_sec / rows_out[i - 1].records_per_sec) } else { "".into() };
        writeln!(out, "| {} | {:.0} | {} | {} | {:.2}× | {} |", r.pipeline, r.records_per_sec, r.output_rows, r.batches, r.records_per_sec / consume, vs_native)?;
    }
    Ok(rows_out)
}

/// `sluice-bench pipeline`: start Apache Kafka (unless `--bootstrap` is given), run [`run_on`],
/// stop the broker.
pub fn run(args: &PipelineBenchArgs, out: &mut dyn Write) -> anyhow::Result<Vec<PipelineRow>> {
    match &args.bootstrap {
        Some(bootstrap) => run_on(args, &crate::broker::External(bootstrap.clone()), out),
        None => {
            let broker = ApacheKafka::start()?;
            writeln!(out, "broker: {}", broker.describe())?;
            run_on(args, &broker, out)
        }
    }
}
