//! `sluice-bench plugins`: throughput of the example plugins through WebAssembly vs the
//! same plugin code compiled natively into the host, on the same batches, in one run.
//!
//! The native side runs the plugin through the SDK's in-process driver on Arrow batches
//! (no IPC, no sandbox): the strictest baseline. The WebAssembly side pays everything a
//! pipeline pays: IPC encoding both ways, copying into the guest, the time budget (epoch
//! interruption) and the memory cap.

use std::io::Write;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use sluice_sdk::testing::{AggregateDriver, Driver, Harness, TransformDriver};
use sluice_sdk::{Context, RecordParts, RecordsBuilder};

use super::events;
use sluice::demo::FILTER_CONFIG;
use sluice::examples;
use sluice::runtime::{Limits, LoadedPlugin, Runtime};

/// Options of `sluice-bench plugins`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Records per measurement.
    #[arg(long, default_value_t = 300_000)]
    pub records: usize,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub batch_sizes: Vec<usize>,
    /// Repetitions; the fastest of each is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Plugin name.
    pub plugin: &'static str,
    /// Records per batch.
    pub batch_size: usize,
    /// Native records per second.
    pub native_rps: f64,
    /// WebAssembly records per second.
    pub wasm_rps: f64,
}

impl BenchRow {
    /// WebAssembly time / native time (lower is better; 1.0 = as fast as native).
    pub fn time_ratio(&self) -> f64 {
        self.native_rps / self.wasm_rps
    }
}

fn batches(values: &[Vec<u8>], size: usize) -> Vec<RecordBatch> {
    values
        .chunks(size.max(1))
        .enumerate()
        .map(|(b, chunk)| {
            let mut builder = RecordsBuilder::with_capacity(chunk.len(), chunk.iter().map(Vec::len).sum());
            for (i, v) in chunk.iter().enumerate() {
                let parts = RecordParts { topic: "bench", partition: 0, offset: (b * size + i) as i64, timestamp: None, key: None, value: Some(v) };
                builder.append(parts, []);
            }
            builder.finish()
        })
        .collect()
}

/// Time one pass of `batches` through the WebAssembly plugin, with the final flush.
fn time_wasm(plugin: &LoadedPlugin, config: &str, batches: &[RecordBatch]) -> anyhow::Result<(Duration, u64)> {
    let mut instance = plugin.instantiate(config)?;
    let mut rows = 0;
    let mut watermark = None;
    let start = Instant::now();
    for (i, b) in batches.iter().chain(std::iter::once(&RecordBatch::new_empty(sluice_sdk::record_schema()))).enumerate() {
        let last = i == batches.len();
        let ctx = Context { batch_id: i as u64, watermark_ms: if last { Some(i64::MAX) } else { watermark }, ..Context::default() };
        let out = instance.process(b, &ctx)?;
        watermark = out.watermark_ms.or(watermark);
        rows += out.batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
    }
    Ok((start.elapsed(), rows))
}

/// Time one pass through the natively compiled plugin (SDK driver, no WebAssembly).
fn time_native<D: Driver>(config: &str, batches: &[RecordBatch]) -> anyhow::Result<(Duration, u64)> {
    let mut harness = Harness::<D>::with_config(config)?;
    let mut rows = 0;
    let start = Instant::now();
    for b in batches {
        let out = harness.push_batch(b.clone(), None)?;
        rows += out.batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
    }
    let out = harness.push_batch(RecordBatch::new_empty(sluice_sdk::record_schema()), Some(i64::MAX))?;
    rows += out.batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
    Ok((start.elapsed(), rows))
}

type NativeFn = fn(&str, &[RecordBatch]) -> anyhow::Result<(Duration, u64)>;

/// Run the benchmark, print a table to `out`, and return its rows.
pub fn run(args: &BenchArgs, out: &mut dyn Write) -> anyhow::Result<Vec<BenchRow>> {
    if args.records == 0 || args.repeat == 0 || args.batch_sizes.contains(&0) {
        anyhow::bail!("--records, --repeat and every --batch-sizes entry must be at least 1");
    }
    let runtime = Runtime::new(sluice::runtime::default_cache_dir())?;
    let limits = Limits::default();
    let cases: [(&'static str, &[u8], &str, NativeFn); 2] = [
        ("json-filter", examples::JSON_FILTER, FILTER_CONFIG, time_native::<TransformDriver<json_filter::JsonFilter>>),
        ("ad-clicks", examples::AD_CLICKS, "{}", time_native::<AggregateDriver<ad_clicks::AdClicks>>),
    ];
    let values = events(args.records);
    writeln!(
        out,
        "sluice-bench plugins: {} seed-style events per run, best of {}, time budget {} ms and memory cap {} MiB on",
        args.records,
        args.repeat,
        limits.call_timeout.as_millis(),
        limits.memory_bytes >> 20
    )?;
    writeln!(out, "| plugin | batch size | native records/s | WASM records/s | WASM time / native time |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    let mut rows = Vec::new();
    for (name, bytes, config, native) in cases {
        let plugin = runtime.load(bytes, name, limits)?;
        for &size in &args.batch_sizes {
            let input = batches(&values, size);
            let (mut best_native, mut best_wasm) = (Duration::MAX, Duration::MAX);
            for _ in 0..args.repeat {
                let (n, native_rows) = native(config, &input)?;
                let (w, wasm_rows) = time_wasm(&plugin, config, &input)?;
                anyhow::ensure!(native_rows == wasm_rows, "{name}: native produced {native_rows} rows but WASM {wasm_rows}");
                best_native = best_native.min(n);
                best_wasm = best_wasm.min(w);
            }
            let row =
                BenchRow { plugin: name, batch_size: size, native_rps: args.records as f64 / best_native.as_secs_f64(), wasm_rps: args.records as f64 / best_wasm.as_secs_f64() };
            writeln!(out, "| {} | {} | {:.0} | {:.0} | {:.2}× |", row.plugin, row.batch_size, row.native_rps, row.wasm_rps, row.time_ratio())?;
            rows.push(row);
        }
    }
    Ok(rows)
}
