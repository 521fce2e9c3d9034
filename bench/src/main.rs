//! The `sluice-bench` command line: each benchmark measures what it compares in one run
//! and prints a table; the broker benchmarks start Apache Kafka on loopback ports (after
//! `bash .ci/setup-tests`) and run `sluice` (next to this executable) as child processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_bench::Exes;

/// The same allocator as `sluice` (see its `main.rs`), so the pipelines measured in process
/// run as they do in the product.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice-bench", version, about = "sluice's benchmarks: each reports ratios measured in one run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Plugin throughput: WebAssembly vs the same plugin code compiled natively.
    Plugins(sluice_bench::BenchArgs),
    /// Whole pipelines on Apache Kafka (started on loopback ports): consume-only,
    /// then json-filter and ad-clicks, native and WebAssembly.
    Pipeline(sluice_bench::pipeline::PipelineBenchArgs),
    /// Checkpointing cost on Apache Kafka: throughput with a checkpoint per batch
    /// vs off, and the time from a restart after SIGKILL to the first committed batch.
    Checkpoint(sluice_bench::checkpoint::CheckpointBenchArgs),
    /// A 10× traffic burst against a pipeline of known capacity, with backpressure on and
    /// off, on Apache Kafka: per batch processing time / interval, lag, memory.
    Burst(sluice_bench::burst::BurstBenchArgs),
    /// The stall a live plugin swap causes, on Apache Kafka: per swap, time at the
    /// batch boundary and the new version's first batch against the median batch.
    Swap(sluice_bench::swap::SwapBenchArgs),
    /// Event → sink latency of a stateless pipeline (WebAssembly json-filter) at a fixed
    /// input rate with short batches, on Apache Kafka: p50, p90, p99, max.
    Latency(sluice_bench::latency::LatencyBenchArgs),
    /// The ad-click aggregation in sluice, natively over rdkafka, in Quix Streams and in
    /// Bytewax (from PyPI, into a virtual environment), on the same data on a real broker
    /// (Apache Kafka): records/s, wall time, peak RSS, and whether the closed windows match.
    Peers(sluice_bench::peers::PeersBenchArgs),
    /// The peers benchmark's native ceiling (run by it as a child process).
    #[command(hide = true)]
    Ceiling(sluice_bench::peers::CeilingArgs),
    /// The burst benchmark's paced producer (run by it as a child process).
    #[command(hide = true)]
    Produce(sluice_bench::burst::ProduceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmarks print their own progress.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sluice::progress=off"));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
    let out = &mut std::io::stdout();
    let result = match cli.command {
        Command::Plugins(args) => sluice_bench::run(&args, out).map(drop),
        Command::Pipeline(args) => sluice_bench::pipeline::run(&args, out).map(drop),
        Command::Burst(args) => Exes::beside_this().and_then(|exes| sluice_bench::burst::run(&args, &exes, out)).map(drop),
        Command::Swap(args) => Exes::beside_this().and_then(|exes| sluice_bench::swap::run_bench(&args, &exes, out)).map(drop),
        Command::Latency(args) => Exes::beside_this().and_then(|exes| sluice_bench::latency::run(&args, &exes, out)).map(drop),
        Command::Peers(args) => Exes::beside_this().and_then(|exes| sluice_bench::peers::run(&args, &exes, out)).map(drop),
        Command::Checkpoint(args) => Exes::beside_this().and_then(|exes| sluice_bench::checkpoint::run_bench(&args, &exes, out)).map(drop),
        Command::Ceiling(args) => sluice_bench::peers::ceiling(&args).map(drop),
        Command::Produce(args) => sluice_bench::burst::produce(&args).map(|sent| println!("{sent}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
