//! `sluice-bench peers`: the seed's ad-click aggregation in sluice and in the tools people
//! use today, on the same broker and data, one after another.
//!
//! It starts Apache Kafka, produces seed-style events keyed (and partitioned) by `campaign_id`,
//! and runs, each as a child process so its peak memory is its own:
//! * sluice: `sluice run --available-now` over a pipeline file with the WebAssembly
//!   ad-clicks plugin (batches of at most 100 000 records, checkpoints on);
//! * native: the same aggregation code (the ad-clicks crate) compiled into a plain
//!   rdkafka consumer loop (`sluice-bench ceiling`, hidden) — the ceiling;
//! * Quix Streams and Bytewax, installed from PyPI into a virtual environment, with
//!   60 s / 10 s hopping windows, count, sum and distinct users (`peers/*.py`).
//!
//! Each reports records/s (records / the child's wall time, start-up included), wall time
//! and peak RSS (`wait4`'s `ru_maxrss`). Outputs are compared on the windows every
//! system's watermark has closed: windows ending at or before the lowest partition's
//! highest event time minus the 60 s delay, minus one slide.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sluice_sdk::Aggregate;

use crate::broker::ApacheKafka;
use crate::Exes;
use sluice::broker::Broker;
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing, TUNED_DEFAULTS};

const QUIX_APP: &str = include_str!("peers/quix_app.py");
const BYTEWAX_APP: &str = include_str!("peers/bytewax_app.py");

/// The PyPI packages installed into the virtual environment, pinned.
pub const PYTHON_PACKAGES: [&str; 2] = ["quixstreams==3.28.1", "bytewax==0.21.1"];

const TOPIC: &str = "sluice-bench-peers";
const SLIDE_MS: i64 = 10_000;
const DELAY_MS: i64 = 60_000;

/// Options of `sluice-bench peers`.
#[derive(Debug, Clone, clap::Args)]
pub struct PeersBenchArgs {
    /// Events produced.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: usize,
    /// Partitions of the topic (events go to `campaign number % partitions`).
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Events per second of event time (the generator's; 1 M events span 200 s by default).
    #[arg(long, default_value_t = 5_000)]
    pub event_time_rate: u64,
    /// Virtual environment for Quix Streams and Bytewax (created with `python3 -m venv`
    /// and filled from PyPI when missing).
    #[arg(long, default_value = "target/peers-venv")]
    pub venv: PathBuf,
    /// Systems to run, comma-separated, from sluice, native, quix, bytewax.
    #[arg(long, value_delimiter = ',', default_value = "sluice,native,quix,bytewax")]
    pub systems: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Use this broker (`host:port`) instead of starting Apache Kafka; the topic
    /// `sluice-bench-peers` must not exist yet.
    #[arg(long)]
    pub bootstrap: Option<String>,
}

/// Options of `sluice-bench ceiling` (hidden): the native ad-clicks over rdkafka.
#[derive(Debug, Clone, clap::Args)]
pub struct CeilingArgs {
    /// The topic to read from the beginning.
    #[command(flatten)]
    pub source: super::TopicArgs,
    /// Stop after this many records.
    #[arg(long)]
    pub records: u64,
    /// Closed windows go here, as JSON lines.
    #[arg(long)]
    pub out: PathBuf,
}

/// One system's run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerResult {
    /// sluice, native, Quix Streams or Bytewax.
    pub system: String,
    /// Records / wall time.
    pub records_per_sec: f64,
    /// The child's wall time, seconds.
    pub wall_seconds: f64,
    /// Its peak resident memory, MiB.
    pub peak_rss_mib: f64,
    /// Closed windows compared.
    pub windows: usize,
    /// Whether those equal sluice's (`None` for sluice itself).
    pub matches_sluice: Option<bool>,
}

/// A closed window: (start, campaign) → (end, clicks, total cost, distinct users).
type Windows = BTreeMap<(i64, String), (i64, u64, f64, u64)>;

