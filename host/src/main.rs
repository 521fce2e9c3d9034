//! The `sluice` command line. Parsing and printing only; the work is in the library.

use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use sluice::runtime::{Limits, LoadedPlugin, Runtime};
use sluice::{demo, offline};
use sluice_sdk::json::JsonRows;

/// glibc's allocator returns large buffers to the OS and faults them in again batch after
/// batch; mimalloc keeps them, which makes batch timings steady. Built without transparent
/// huge pages (`no_thp`): memory mimalloc gives back and takes again was faulted in 2 MiB
/// at a time, each zeroed; without them `sluice run` over 1 M events took 2.82 s instead
/// of 3.49 s (medians of 5 alternating runs; README "Against peers").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "WebAssembly-pluggable micro-batch stream processor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run ad events through the example plugins and print windows as they close.
    Demo(DemoArgs),
    /// Run a pipeline until SIGINT/SIGTERM (the batch in flight is finished first).
    Run {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
        /// Process what the topics hold now, flush open windows, and exit
        /// (Spark's Trigger.AvailableNow).
        #[arg(long)]
        available_now: bool,
        /// Resume from the checkpoint's offsets but start the plugins with fresh state
        /// (when a new plugin version cannot read the old state).
        #[arg(long)]
        ignore_state: bool,
        /// Plugin directory for steps given by `name` (overrides `pluginDir`). It is
        /// watched: a new `<name>.wasm` or `<name>.toml` is swapped in live.
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Serve the dashboard (/), Prometheus metrics (/metrics) and progress records
        /// (/progress) on this address, e.g. 127.0.0.1:4040 (port 0: any free port).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Inspect checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Check a pipeline file and its plugins without connecting to Kafka.
    Check {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
        /// Plugin directory for steps given by `name` (overrides `pluginDir`).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// List the checkpoints of a location: batches, offsets, plugin versions, sizes.
    Show {
        /// Checkpoint location: a directory or an object-store URL (cloud credentials come
        /// from the environment).
        location: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's name, version, kind, state version and output schema.
    Inspect {
        /// Plugin file (.wasm), or builtin:json-filter / builtin:ad-clicks.
        plugin: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a plugin over a JSON-lines file without Kafka and print its output rows.
    Test(TestArgs),
}

#[derive(Args)]
struct LimitArgs {
    /// Memory cap per plugin instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = Limits::DEFAULT_MEMORY_BYTES / (1024 * 1024))]
    memory_mb: usize,
    /// Time budget per plugin call (e.g. 500ms, 10s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// Largest output of one call, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = Limits::DEFAULT_MAX_OUTPUT_BYTES / (1024 * 1024))]
    max_output_mb: usize,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        if self.memory_mb == 0 {
            bail!("--memory-mb must be at least 1");
        }
        if self.call_timeout.is_zero() {
            bail!("--call-timeout must be longer than zero");
        }
        if self.max_output_mb == 0 {
            bail!("--max-output-mb must be at least 1");
        }
        Ok(Limits { memory_bytes: self.memory_mb * 1024 * 1024, call_timeout: self.call_timeout, max_output_bytes: self.max_output_mb * 1024 * 1024 })
    }
}

#[derive(Args)]
struct TestArgs {
    /// Plugin file (.wasm), or builtin:json-filter / builtin:ad-clicks.
    plugin: String,
    /// JSON-lines input: each line is one record value. `-` reads standard input.
    #[arg(long, short)]
    input: PathBuf,
    /// Plugin configuration: inline JSON, or a .json or .toml file.
    #[arg(long, short)]
    config: Option<String>,
    /// Records per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// How long to run (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events per second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Batch interval (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Event-time seconds per wall-clock second, so one-minute windows close quickly.
    #[arg(long, default_value_t = 10)]
    speedup: u64,
    /// Address of the dashboard, metrics and progress server (port 0: any free port;
    /// when the default port is taken, any free port is used).
    #[arg(long, value_name = "ADDR", default_value = demo::DEFAULT_HTTP)]
    http: String,
    /// Do not start the HTTP server.
    #[arg(long, conflicts_with = "http")]
    no_http: bool,
}

/// Whether a person watches: stderr is a terminal. Then `sluice run` prints a progress
/// line per batch; otherwise each batch's progress record is logged instead.
fn interactive() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Progress records (`sluice::progress`) are logged when nobody watches a terminal, except
    // for the demo, which prints its own.
    let own_progress = matches!(cli.command, Command::Demo(_));
    let default_filter = if interactive() || own_progress { "info,sluice::progress=off" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.command {
        Command::Plugin(PluginCommand::Inspect { plugin, json }) => inspect(&plugin, json),
        Command::Plugin(PluginCommand::Test(args)) => test(args),
        Command::Demo(args) => run_demo(args),
        Command::Check { pipeline, plugin_dir } => check(&pipeline, plugin_dir),
        Command::Run { pipeline, available_now, ignore_state, plugin_dir, http } => run(&pipeline, available_now, ignore_state, plugin_dir, http),
        Command::Checkpoint(CheckpointCommand::Show { location, json }) => show_checkpoints(&location, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and the causes under it, each once: a cause whose text an error above it already
/// shows (the library's errors name their cause in their own message) is not repeated.
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let line = cause.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
    }
    text
}

fn load(runtime: &Runtime, plugin: &str, limits: Limits) -> anyhow::Result<LoadedPlugin> {
    Ok(runtime.load_spec(plugin, limits)?)
}

fn inspect(plugin: &str, json: bool) -> anyhow::Result<()> {
    let runtime = Runtime::with_default_cache()?;
    let loaded = load(&runtime, plugin, Limits::default())?;
    let info = loaded.info();
    let kind = match info.kind {
        sluice_sdk::PluginKind::Transform => "transform",
        sluice_sdk::PluginKind::Aggregate => "aggregate",
    };
    let columns: Vec<_> =
        info.output_schema.fields().iter().map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()})).collect();
    let mut out = std::io::stdout().lock();
    if json {
        let doc = serde_json::json!({
            "name": info.name, "version": info.version, "description": info.description, "kind": kind,
            "state_version": info.state_version, "content_hash": info.content_hash, "output_schema": columns,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(out, "name:          {}", info.name)?;
        writeln!(out, "version:       {}", info.version)?;
        writeln!(out, "description:   {}", info.description)?;
        writeln!(out, "kind:          {kind}")?;
        writeln!(out, "state version: {}", info.state_version)?;
        writeln!(out, "content hash:  sha256:{}", info.content_hash)?;
        writeln!(out, "output schema (default config):")?;
        for f in info.output_schema.fields() {
            writeln!(out, "  {:<14} {}{}", f.name(), f.data_type(), if f.is_nullable() { " (nullable)" } else { "" })?;
        }
    }
    Ok(())
}

/// `--config`: inline JSON, or a path to a .json / .toml file, as JSON text.
fn read_config(arg: Option<&str>) -> anyhow::Result<String> {
    let Some(arg) = arg else { return Ok("{}".into()) };
    let trimmed = arg.trim_start();
    if trimmed.starts_with('{') {
        serde_json::from_str::<serde_json::Value>(arg).context("--config is not valid JSON")?;
        return Ok(arg.to_string());
    }
    let path = PathBuf::from(arg);
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config `{arg}` is neither inline JSON (starting with `{{`) nor a readable file"))?;
    if path.extension().is_some_and(|e| e == "toml") {
        let value: toml::Value = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        return Ok(serde_json::to_string(&value)?);
    }
    serde_json::from_str::<serde_json::Value>(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(text)
}

struct PrintSink<W: Write> {
    out: W,
    error: Option<std::io::Error>,
}

impl<W: Write> offline::Sink for PrintSink<W> {
    fn rows(&mut self, rows: &JsonRows) {
        if let Err(e) = self.out.write_all(rows.text()) {
            self.error.get_or_insert(e);
        }
    }

    fn rejected(&mut self, line: u64, reason: &str) {
        eprintln!("line {line}: rejected: {reason}");
    }
}

fn test(args: TestArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let config = read_config(args.config.as_deref())?;
    let runtime = Runtime::with_default_cache()?;
    let loaded = load(&runtime, &args.plugin, args.limits.limits()?)?;
    let mut instance = loaded.instantiate(&config)?;
    let input: Box<dyn std::io::BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.input).with_context(|| format!("cannot open --input {}", args.input.display()))?;
        Box::new(BufReader::new(file))
    };
    let mut sink = PrintSink { out: std::io::BufWriter::new(std::io::stdout().lock()), error: None };
    let summary = offline::run(&mut instance, input, args.batch_size, &mut sink)?;
    sink.out.flush()?;
    if let Some(e) = sink.error {
        return Err(e).context("cannot write to stdout");
    }
    eprintln!(
        "{}: {} records in {} batches -> {} rows; {} rejected, {} late, {} blank lines skipped",
        instance.info().name,
        summary.records,
        summary.batches,
        summary.output_rows,
        summary.rejected,
        summary.late,
        summary.blank_lines
    );
    Ok(())
}

/// Load a pipeline file, with the plugin directory given on the command line if any.
fn load_pipeline(path: &std::path::Path, plugin_dir: Option<PathBuf>) -> anyhow::Result<sluice::config::CheckedPipeline> {
    let pipeline = sluice::config::Pipeline::load(path)?;
    Ok(match plugin_dir {
        Some(dir) => pipeline.change(|p| p.plugin_dir = Some(dir))?,
        None => pipeline,
    })
}

fn check(path: &std::path::Path, plugin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use sluice::config::{Sink, StartingOffsets};
    let pipeline = load_pipeline(path, plugin_dir)?;
    let runtime = Runtime::with_default_cache()?;
    let chain = sluice::pipeline::build_chain(&pipeline, &runtime)?;
    let mut out = std::io::stdout().lock();
    let s = &pipeline.source;
    writeln!(out, "pipeline {}: OK", pipeline.name)?;
    writeln!(
        out,
        "  source   {} ({}, group {}{})",
        s.topics.join(", "),
        match s.starting_offsets {
            StartingOffsets::Latest => "latest",
            StartingOffsets::Earliest => "earliest",
        },
        s.group_id,
        s.max_offsets_per_trigger.map(|n| format!(", at most {n} records per batch")).unwrap_or_default()
    )?;
    writeln!(out, "  brokers  {}", pipeline.kafka["bootstrap.servers"])?;
    writeln!(out, "  trigger  every {}", humantime::format_duration(pipeline.trigger_interval))?;
    let steps: Vec<String> = chain.stages().map(|s| format!("{} {} ({})", s.name(), s.version(), format!("{:?}", s.kind()).to_lowercase())).collect();
    writeln!(out, "  plugins  {}", steps.join(" -> "))?;
    if let Some(dir) = pipeline.plugin_dir.as_ref().filter(|_| pipeline.steps.iter().any(|s| matches!(s.source, sluice::config::PluginSource::Dir(_)))) {
        writeln!(out, "  plugin directory {} (watched while running: new versions are swapped in live)", dir.display())?;
    }
    let describe = |sink: &Sink| match sink {
        Sink::Parquet { path, compression, .. } => format!("parquet {path} ({compression:?})"),
        Sink::Jsonl { path } => format!("jsonl {path}"),
        Sink::Kafka { topic, delivery: sluice::config::Delivery::AtLeastOnce } => format!("kafka topic {topic} (at least once)"),
        Sink::Kafka { topic, delivery: sluice::config::Delivery::ExactlyOnce { transactional_id } } => {
            format!("kafka topic {topic} (exactly once for read_committed consumers; transactional.id {transactional_id})")
        }
    };
    writeln!(out, "  sink     {}", describe(&pipeline.sink))?;
    match &pipeline.dead_letter {
        Some(d) => writeln!(out, "  dead letters {}", describe(d))?,
        None => writeln!(out, "  dead letters off: rejected records are only logged")?,
    }
    match &pipeline.checkpoint {
        Some(c) => writeln!(out, "  checkpoint {} (keeps the newest {})", c.location, c.retain)?,
        None => writeln!(out, "  checkpoint off: restarts resume from the consumer group's offsets, at least once")?,
    }
    Ok(())
}

/// A control channel that SIGINT and SIGTERM stop (the loop finishes its batch and
/// returns) and SIGHUP retunes (live tuning).
fn control_by_signals() -> anyhow::Result<sluice::control::Control> {
    let control = sluice::control::Control::new();
    control.on_signals().context("cannot install the signal handlers")?;
    Ok(control)
}

fn run(path: &std::path::Path, available_now: bool, ignore_state: bool, plugin_dir: Option<PathBuf>, http: Option<String>) -> anyhow::Result<()> {
    use sluice::pipeline::{RunOptions, Until};
    let pipeline = load_pipeline(path, plugin_dir)?;
    let group = pipeline.source.assignment == sluice::config::Assignment::Group;
    // In a consumer group every task opens its own view of the sink.
    let mut sink = if group { None } else { Some(sluice::sink::open(&pipeline.sink, &pipeline.kafka).with_context(|| path.display().to_string())?) };
    let control = control_by_signals()?;
    let runtime = Runtime::with_default_cache()?;
    let until = if available_now { Until::AvailableNow } else { Until::Stopped };
    if ignore_state && pipeline.checkpoint.is_none() {
        bail!("--ignore-state needs checkpointing, which {} turns off", path.display());
    }
    // SIGHUP: read the pipeline file again and apply its rate settings (live tuning).
    let mut options = RunOptions { until, ignore_state, retune_from: Some(path.to_path_buf()), ..RunOptions::default() };
    let _server = match http {
        Some(addr) => {
            let observed = sluice::http::Observed::new(&pipeline.name);
            options.observers = observed.observers();
            let server = sluice::http::Server::start(&addr, observed)?;
            eprintln!("{}: dashboard at {} (metrics at {}metrics)", pipeline.name, server.url(), server.url());
            Some(server)
        }
        None => None,
    };
    let interactive = interactive();
    let mut report = |p: &sluice::pipeline::BatchProgress| {
        for r in &p.rejected {
            tracing::warn!("rejected {}/{}@{} by {} {}: {}", r.topic, r.partition, r.offset, r.plugin, r.version, r.reason);
        }
        if !interactive {
            return;
        }
        eprintln!(
            "batch {} | {} records | {:.0} records/s processed | {:.1} ms | {} rows out | lag {} | watermark {}",
            p.batch_id,
            p.records,
            p.processed_per_sec,
            p.duration.as_secs_f64() * 1000.0,
            p.output_rows,
            p.lag,
            p.watermark_ms.map(|w| if w == i64::MAX { "end".to_string() } else { w.to_string() }).unwrap_or_else(|| "-".into())
        );
    };
    let summary = match sink.as_mut() {
        Some(sink) => sluice::pipeline::run(&pipeline, &runtime, options, &control, sink.as_mut(), &mut report)?,
        None => sluice::pipeline::run_group(&pipeline, &runtime, options, &control, &mut report)?,
    };
    eprintln!(
        "{}: stopped after {} batches: {} records in, {} rows out, {} rejected; plugin versions swapped in: {}, refused: {}",
        pipeline.name, summary.batches, summary.records, summary.output_rows, summary.rejected, summary.swaps, summary.swaps_failed
    );
    Ok(())
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.interval.is_zero() || args.speedup == 0 {
        bail!("--rate, --interval and --speedup must be greater than zero");
    }
    let http = (!args.no_http).then_some(args.http);
    let options = demo::DemoOptions { duration: args.duration, rate: args.rate, interval: args.interval, speedup: args.speedup, http };
    let mut out = std::io::stdout().lock();
    let mut progress = std::io::stderr().lock();
    demo::run(&options, control_by_signals()?, &mut out, &mut progress)?;
    Ok(())
}

fn show_checkpoints(location: &str, json: bool) -> anyhow::Result<()> {
    use sluice::checkpoint::CheckpointStore;
    use sluice::config::{Assignment, Checkpointing, DEFAULT_RETAIN};
    if !location.contains("://") && !std::path::Path::new(location).is_dir() {
        bail!("{location}: no such directory");
    }
    let store = CheckpointStore::open(&Checkpointing { location: location.into(), options: Default::default(), retain: DEFAULT_RETAIN })?;
    let Some(metadata) = store.metadata()? else { bail!("{location} holds no sluice checkpoint (no `metadata`)") };
    // A consumer-group run keeps a checkpoint location per task under the top one.
    let stores: Vec<(Option<String>, CheckpointStore)> = match metadata.assignment {
        Assignment::All => vec![(None, store)],
        Assignment::Group => store.tasks()?.into_iter().map(|(topic, partition)| (Some(format!("{topic}/{partition}")), store.task(&topic, partition))).collect(),
    };
    let mut out = std::io::stdout().lock();
    if json {
        let mut tasks = Vec::new();
        for (name, store) in &stores {
            let (checkpoints, pending) = checkpoints_json(store)?;
            tasks.push(serde_json::json!({"task": name, "checkpoints": checkpoints, "planned_not_committed": pending}));
        }
        let doc = match metadata.assignment {
            Assignment::All => {
                let only = tasks.pop().expect("one location");
                serde_json::json!({"location": location, "metadata": metadata, "checkpoints": only["checkpoints"], "planned_not_committed": only["planned_not_committed"]})
            }
            Assignment::Group => serde_json::json!({"location": location, "metadata": metadata, "tasks": tasks}),
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    writeln!(out, "checkpoint {location}: pipeline {}, topics {}, format {}", metadata.pipeline, metadata.topics.join(", "), metadata.format_version)?;
    if metadata.assignment == Assignment::Group {
        writeln!(out, "a consumer-group run (source.assignment = \"group\"): {} tasks", stores.len())?;
    }
    for (name, store) in &stores {
        if let Some(name) = name {
            writeln!(out, "\ntask {name}, owned in epoch {}", store.owner_epoch()?)?;
        }
        print_checkpoints(&mut out, store)?;
    }
    Ok(())
}

fn when(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// The checkpoints of one location and its planned batches without a commit, as JSON.
fn checkpoints_json(store: &sluice::checkpoint::CheckpointStore) -> anyhow::Result<(Vec<serde_json::Value>, Vec<u64>)> {
    let (listed, pending) = store.list()?;
    let checkpoints = listed
        .iter()
        .map(|l| match &l.content {
            Ok(c) => serde_json::json!({
                "batch_id": l.batch_id, "bytes": l.bytes, "committed": l.committed, "created": when(c.created_ms),
                "tasks": c.tasks.iter().map(|t| serde_json::json!({
                    "task": t.task, "watermark_ms": t.watermark_ms,
                    "positions": t.positions,
                    "plugins": t.plugins.iter().map(|p| serde_json::json!({
                        "name": p.identity.name, "version": p.identity.version, "content_hash": p.identity.content_hash,
                        "state_version": p.identity.state_version, "state_bytes": p.state.as_ref().map(|s| s.len()),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
            Err(why) => serde_json::json!({"batch_id": l.batch_id, "bytes": l.bytes, "committed": l.committed, "error": why}),
        })
        .collect();
    Ok((checkpoints, pending))
}

/// The checkpoints of one location and its planned batches without a commit, as text.
fn print_checkpoints(out: &mut impl Write, store: &sluice::checkpoint::CheckpointStore) -> anyhow::Result<()> {
    let (listed, pending) = store.list()?;
    if listed.is_empty() {
        writeln!(out, "no checkpoints yet")?;
    }
    for l in &listed {
        let status = if l.committed { "committed" } else { "NOT committed" };
        match &l.content {
            Err(why) => writeln!(out, "batch {}  {} bytes  {status}  UNREADABLE: {why}", l.batch_id, l.bytes)?,
            Ok(c) => {
                writeln!(out, "batch {}  {} bytes  {status}  written {}", l.batch_id, l.bytes, when(c.created_ms))?;
                for t in &c.tasks {
                    let watermark = t.watermark_ms.map(|w| if w == i64::MAX { "end".to_string() } else { when(w) }).unwrap_or_else(|| "-".into());
                    let positions: Vec<String> = t.positions.iter().map(|p| format!("{}/{}@{}", p.topic, p.partition, p.next)).collect();
                    writeln!(out, "  task {}  watermark {watermark}  next offsets {}", t.task, positions.join(" "))?;
                    for p in &t.plugins {
                        let state = p.state.as_ref().map(|s| format!("{} bytes of state", s.len())).unwrap_or_else(|| "stateless".into());
                        let hash = &p.identity.content_hash[..p.identity.content_hash.len().min(12)];
                        writeln!(out, "    {} {} (sha256:{hash}…, state version {}): {state}", p.identity.name, p.identity.version, p.identity.state_version)?;
                    }
                }
            }
        }
    }
    if !pending.is_empty() {
        let ids: Vec<String> = pending.iter().map(u64::to_string).collect();
        writeln!(out, "planned but not committed (replayed on restart): batch {}", ids.join(", "))?;
    }
    Ok(())
}
