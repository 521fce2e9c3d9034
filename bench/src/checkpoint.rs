//! `sluice-bench checkpoint`: what checkpointing costs, in one run on a real broker.
//!
//! 1. Throughput of the seed's pipeline (json-filter → ad-clicks, WebAssembly, Parquet
//!    sink) over the same records with checkpointing off and on (one checkpoint per batch,
//!    batches of about a second), alternating the two so that drift hits both alike.
//! 2. Recovery: the same pipeline as a child process (`sluice run`), killed with SIGKILL
//!    once it has committed batches, then restarted; the time from the restart to its first
//!    committed batch.

use sluice::control::Control;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::per_sec;
use super::pipeline::{produce, TOPIC};
use crate::broker::ApacheKafka;
use crate::Exes;
use sluice::broker::Broker;
use sluice::chain::FailurePolicy;
use sluice::checkpoint::CheckpointStore;
use sluice::config::{Checkpointing, ParquetCompression, Pipeline, PluginSource, Sink as SinkConfig, Source, StartingOffsets, Step, DEFAULT_RETAIN};
use sluice::demo::FILTER_CONFIG;
use sluice::pipeline::{run, Until};
use sluice::runtime::{Limits, Runtime};

/// Options of `sluice-bench checkpoint`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointBenchArgs {
    /// Events to produce and read.
    #[arg(long, default_value_t = 500_000)]
    pub records: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Most records per batch; the default makes batches of about a second here.
    #[arg(long, default_value_t = 80_000)]
    pub batch: u64,
    /// Runs of each mode (off, on, off, on, …); the fastest of each is reported.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
    /// Kill-and-restart rounds for the recovery time.
    #[arg(long, default_value_t = 3)]
    pub restarts: usize,
}

/// What the benchmark measured.
#[derive(Debug, Clone)]
pub struct CheckpointBench {
    /// Records/s with checkpointing off (best run).
    pub off_per_sec: f64,
    /// Records/s with a checkpoint per batch (best run).
    pub on_per_sec: f64,
    /// Batches per run.
    pub batches: u64,
    /// Time from each restart after SIGKILL to its first committed batch.
    pub restarts: Vec<Duration>,
}