/// The native ceiling: poll every record with a plain rdkafka consumer and aggregate it
/// with the ad-clicks code; closed windows go to `args.out`. The watermark moves once,
/// after the last record: librdkafka reads partitions unevenly, and a watermark taken
/// from a partition that ran ahead would drop a slower partition's records as late.
pub fn ceiling(args: &CeilingArgs) -> anyhow::Result<u64> {
    let mut config = ClientConfig::new();
    let source = &args.source;
    config.set("bootstrap.servers", &source.bootstrap).set("group.id", "sluice-bench-ceiling").set("enable.auto.commit", "false");
    for (k, v) in TUNED_DEFAULTS {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..source.partitions {
        assignment.add_partition_offset(&source.topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut clicks = ad_clicks::AdClicks::new(ad_clicks::Config::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = BufWriter::new(std::fs::File::create(&args.out)?);
    let mut write_error = None;
    let mut close = |clicks: &mut ad_clicks::AdClicks| {
        clicks.close_windows(None, |w, campaign, t| {
            let row = serde_json::json!({"window_start": w.start, "window_end": w.end, "campaign_id": campaign,
                "clicks": t.clicks(), "total_cost": t.total_cost(), "unique_users": t.unique_users()});
            if let Err(e) = writeln!(out, "{row}") {
                write_error.get_or_insert(e);
            }
        });
    };
    let mut seen = 0u64;
    while seen < args.records {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(m)) => {
                if let Some(value) = m.payload() {
                    let _ = clicks.add_json(value);
                }
                seen += 1;
            }
            Some(Err(e)) => anyhow::bail!("reading {}: {e}", source.topic),
            None => anyhow::bail!("no record for 30 s after {seen} of {}", args.records),
        }
    }
    close(&mut clicks);
    if let Some(e) = write_error {
        return Err(e.into());
    }
    out.flush()?;
    Ok(seen)
}

/// Produce `n` events keyed and partitioned by campaign; returns the lowest partition's
/// highest event time.
fn produce(broker: &dyn Broker, partitions: i32, n: usize, event_time_rate: u64) -> anyhow::Result<i64> {
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: event_time_rate.max(1), ..EventSpec::default() });
    let loader = Loader::connect(&broker.bootstrap(), &[])?;
    let mut highest = vec![i64::MIN; partitions as usize];
    for _ in 0..n {
        let e = gen.next_event();
        let value = serde_json::to_vec(&e)?;
        let campaign: i32 = e.campaign_id.trim_start_matches("campaign-").parse().unwrap_or(0);
        let partition = campaign % partitions;
        highest[partition as usize] = highest[partition as usize].max(e.timestamp);
        loader.send(TOPIC, Outgoing { partition: Some(partition), key: Some(e.campaign_id.as_bytes()), value: Some(&value), headers: &[] })?;
    }
    loader.flush(Duration::from_secs(300))?;
    Ok(highest.into_iter().filter(|&h| h > i64::MIN).min().unwrap_or(i64::MIN))
}

/// Run `command`, wait for it with `wait4`: wall time and peak RSS (MiB).
fn measure(command: &mut Command, what: &str) -> anyhow::Result<(Duration, f64)> {
    let started = Instant::now();
    let child = command.spawn().map_err(|e| anyhow::anyhow!("cannot start {what}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: as above.
        if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        anyhow::ensure!(error.kind() == std::io::ErrorKind::Interrupted, "waiting for {what}: {error}");
    }
    let wall = started.elapsed();
    anyhow::ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{what} failed (wait status {status}); its output is above");
    Ok((wall, usage.ru_maxrss as f64 / 1024.0))
}

/// The virtual environment's python, set up on first use.
fn python(venv: &Path, out: &mut dyn Write) -> anyhow::Result<PathBuf> {
    let python = venv.join("bin/python");
    let ready = venv.join(".sluice-packages");
    if std::fs::read_to_string(&ready).is_ok_and(|s| s == PYTHON_PACKAGES.join(" ")) {
        return Ok(python);
    }
    writeln!(out, "setting up {} with {} from PyPI", venv.display(), PYTHON_PACKAGES.join(", "))?;
    let status = Command::new("python3").args(["-m", "venv"]).arg(venv).status().map_err(|e| anyhow::anyhow!("cannot run python3 to create {}: {e}", venv.display()))?;
    anyhow::ensure!(status.success(), "python3 -m venv {} failed", venv.display());
    let status = Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(PYTHON_PACKAGES).status()?;
    anyhow::ensure!(status.success(), "pip install {} failed", PYTHON_PACKAGES.join(" "));
    std::fs::write(&ready, PYTHON_PACKAGES.join(" "))?;
    Ok(python)
}

/// Closed windows from JSON-lines files, those ending by `limit`.
fn read_windows(files: &[PathBuf], limit: i64) -> anyhow::Result<Windows> {
    let mut windows = Windows::new();
    for file in files {
        for line in std::fs::read_to_string(file)?.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: {e}: {line}", file.display()))?;
            let (start, end) = (v["window_start"].as_i64().unwrap_or_default(), v["window_end"].as_i64().unwrap_or_default());
            if end > limit {
                continue;
            }
            let row = (end, v["clicks"].as_u64().unwrap_or_default(), v["total_cost"].as_f64().unwrap_or(f64::NAN), v["unique_users"].as_u64().unwrap_or_default());
            let key = (start, v["campaign_id"].as_str().unwrap_or_default().to_string());
            anyhow::ensure!(windows.insert(key.clone(), row).is_none(), "{}: window {key:?} twice", file.display());
        }
    }
    Ok(windows)
}

