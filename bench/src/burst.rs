//! `sluice-bench burst`: the seed's lesson — a 10× traffic burst must not sink the job.
//!
//! A chain step with a known cost per record caps the pipeline's capacity at C records/s.
//! A producer process writes to a real broker at 0.5 C, steps up to 10 C for a few seconds,
//! and back to 0.5 C. The pipeline runs twice over such a timeline, with PID backpressure
//! on and off, and reports per batch: processing time / interval, records, lag and the
//! process's resident memory. An SVG plot of both runs can be written.

use sluice::control::Control;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sluice_sdk::{record_schema, Context, Finished, PluginKind};

use super::pipeline::Discard;
use crate::broker::ApacheKafka;
use crate::Exes;
use sluice::broker::Broker;
use sluice::chain::{Chain, Stage};
use sluice::checkpoint::PluginIdentity;
use sluice::config::Backpressure;
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};
use sluice::pipeline::{run_chain, Until};
use sluice::runtime::CallError;

/// Options of `sluice-bench burst`.
#[derive(Debug, Clone, clap::Args)]
pub struct BurstBenchArgs {
    /// Capacity C of the pipeline, records/s (the test step costs 1/C s per record).
    #[arg(long, default_value_t = 10_000)]
    pub capacity: u64,
    /// Batch interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Time at 0.5 C before the burst.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// Length of the 10 C burst.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub burst: Duration,
    /// Longest time at 0.5 C after the burst; a run ends earlier once the lag is drained.
    #[arg(long, default_value = "80s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// Write an SVG plot of both runs here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Extra librdkafka property for the pipeline's consumer, `key=value` (repeatable).
    #[arg(long = "kafka", value_parser = parse_property)]
    pub kafka: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).ok_or_else(|| format!("`{s}`: expected key=value"))
}

/// One batch of a run.
#[derive(Debug, Clone)]
pub struct BurstBatch {
    /// Seconds since the run started, at the batch's end.
    pub at: f64,
    /// Records in the batch.
    pub records: u64,
    /// Processing time / batch interval.
    pub load: f64,
    /// Records left on the broker after it.
    pub lag: u64,
    /// Resident memory of the process, MiB.
    pub rss_mib: f64,
    /// Where the batch's time went (the progress record's `duration_ms`).
    pub phases: serde_json::Value,
}

/// One run.
#[derive(Debug, Clone)]
pub struct BurstRun {
    /// Backpressure on?
    pub backpressure: bool,
    /// Its batches.
    pub batches: Vec<BurstBatch>,
    /// Seconds since start when the burst began and ended.
    pub burst: (f64, f64),
}

impl BurstRun {
    /// Batches that started after the burst began until processing time was back within
    /// 1.2× the interval for good (`None` if it never was).
    pub fn batches_to_recover(&self) -> Option<usize> {
        let after: Vec<&BurstBatch> = self.batches.iter().filter(|b| b.at > self.burst.0).collect();
        let last_over = after.iter().rposition(|b| b.load > 1.2);
        match last_over {
            None => Some(0),
            Some(i) if i + 1 < after.len() => Some(i + 1),
            Some(_) => None,
        }
    }

    /// Largest resident memory, MiB.
    pub fn peak_rss(&self) -> f64 {
        self.batches.iter().map(|b| b.rss_mib).fold(0.0, f64::max)
    }

    /// Largest lag.
    pub fn peak_lag(&self) -> u64 {
        self.batches.iter().map(|b| b.lag).max().unwrap_or(0)
    }
}

/// Costs `1 / capacity` seconds of CPU per record, produces nothing.
struct CostStage {
    per_record: Duration,
    schema: SchemaRef,
}

impl Stage for CostStage {
    fn name(&self) -> &str {
        "cost"
    }
    fn version(&self) -> &str {
        "bench"
    }
    fn kind(&self) -> PluginKind {
        PluginKind::Transform
    }
    fn output_schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn process(&mut self, batch: &RecordBatch, _ctx: &Context) -> Result<Finished, CallError> {
        let busy = self.per_record * batch.num_rows() as u32;
        let started = Instant::now();
        while started.elapsed() < busy {
            std::hint::spin_loop();
        }
        Ok(Finished::default())
    }
    fn identity(&self) -> PluginIdentity {
        PluginIdentity { name: "cost".into(), version: "bench".into(), content_hash: "native".into(), state_version: 0 }
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        Ok(Vec::new())
    }
    fn restore(&mut self, _state: &[u8], _state_version: u32) -> Result<(), CallError> {
        Ok(())
    }
}

