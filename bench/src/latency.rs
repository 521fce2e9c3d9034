//! `sluice-bench latency`: how long an event takes from its producer to the sink, for a
//! stateless pipeline (the WebAssembly json-filter) at a fixed input rate with short
//! batches, on a real broker.
//!
//! A producer process stamps each event's `timestamp` with the wall clock when it creates
//! it and writes it to Apache Kafka at a fixed rate. The pipeline (json-filter, demo
//! configuration: keep clicks, project four fields) runs with its trigger interval; a sink
//! that measures takes each row's `timestamp` from the filtered JSON and records the wall
//! clock minus it when the batch reaches the sink. Events created during the warm-up are
//! not counted.

use sluice::control::Control;
use std::io::Write;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::RecordBatch;

use super::burst::Producer;
use crate::broker::ApacheKafka;
use crate::Exes;
use sluice::broker::Broker;
use sluice::demo::FILTER_CONFIG;
use sluice::pipeline::{now_ms, run_chain, Until};
use sluice::runtime::Runtime;
use sluice::sink::{Sink, SinkError};

/// Options of `sluice-bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyBenchArgs {
    /// Events per second the producer writes.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Batch interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Time measured, after the warm-up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time before measuring (plugin compilation, first batches, consumer start).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
}

/// The latencies measured, milliseconds.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// Sorted latencies of the events counted, ms.
    pub latencies_ms: Vec<i64>,
    /// Batches run.
    pub batches: u64,
    /// Records read (all events, before the filter).
    pub records: u64,
}

impl LatencyReport {
    /// The `q` quantile (0..=1) by nearest rank, ms.
    pub fn quantile(&self, q: f64) -> Option<i64> {
        let n = self.latencies_ms.len();
        (n > 0).then(|| self.latencies_ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    }
}

/// Records, per row, the time from the event's `timestamp` to now.
struct Measuring {
    counted_from_ms: i64,
    latencies_ms: Vec<i64>,
    unreadable: u64,
}

#[derive(serde::Deserialize)]
struct Stamped {
    timestamp: i64,
}

impl Sink for Measuring {
    fn write(&mut self, _batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let now = now_ms();
        for batch in batches {
            let Some(values) = batch.column_by_name(sluice_sdk::columns::VALUE) else { continue };
            for value in values.as_binary::<i32>().iter().flatten() {
                match serde_json::from_slice::<Stamped>(value) {
                    Ok(s) if s.timestamp >= self.counted_from_ms => self.latencies_ms.push(now - s.timestamp),
                    Ok(_) => {}
                    Err(_) => self.unreadable += 1,
                }
            }
        }
        Ok(())
    }
}

/// One run on `broker`; the producer is (`sluice-bench produce --wall-clock`).
pub fn run_on(args: &LatencyBenchArgs, broker: &dyn Broker, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<LatencyReport> {
    anyhow::ensure!(
        args.rate > 0 && !args.interval.is_zero() && !args.duration.is_zero() && args.partitions >= 1,
        "--rate, --interval, --duration and --partitions must be above zero"
    );
    let topic = "sluice-bench-latency";
    broker.create_topic(topic, args.partitions)?;
    let pipeline = super::bench_pipeline(topic, topic, broker.bootstrap(), args.interval).check()?;
    let runtime = Runtime::with_default_cache()?;
    let mut chain = super::pipeline::wasm(&runtime, "json-filter", FILTER_CONFIG)?;
    let total = args.warmup + args.duration;
    let mut sink = Measuring { counted_from_ms: now_ms() + args.warmup.as_millis() as i64, latencies_ms: Vec::new(), unreadable: 0 };
    let mut producer = Producer::start(&exes.bench, &broker.bootstrap(), topic, args.partitions, &[(total + Duration::from_secs(1), args.rate as f64)], true)?;
    let started = Instant::now();
    let stop = Control::new();
    let (mut batches, mut records) = (0, 0);
    let result = run_chain(&pipeline, &mut chain, Until::Stopped, &stop, &mut sink, &mut |p| {
        batches += 1;
        records += p.records;
        if started.elapsed() > total || producer.failed() {
            stop.stop();
        }
    });
    if producer.failed() {
        anyhow::bail!("the producer process failed; its error is printed above");
    }
    result?;
    anyhow::ensure!(sink.unreadable == 0, "{} rows at the sink had no readable `timestamp`", sink.unreadable);
    let mut latencies_ms = sink.latencies_ms;
    latencies_ms.sort_unstable();
    let report = LatencyReport { latencies_ms, batches, records };
    let q = |q: f64| report.quantile(q).map_or("-".to_string(), |v| v.to_string());
    writeln!(out, "| input rate (events/s) | batch interval | events counted | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    writeln!(out, "| {} | {} ms | {} | {} | {} | {} | {} |", args.rate, args.interval.as_millis(), report.latencies_ms.len(), q(0.5), q(0.9), q(0.99), q(1.0))?;
    writeln!(
        out,
        "{} batches, {} records read; events counted are the clicks json-filter keeps, created after the {} s warm-up",
        report.batches,
        report.records,
        args.warmup.as_secs()
    )?;
    Ok(report)
}

/// `sluice-bench latency`: start Apache Kafka, run [`run_on`], stop it.
pub fn run(args: &LatencyBenchArgs, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<LatencyReport> {
    let broker = ApacheKafka::start()?;
    writeln!(out, "broker: {}; json-filter (WebAssembly) from producer to sink", broker.describe())?;
    run_on(args, &broker, exes, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let report = LatencyReport { latencies_ms: (1..=100).collect(), batches: 0, records: 0 };
        assert_eq!((report.quantile(0.5), report.quantile(0.99), report.quantile(1.0), report.quantile(0.0)), (Some(50), Some(99), Some(100), Some(1)));
        assert_eq!(LatencyReport { latencies_ms: vec![], batches: 0, records: 0 }.quantile(0.5), None);
    }
}
