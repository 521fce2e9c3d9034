//! sluice's benchmarks, out of the product: `sluice-bench plugins` (WebAssembly vs native on
//! in-memory batches), `pipeline`, `checkpoint`, `burst`, `swap`, `latency` and `peers` (on
//! Apache Kafka, which [`broker`] starts). Each measures everything it compares in one run
//! and reports ratios.

pub mod broker;
pub mod burst;
pub mod checkpoint;
pub mod latency;
pub mod peers;
pub mod pipeline;
pub mod plugins;
pub mod swap;

use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sluice_sdk::testing::{Driver, Harness};
use sluice_sdk::{Context, Finished, PluginKind};

use sluice::chain::Stage;
use sluice::checkpoint::PluginIdentity;
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::runtime::CallError;

pub use plugins::{run, BenchArgs, BenchRow};

/// The executables a benchmark starts as child processes: `sluice` (the pipelines under
/// test, `sluice run`) and `sluice-bench` (its hidden `produce` and `ceiling` commands).
#[derive(Debug, Clone)]
pub struct Exes {
    /// The `sluice` executable.
    pub sluice: std::path::PathBuf,
    /// The `sluice-bench` executable.
    pub bench: std::path::PathBuf,
}

impl Exes {
    /// This `sluice-bench` and the `sluice` next to it (cargo builds both into the same
    /// folder), or the one `SLUICE_BIN` names.
    pub fn beside_this() -> anyhow::Result<Self> {
        Self::beside(&std::env::current_exe()?)
    }

    /// `bench` and the `sluice` next to it, or the one `SLUICE_BIN` names.
    pub fn beside(bench: &std::path::Path) -> anyhow::Result<Self> {
        let sluice = std::env::var_os("SLUICE_BIN").map_or_else(|| bench.with_file_name("sluice"), std::path::PathBuf::from);
        if !sluice.is_file() {
            anyhow::bail!(
                "the benchmarks run `sluice` as child processes, and there is no {}: build it first (`cargo build --release -p sluice -p sluice-bench`), or set SLUICE_BIN",
                sluice.display()
            );
        }
        Ok(Self { sluice, bench: bench.to_path_buf() })
    }
}

/// Where a benchmark's helper process reads or writes (the hidden `produce` and
/// `ceiling` commands).
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// Bootstrap servers.
    #[arg(long)]
    pub bootstrap: String,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Partitions of the topic.
    #[arg(long)]
    pub partitions: i32,
}

/// What the benchmarks run: `topic` from the earliest offset (consumer group `group`) on
/// `bootstrap`, every `interval`, with no steps, no checkpoint, no rate control and a
/// stdout sink (they pass their own chain and sink); callers change what they measure.
pub(crate) fn bench_pipeline(group: &str, topic: &str, bootstrap: String, interval: Duration) -> sluice::config::Pipeline {
    use sluice::config::{Pipeline, Sink, Source, StartingOffsets};
    Pipeline {
        name: group.into(),
        source: Source {
            topics: vec![topic.into()],
            starting_offsets: StartingOffsets::Earliest,
            max_offsets_per_trigger: None,
            partition_rates: Default::default(),
            group_id: group.into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: interval,
        adaptive_interval: None,
        kafka: [("bootstrap.servers".to_string(), bootstrap)].into(),
        steps: Vec::new(),
        plugin_dir: None,
        sink: Sink::Jsonl { path: "-".into() },
        dead_letter: None,
        checkpoint: None,
        backpressure: None,
    }
}

/// `n` seed-style ad events as JSON.
pub(crate) fn events(n: usize) -> Vec<Vec<u8>> {
    let mut gen = EventGenerator::new(EventSpec::default());
    (0..n).map(|_| gen.next_json()).collect()
}

/// An example plugin compiled natively into the host, as a chain step: the baseline the
/// WebAssembly plugin is measured against.
pub struct NativeStage<D: Driver> {
    name: &'static str,
    harness: Harness<D>,
}

impl<D: Driver> NativeStage<D> {
    /// Configure the native plugin.
    pub fn new(name: &'static str, config: &str) -> anyhow::Result<Self> {
        Ok(Self { name, harness: Harness::with_config(config).map_err(|e| anyhow::anyhow!("native {name}: {}", e.message()))? })
    }
}

impl<D: Driver> Stage for NativeStage<D> {
    fn name(&self) -> &str {
        self.name
    }
    fn version(&self) -> &str {
        "native"
    }
    fn kind(&self) -> PluginKind {
        D::KIND
    }
    fn output_schema(&self) -> &SchemaRef {
        self.harness.output_schema()
    }
    fn process(&mut self, batch: &RecordBatch, ctx: &Context) -> Result<Finished, CallError> {
        self.harness.push_batch(batch.clone(), ctx.watermark_ms).map_err(|e| self.error("process", e))
    }
    fn identity(&self) -> PluginIdentity {
        PluginIdentity { name: self.name.to_string(), version: "native".into(), content_hash: "native".into(), state_version: D::STATE_VERSION }
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        self.harness.snapshot().map_err(|e| self.error("snapshot", e))
    }
    fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
        self.harness.restore(state, state_version).map_err(|e| self.error("restore", e))
    }
}

impl<D: Driver> NativeStage<D> {
    fn error(&self, call: &'static str, e: sluice_sdk::Error) -> CallError {
        CallError::Plugin { plugin: self.name.to_string(), call, kind: e.kind(), message: e.message().to_string() }
    }
}

/// Records per second.
pub(crate) fn per_sec(records: u64, elapsed: Duration) -> f64 {
    records as f64 / elapsed.as_secs_f64().max(1e-9)
}