/// Resident memory of this process, MiB (0 where /proc is missing).
fn rss_mib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// Options of `sluice-bench produce` (hidden): the burst benchmark's producer, run as a
/// child process so that the pipeline's resident memory is measured alone.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// The topic to write; records go round-robin over its partitions.
    #[command(flatten)]
    pub target: super::TopicArgs,
    /// Phases `<duration>@<records/s>`, in order, e.g. `8s@5000 2s@50000 80s@5000`.
    #[arg(required = true, value_parser = parse_phase)]
    pub phases: Vec<(Duration, f64)>,
    /// Stamp each event's `timestamp` with the wall clock (epoch ms) when it is created,
    /// instead of the generator's event time (for latency measurements).
    #[arg(long)]
    pub wall_clock: bool,
}

fn parse_phase(s: &str) -> Result<(Duration, f64), String> {
    let (d, r) = s.split_once('@').ok_or_else(|| format!("`{s}`: expected <duration>@<records/s>, e.g. 2s@50000"))?;
    let d = humantime::parse_duration(d).map_err(|e| format!("`{s}`: {e}"))?;
    let r: f64 = r.parse().map_err(|_| format!("`{s}`: `{r}` is not a rate in records/s"))?;
    if !r.is_finite() || r < 0.0 {
        return Err(format!("`{s}`: the rate must be zero or more"));
    }
    Ok((d, r))
}