fn pipeline(name: &str, bootstrap: &str, batch: u64, dir: &Path, checkpoint: bool) -> Pipeline {
    let step =
        |plugin: &str, config: &str| Step { source: PluginSource::Builtin(plugin.into()), config: config.into(), limits: Limits::default(), failure: FailurePolicy::STOP_AT_ONCE };
    Pipeline {
        name: name.into(),
        source: Source {
            topics: vec![TOPIC.into()],
            starting_offsets: StartingOffsets::Earliest,
            max_offsets_per_trigger: Some(batch),
            partition_rates: Default::default(),
            group_id: name.into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: Duration::from_secs(1),
        adaptive_interval: None,
        kafka: BTreeMap::from([("bootstrap.servers".to_string(), bootstrap.to_string())]),
        steps: vec![step("json-filter", FILTER_CONFIG), step("ad-clicks", "{}")],
        plugin_dir: None,
        sink: SinkConfig::Parquet { path: dir.join("out").display().to_string(), compression: ParquetCompression::Snappy, options: BTreeMap::new() },
        dead_letter: None,
        checkpoint: checkpoint.then(|| Checkpointing { location: dir.join("checkpoint").display().to_string(), options: BTreeMap::new(), retain: DEFAULT_RETAIN }),
        backpressure: None,
    }
}

/// The same pipeline as a file, for a child process.
fn pipeline_file(dir: &Path, bootstrap: &str, batch: u64) -> anyhow::Result<PathBuf> {
    let file = dir.join("pipeline.toml");
    // FILTER_CONFIG in TOML.
    let filter = r#"{ where = [{ field = "event", op = "eq", value = "click" }], select = ["campaign_id", "user_id", "cost", "timestamp"] }"#;
    let text = format!(
        "name = \"sluice-bench-restart\"\n[source]\ntopics = [\"{TOPIC}\"]\nstartingOffsets = \"earliest\"\nmaxOffsetsPerTrigger = {batch}\n\
         [trigger]\nprocessingTime = \"1s\"\n[kafka]\n\"bootstrap.servers\" = \"{bootstrap}\"\n\
         [[plugin]]\nbuiltin = \"json-filter\"\nconfig = {filter}\n[[plugin]]\nbuiltin = \"ad-clicks\"\n\
         [sink]\nformat = \"parquet\"\npath = \"{out}\"\n[checkpoint]\nlocation = \"{ck}\"\n",
        out = dir.join("out").display(),
        ck = dir.join("checkpoint").display(),
    );
    std::fs::write(&file, text)?;
    Ok(file)
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Kill `sluice run` once it has committed a batch (the next one is then in flight), restart
/// it, and time the restart to its first committed batch; `rounds` times. Each round uses
/// two batches of the backlog.
fn restarts(sluice: &Path, dir: &Path, bootstrap: &str, batch: u64, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let file = pipeline_file(dir, bootstrap, batch)?;
    let checkpoint = CheckpointStore::open(&Checkpointing { location: dir.join("checkpoint").display().to_string(), options: BTreeMap::new(), retain: DEFAULT_RETAIN })?;
    let last_committed = || checkpoint.last_committed().ok().flatten();
    let log = dir.join("restart.log");
    let spawn = || -> anyhow::Result<std::process::Child> {
        Ok(Command::new(sluice)
            .arg("run")
            .arg(&file)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
            .spawn()?)
    };
    let mut child = spawn()?;
    let mut times = Vec::new();
    for _ in 0..rounds {
        let before = last_committed();
        if !wait_for(Duration::from_secs(120), || last_committed() > before) {
            let _ = child.kill();
            anyhow::bail!("the pipeline committed no batches in 2 minutes: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        let last = last_committed();
        let restarted = Instant::now();
        child = spawn()?;
        if !wait_for(Duration::from_secs(120), || last_committed() > last) {
            let _ = child.kill();
            anyhow::bail!("the restarted pipeline committed no batch in 2 minutes: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        times.push(restarted.elapsed());
    }
    child.kill()?;
    child.wait()?;
    Ok(times)
}

/// Produce the events to `broker`, measure, and print a table to `out`; the recovery part
/// starts `exes.sluice run`.
pub fn run_on(args: &CheckpointBenchArgs, broker: &dyn Broker, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<CheckpointBench> {
    if args.records == 0 || args.repeat == 0 || args.batch == 0 || args.partitions < 1 || args.restarts == 0 {
        anyhow::bail!("--records, --repeat, --batch, --partitions and --restarts must be at least 1");
    }
    if (args.records as u64).div_ceil(args.batch) < 2 * args.restarts as u64 + 1 {
        anyhow::bail!("{} restarts need at least {} batches of backlog; raise --records or lower --batch", args.restarts, 2 * args.restarts + 1);
    }
    broker.create_topic(TOPIC, args.partitions)?;
    produce(broker, args.partitions, args.records)?;
    let bootstrap = broker.bootstrap();
    let runtime = Runtime::new(sluice::runtime::default_cache_dir())?;
    let (mut off, mut on, mut batches) = (0.0_f64, 0.0_f64, 0);
    for rep in 0..args.repeat {
        for checkpoint in [false, true] {
            let dir = tempfile::tempdir()?;
            let name = format!("sluice-bench-checkpoint-{}-{rep}", if checkpoint { "on" } else { "off" });
            let p = pipeline(&name, &bootstrap, args.batch, dir.path(), checkpoint).check()?;
            let mut sink = sluice::sink::open(&p.sink, &p.kafka)?;
            let started = Instant::now();
            let summary = run(&p, &runtime, Until::AvailableNow, &Control::new(), sink.as_mut(), &mut |_| {})?;
            let rate = per_sec(summary.records, started.elapsed());
            anyhow::ensure!(summary.records == args.records as u64, "{name}: read {} of {} records", summary.records, args.records);
            batches = summary.batches;
            if checkpoint {
                on = on.max(rate);
            } else {
                off = off.max(rate);
            }
        }
    }
    let dir = tempfile::tempdir()?;
    let times = restarts(&exes.sluice, dir.path(), &bootstrap, args.batch, args.restarts)?;
    writeln!(
        out,
        "sluice-bench checkpoint: json-filter -> ad-clicks (WebAssembly) -> Parquet, {} events, {} partitions, batches of at most {} records ({batches} batches), best of {}",
        args.records, args.partitions, args.batch, args.repeat
    )?;
    writeln!(out, "| checkpointing | records/s | vs off |")?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(out, "| off | {off:.0} | 1.00× |")?;
    writeln!(out, "| every batch | {on:.0} | {:.3}× |", on / off)?;
    let shown: Vec<String> = times.iter().map(|t| format!("{:.0} ms", t.as_secs_f64() * 1000.0)).collect();
    writeln!(out, "restart after SIGKILL to first committed batch: {}", shown.join(", "))?;
    Ok(CheckpointBench { off_per_sec: off, on_per_sec: on, batches, restarts: times })
}

/// `sluice-bench checkpoint`: start Apache Kafka, run [`run_on`] with this executable, stop it.
pub fn run_bench(args: &CheckpointBenchArgs, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<CheckpointBench> {
    let broker = ApacheKafka::start()?;
    writeln!(out, "broker: {}", broker.describe())?;
    run_on(args, &broker, exes, out)
}
