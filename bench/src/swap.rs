//! `sluice-bench swap`: the stall a live plugin swap causes.
//!
//! A producer process writes seed-style events to a real broker at a steady rate; the
//! pipeline runs ad-clicks (WebAssembly) from a plugin directory, and every few seconds a
//! new version of `ad-clicks.wasm` is published there (the same code with a custom section
//! that makes its bytes, and so its compiled artifact, new: every swap compiles, on the
//! watcher thread, while batches run). Per swap it reports the time spent at the batch
//! boundary (taking the running version's state, restoring it into the new one) and the
//! duration of the new version's first batch, against the median batch duration; the
//! stall is the excess, in batch intervals.

use sluice::control::Control;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::burst::Producer;
use super::pipeline::Discard;
use crate::broker::ApacheKafka;
use crate::Exes;
use sluice::broker::Broker;
use sluice::config::{Pipeline, PluginSource, Step};
use sluice::pipeline::{run, Until};
use sluice::runtime::{Limits, Runtime};

/// Options of `sluice-bench swap`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwapBenchArgs {
    /// Records/s the producer writes.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Batch interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Swaps to make.
    #[arg(long, default_value_t = 6)]
    pub swaps: usize,
    /// Time between swaps.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
}

/// One swap.
#[derive(Debug, Clone, Copy)]
pub struct SwapStall {
    /// Time spent at the boundary swapping.
    pub at_boundary: Duration,
    /// Duration of the new version's first batch.
    pub first_batch: Duration,
    /// The run's median batch duration.
    pub median: Duration,
    /// `at_boundary + first_batch - median`, in batch intervals (0 when negative).
    pub stall_intervals: f64,
}