/// Produce generated ad events to the topic at each phase's rate, one phase after the
/// other; returns how many were sent once all are acknowledged.
pub fn produce(args: &ProduceArgs) -> anyhow::Result<u64> {
    let target = &args.target;
    anyhow::ensure!(target.partitions >= 1, "--partitions must be at least 1");
    let loader = Loader::connect(&target.bootstrap, &[])?;
    let mut gen = EventGenerator::new(EventSpec::default());
    let started = Instant::now();
    let mut sent = 0u64;
    let mut owed = 0.0f64;
    let mut last = Instant::now();
    loop {
        let t = started.elapsed();
        let mut end = Duration::ZERO;
        let phase = args.phases.iter().find(|(d, _)| {
            end += *d;
            t < end
        });
        let Some(&(_, rate)) = phase else { break };
        let now = Instant::now();
        owed += rate * now.duration_since(last).as_secs_f64();
        last = now;
        while owed >= 1.0 {
            let mut e = gen.next_event();
            if args.wall_clock {
                e.timestamp = sluice::pipeline::now_ms();
            }
            let value = serde_json::to_vec(&e)?;
            let out = Outgoing { partition: Some((sent % target.partitions as u64) as i32), key: Some(e.campaign_id.as_bytes()), value: Some(&value), headers: &[] };
            loader.send(&target.topic, out)?;
            sent += 1;
            owed -= 1.0;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    loader.flush(Duration::from_secs(60))?;
    Ok(sent)
}

/// A child process running `sluice-bench produce`; killed (by its PID) when dropped.
pub(crate) struct Producer(std::process::Child);

impl Producer {
    pub(crate) fn start(exe: &Path, bootstrap: &str, topic: &str, partitions: i32, phases: &[(Duration, f64)], wall_clock: bool) -> anyhow::Result<Self> {
        let mut command = std::process::Command::new(exe);
        command.args(["produce", "--bootstrap", bootstrap, "--topic", topic, "--partitions", &partitions.to_string()]);
        if wall_clock {
            command.arg("--wall-clock");
        }
        command.args(phases.iter().map(|(d, r)| format!("{}ms@{r}", d.as_millis())));
        let child = command.stdout(std::process::Stdio::null()).spawn().map_err(|e| anyhow::anyhow!("starting the producer `{} produce`: {e}", exe.display()))?;
        Ok(Self(child))
    }
}

impl Producer {
    /// Whether the producer exited with an error.
    pub(crate) fn failed(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(status)) if !status.success())
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_one(args: &BurstBenchArgs, broker: &dyn Broker, exes: &Exes, backpressure: bool) -> anyhow::Result<BurstRun> {
    let topic = format!("sluice-bench-burst-{}", if backpressure { "on" } else { "off" });
    broker.create_topic(&topic, args.partitions)?;
    let c = args.capacity as f64;
    let phases = vec![(args.before, 0.5 * c), (args.burst, 10.0 * c), (args.after, 0.5 * c)];
    let mut pipeline = super::bench_pipeline(&topic, &topic, broker.bootstrap(), args.interval);
    for (k, v) in &args.kafka {
        pipeline.kafka.entry(k.clone()).or_insert_with(|| v.clone());
    }
    pipeline.backpressure = backpressure.then(|| Backpressure { initial_rate: None, pid: Default::default() });
    let pipeline = pipeline.check()?;
    let stage = CostStage { per_record: Duration::from_secs_f64(1.0 / c), schema: record_schema() };
    let mut chain = Chain::of_stages(vec![Box::new(stage)])?;
    let stop = Control::new();
    let mut producer = Producer::start(&exes.bench, &broker.bootstrap(), &topic, args.partitions, &phases, false)?;
    let started = Instant::now();
    let burst = (args.before.as_secs_f64(), (args.before + args.burst).as_secs_f64());
    let mut batches = Vec::new();
    let interval = args.interval.as_secs_f64();
    let limit = args.before + args.burst + args.after;
    let result = run_chain(&pipeline, &mut chain, Until::Stopped, &stop, &mut Discard, &mut |p| {
        let at = started.elapsed().as_secs_f64();
        let phases = p.durations_json();
        batches.push(BurstBatch { at, records: p.records, load: p.duration.as_secs_f64() / interval, lag: p.lag, rss_mib: rss_mib(), phases });
        // Done when the burst is over, its backlog drained and batches fit the interval
        // again, or at the time limit.
        let drained = at > burst.1 + 2.0 * interval && batches.iter().rev().take(3).all(|b| b.lag <= 2 * args.capacity && b.load <= 1.2);
        if drained || producer.failed() || started.elapsed() > limit {
            stop.stop();
        }
    });
    if producer.failed() {
        anyhow::bail!("the producer process failed; its error is printed above");
    }
    result?;
    Ok(BurstRun { backpressure, batches, burst })
}

/// Both runs on `broker`, with a report to `out`; the producer is `exes.bench produce`, a
/// child process.
pub fn run_on(args: &BurstBenchArgs, broker: &dyn Broker, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<BurstRun>> {
    if args.capacity == 0 || args.interval.is_zero() || args.partitions < 1 {
        anyhow::bail!("--capacity, --interval and --partitions must be above zero");
    }
    let mut runs = Vec::new();
    for backpressure in [true, false] {
        let run = run_one(args, broker, exes, backpressure)?;
        writeln!(out, "backpressure {}: burst from {:.1} s to {:.1} s", if backpressure { "on" } else { "off" }, run.burst.0, run.burst.1)?;
        writeln!(out, "| t (s) | records | processing / interval | lag | RSS (MiB) |")?;
        writeln!(out, "|---:|---:|---:|---:|---:|")?;
        for b in &run.batches {
            writeln!(out, "| {:.1} | {} | {:.2} | {} | {:.0} |", b.at, b.records, b.load, b.lag, b.rss_mib)?;
        }
        // Where the time went in batches that took much longer than the interval, or that
        // ended long after the one before (time outside any batch: waiting for data).
        let mut previous = 0.0;
        for b in &run.batches {
            let gap = b.at - previous - b.load * args.interval.as_secs_f64();
            if b.load > 1.5 || gap > 2.0 * args.interval.as_secs_f64() {
                writeln!(out, "slow at {:.1} s: {:.2}× the interval, {gap:.1} s before it outside any batch; ms: {}", b.at, b.load, b.phases)?;
            }
            previous = b.at;
        }
        let recover = run.batches_to_recover().map_or("never, within the run".to_string(), |n| format!("{n} batches"));
        writeln!(
            out,
            "backpressure {}: back within 1.2× the interval after the step up: {recover}; peak lag {}; peak RSS {:.0} MiB; final lag {}\n",
            if backpressure { "on" } else { "off" },
            run.peak_lag(),
            run.peak_rss(),
            run.batches.last().map_or(0, |b| b.lag)
        )?;
        runs.push(run);
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&runs, args))?;
        writeln!(out, "plot: {}", path.display())?;
    }
    Ok(runs)
}

/// `sluice-bench burst`: start Apache Kafka, run [`run_on`], stop it.
pub fn run(args: &BurstBenchArgs, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<BurstRun>> {
    let broker = ApacheKafka::start()?;
    writeln!(out, "broker: {}; capacity {} records/s, interval {} ms", broker.describe(), args.capacity, args.interval.as_millis())?;
    run_on(args, &broker, exes, out)
}

/// Three panels per run: processing time / interval, lag and resident memory; the burst
/// shaded.
fn svg(runs: &[BurstRun], args: &BurstBenchArgs) -> String {
    let (w, h, pad) = (900.0, 260.0, 50.0);
    let t_max = runs.iter().flat_map(|r| r.batches.last()).map(|b| b.at).fold(1.0, f64::max);
    let load_max = runs.iter().flat_map(|r| &r.batches).map(|b| b.load).fold(2.0, f64::max).ceil();
    let lag_max = runs.iter().map(|r| r.peak_lag()).max().unwrap_or(1).max(1) as f64;
    let rss_max = runs.iter().map(|r| r.peak_rss()).fold(1.0, f64::max).ceil();
    let mut doc = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        h * 3.0 * runs.len() as f64
    );
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    for (i, run) in runs.iter().enumerate() {
        let name = if run.backpressure { "backpressure on" } else { "backpressure off" };
        for (j, (title, max, value)) in [
            ("processing time / interval", load_max, Box::new(|b: &BurstBatch| b.load) as Box<dyn Fn(&BurstBatch) -> f64>),
            ("lag (records)", lag_max, Box::new(|b: &BurstBatch| b.lag as f64)),
            ("resident memory (MiB)", rss_max, Box::new(|b: &BurstBatch| b.rss_mib)),
        ]
        .into_iter()
        .enumerate()
        {
            let top = (3 * i + j) as f64 * h;
            let y = |v: f64| top + h - pad + -(h - 2.0 * pad) * v / max;
            doc += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fde2c8\"/>\n",
                x(run.burst.0),
                top + pad,
                x(run.burst.1) - x(run.burst.0),
                h - 2.0 * pad
            );
            doc += &format!(
                "<text x=\"{pad}\" y=\"{:.1}\" font-weight=\"bold\">{name}: {title} (capacity {} records/s, interval {} ms; shaded: 10× burst)</text>\n",
                top + pad - 12.0,
                args.capacity,
                args.interval.as_millis()
            );
            doc += &format!("<line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n", y(0.0), w - pad, y(0.0));
            doc += &format!("<line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{pad}\" y2=\"{:.1}\" stroke=\"black\"/>\n", y(0.0), y(max));
            doc += &format!("<text x=\"5\" y=\"{:.1}\">{max:.0}</text><text x=\"5\" y=\"{:.1}\">0</text>\n", y(max) + 4.0, y(0.0) + 4.0);
            doc += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{t_max:.0} s</text>\n", w - pad, y(0.0) + 16.0);
            if j == 0 {
                doc += &format!("<line x1=\"{pad}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#c00\" stroke-dasharray=\"4 4\"/><text x=\"{1:.1}\" y=\"{2:.1}\" fill=\"#c00\" text-anchor=\"end\">1.2×</text>\n", y(1.2), w - pad, y(1.2) - 3.0);
            }
            let points: Vec<String> = run.batches.iter().map(|b| format!("{:.1},{:.1}", x(b.at), y(value(b)))).collect();
            doc += &format!("<polyline fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"2\" points=\"{}\"/>\n", points.join(" "));
        }
    }
    doc + "</svg>\n"
}