fn same(a: &Windows, b: &Windows) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, (ea, ca, sa, ua)), (kb, (eb, cb, sb, ub)))| ka == kb && ea == eb && ca == cb && ua == ub && (sa - sb).abs() <= 1e-6 * sa.abs().max(1.0))
}

fn jsonl_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect();
    files.sort();
    Ok(files)
}

fn pipeline_file(dir: &Path, bootstrap: &str) -> anyhow::Result<PathBuf> {
    let file = dir.join("sluice-peers.toml");
    let text = format!(
        r#"name = "sluice-bench-peers"
[source]
topics = ["{TOPIC}"]
startingOffsets = "earliest"
maxOffsetsPerTrigger = 100000
groupId = "sluice-bench-peers"
[trigger]
processingTime = "1ms"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[plugin]]
builtin = "ad-clicks"
[sink]
format = "jsonl"
path = "{}"
[checkpoint]
location = "{}"
"#,
        dir.join("sluice-out").display(),
        dir.join("sluice-checkpoints").display()
    );
    std::fs::write(&file, text)?;
    Ok(file)
}

/// Run the systems on `broker` (the topic must not exist) and print the table to `out`.
pub fn run_on(args: &PeersBenchArgs, broker: &dyn Broker, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<PeerResult>> {
    anyhow::ensure!(args.records > 0 && args.partitions > 0, "--records and --partitions must be above zero");
    for s in &args.systems {
        anyhow::ensure!(["sluice", "native", "quix", "bytewax"].contains(&s.as_str()), "--systems: `{s}` is not one of sluice, native, quix, bytewax");
    }
    anyhow::ensure!(args.systems.iter().any(|s| s == "sluice"), "--systems must include sluice: the others are compared with it");
    let dir = tempfile::tempdir()?;
    broker.create_topic(TOPIC, args.partitions)?;
    let lowest_high = produce(broker, args.partitions, args.records, args.event_time_rate)?;
    let limit = lowest_high - DELAY_MS - SLIDE_MS;
    writeln!(out, "produced {} events to {TOPIC} ({} partitions, keyed by campaign_id); comparing windows that end by {limit} (event time)", args.records, args.partitions)?;
    let bootstrap = broker.bootstrap();
    let python = if args.systems.iter().any(|s| s == "quix" || s == "bytewax") { Some(python(&args.venv, out)?) } else { None };
    let n = args.records.to_string();
    let mut results: Vec<PeerResult> = Vec::new();
    let mut outputs: Vec<Windows> = Vec::new();
    for system in &args.systems {
        let (name, (wall, rss), files) = match system.as_str() {
            "sluice" => {
                let file = pipeline_file(dir.path(), &bootstrap)?;
                let m = measure(Command::new(&exes.sluice).args(["run", "--available-now"]).arg(&file).env("SLUICE_LOG", "warn"), "sluice run")?;
                ("sluice (WASM ad-clicks)", m, jsonl_files(&dir.path().join("sluice-out"))?)
            }
            "native" => {
                let file = dir.path().join("native.jsonl");
                let m = measure(
                    Command::new(&exes.bench)
                        .args(["ceiling", "--bootstrap", &bootstrap, "--topic", TOPIC, "--partitions", &args.partitions.to_string(), "--records", &n, "--out"])
                        .arg(&file),
                    "the native ceiling",
                )?;
                ("native Rust over rdkafka", m, vec![file])
            }
            "quix" => {
                let (script, file) = (dir.path().join("quix_app.py"), dir.path().join("quix.jsonl"));
                std::fs::write(&script, QUIX_APP)?;
                let m = measure(
                    Command::new(python.as_ref().expect("python set up"))
                        .arg(&script)
                        .args([&bootstrap, TOPIC, &n])
                        .arg(&file)
                        .arg(dir.path().join("quix-state"))
                        .stdout(std::process::Stdio::null()),
                    "Quix Streams",
                )?;
                ("Quix Streams", m, vec![file])
            }
            _ => {
                let (script, file) = (dir.path().join("bytewax_app.py"), dir.path().join("bytewax.jsonl"));
                std::fs::write(&script, BYTEWAX_APP)?;
                let m = measure(Command::new(python.as_ref().expect("python set up")).arg(&script).args([&bootstrap, TOPIC]).arg(&file), "Bytewax")?;
                ("Bytewax", m, vec![file])
            }
        };
        let windows = read_windows(&files, limit)?;
        let result = PeerResult {
            system: name.to_string(),
            records_per_sec: args.records as f64 / wall.as_secs_f64(),
            wall_seconds: wall.as_secs_f64(),
            peak_rss_mib: rss,
            windows: windows.len(),
            // Set below, once sluice has run, whichever order the systems ran in.
            matches_sluice: None,
        };
        writeln!(
            out,
            "{}: {:.0} records/s, {:.2} s, peak RSS {:.0} MiB, {} closed windows",
            result.system, result.records_per_sec, result.wall_seconds, result.peak_rss_mib, result.windows
        )?;
        if system == "sluice" {
            anyhow::ensure!(!windows.is_empty(), "sluice closed no window: produce more events (--records)");
        }
        results.push(result);
        outputs.push(windows);
    }
    let reference = &outputs[results.iter().position(|r| r.system.starts_with("sluice")).expect("sluice is among the systems")];
    for (r, windows) in results.iter_mut().zip(&outputs) {
        if !r.system.starts_with("sluice") {
            r.matches_sluice = Some(same(reference, windows));
        }
    }
    writeln!(out, "\n| system | records/s | wall time (s) | peak RSS (MiB) | closed windows | output = sluice's |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---|")?;
    for r in &results {
        let matched = r.matches_sluice.map_or("(reference)", |m| if m { "yes" } else { "NO" });
        writeln!(out, "| {} | {:.0} | {:.2} | {:.0} | {} | {matched} |", r.system, r.records_per_sec, r.wall_seconds, r.peak_rss_mib, r.windows)?;
    }
    let sluice = results.iter().find(|r| r.system.starts_with("sluice")).map(|r| r.records_per_sec).unwrap_or_default();
    for r in results.iter().filter(|r| !r.system.starts_with("sluice")) {
        writeln!(out, "sluice / {}: {:.2}× ({})", r.system, sluice / r.records_per_sec, target_of(&r.system))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    if let Some(path) = &args.csv {
        let mut csv = String::from("system,records_per_sec,wall_seconds,peak_rss_mib,closed_windows,matches_sluice\n");
        for r in &results {
            csv.push_str(&format!(
                "{},{:.0},{:.3},{:.1},{},{}\n",
                r.system,
                r.records_per_sec,
                r.wall_seconds,
                r.peak_rss_mib,
                r.windows,
                r.matches_sluice.map_or(String::new(), |m| m.to_string())
            ));
        }
        std::fs::write(path, csv)?;
    }
    Ok(results)
}

fn target_of(system: &str) -> &'static str {
    match system {
        "native Rust over rdkafka" => "target ≥ 0.85×",
        "Quix Streams" => "target ≥ 100×",
        "Bytewax" => "target ≥ 10×",
        _ => "",
    }
}

/// `sluice-bench peers`: start Apache Kafka (unless `--bootstrap` is given), run [`run_on`], stop the broker.
pub fn run(args: &PeersBenchArgs, exes: &Exes, out: &mut dyn Write) -> anyhow::Result<Vec<PeerResult>> {
    match &args.bootstrap {
        Some(bootstrap) => run_on(args, &crate::broker::External(bootstrap.clone()), exes, out),
        None => {
            let broker = ApacheKafka::start()?;
            writeln!(out, "broker: {}", broker.describe())?;
            run_on(args, &broker, exes, out)
        }
    }
}