/// `bytes` (a component) with a custom section appended: another component to the host,
/// which behaves the same.
fn with_custom_section(bytes: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

/// Replace `dir/name` atomically.
fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

struct Seen {
    at: Duration,
    duration: Duration,
    swap_time: Duration,
    swaps: u64,
}

/// Run the benchmark on `broker`, with a report to `out`; the producer is
/// `exes.bench produce`.
pub fn run_on(args: &SwapBenchArgs, broker: &dyn Broker, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<SwapStall>> {
    if args.rate == 0 || args.swaps == 0 || args.interval.is_zero() || args.every < 2 * args.interval || args.partitions < 1 {
        anyhow::bail!("--rate, --swaps and --partitions must be at least 1, and --every at least two --interval");
    }
    let topic = "sluice-bench-swap";
    broker.create_topic(topic, args.partitions)?;
    let plugins = tempfile::tempdir()?;
    let v1 = sluice::examples::named("ad-clicks").map_err(anyhow::Error::msg)?;
    publish(plugins.path(), "ad-clicks.wasm", v1)?;
    let warmup = 3 * args.interval;
    let total = warmup + args.every * (args.swaps as u32 + 1);
    let pipeline = Pipeline {
        steps: vec![Step { source: PluginSource::Dir("ad-clicks".into()), config: "{}".into(), limits: Limits::default(), failure: Default::default() }],
        plugin_dir: Some(plugins.path().to_path_buf()),
        ..super::bench_pipeline(topic, topic, broker.bootstrap(), args.interval)
    }
    .check()?;
    // No disk cache, so that every new version is compiled.
    let runtime = Runtime::new(None)?;
    // Slow machines (or debug builds) compile for longer; the run waits for every swap.
    let limit = total + Duration::from_secs(300);
    let mut producer = Producer::start(&exes.bench, &broker.bootstrap(), topic, args.partitions, &[(limit, args.rate as f64)], false)?;
    let stop = Control::new();
    let started = Instant::now();
    let mut seen: Vec<Seen> = Vec::new();
    let mut published = 0;
    let mut next_due = warmup + args.every;
    let result = run(&pipeline, &runtime, Until::Stopped, &stop, &mut Discard, &mut |p| {
        let at = started.elapsed();
        seen.push(Seen { at, duration: p.duration, swap_time: p.swap_time, swaps: p.swaps });
        // The next version once the one before has taken over and its time has come.
        if published < args.swaps && p.swaps == published as u64 && at >= next_due {
            published += 1;
            next_due = at + args.every;
            let next = with_custom_section(v1, "sluice-bench-version", published.to_string().as_bytes());
            if let Err(e) = publish(plugins.path(), "ad-clicks.wasm", &next) {
                tracing::error!("publishing version {published}: {e}");
                stop.stop();
            }
        }
        let done = p.swaps == args.swaps as u64 && at >= next_due;
        if done || at > limit || producer.failed() || p.swaps_failed > 0 {
            stop.stop();
        }
    });
    let summary = result?;
    anyhow::ensure!(!producer.failed(), "the producer process failed; its error is printed above");
    anyhow::ensure!(summary.swaps_failed == 0, "{} swaps failed; see the log", summary.swaps_failed);
    anyhow::ensure!(summary.swaps == args.swaps as u64, "only {} of {} swaps took place within {} s", summary.swaps, args.swaps, limit.as_secs());
    let mut durations: Vec<Duration> = seen.iter().skip(1).map(|s| s.duration).collect();
    durations.sort();
    let median = durations.get(durations.len() / 2).copied().unwrap_or_default();
    let mut stalls = Vec::new();
    writeln!(
        out,
        "sluice-bench swap: ad-clicks (WebAssembly) at {} records/s, {} ms batches, a new version every {} s (compiled on the watcher thread)",
        args.rate,
        args.interval.as_millis(),
        args.every.as_secs_f64()
    )?;
    writeln!(out, "| swap | at (s) | at the boundary (ms) | first batch (ms) | median batch (ms) | stall (intervals) |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    for (i, w) in seen.windows(2).enumerate() {
        if w[1].swaps == w[0].swaps {
            continue;
        }
        let first = &seen[i + 1];
        // The swap happened at the boundary before the new version's first batch.
        let at_boundary = first.swap_time;
        let excess = (at_boundary + first.duration).saturating_sub(median);
        let stall = SwapStall { at_boundary, first_batch: first.duration, median, stall_intervals: excess.as_secs_f64() / args.interval.as_secs_f64() };
        writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            stalls.len() + 1,
            first.at.as_secs_f64(),
            at_boundary.as_secs_f64() * 1000.0,
            first.duration.as_secs_f64() * 1000.0,
            median.as_secs_f64() * 1000.0,
            stall.stall_intervals
        )?;
        stalls.push(stall);
    }
    let worst = stalls.iter().map(|s| s.stall_intervals).fold(0.0, f64::max);
    writeln!(out, "{} swaps, {} batches, {} records; worst stall {worst:.2} intervals (target: at most 1)", stalls.len(), summary.batches, summary.records)?;
    Ok(stalls)
}

/// `sluice-bench swap`: start Apache Kafka, run [`run_on`] with this executable, stop it.
pub fn run_bench(args: &SwapBenchArgs, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<SwapStall>> {
    let broker = ApacheKafka::start()?;
    writeln!(out, "broker: {}", broker.describe())?;
    run_on(args, &broker, exes, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_section_makes_another_component_that_loads_the_same() {
        let v1 = sluice::examples::named("ad-clicks").unwrap();
        let next = with_custom_section(v1, "sluice-bench-version", &[7; 200]);
        assert_ne!(v1, &next[..]);
        let runtime = Runtime::new(None).unwrap();
        let a = runtime.load(v1, "v1", Limits::default()).unwrap();
        let b = runtime.load(&next, "next", Limits::default()).unwrap();
        assert_eq!((a.info().name.as_str(), a.info().version.as_str()), (b.info().name.as_str(), b.info().version.as_str()));
        assert_ne!(a.info().content_hash, b.info().content_hash);
    }
}
