//! The benchmarks' harnesses, on small data: each benchmark runs end to end (on the mock
//! cluster, or Apache Kafka where the benchmark needs it) and reports its own figures. The
//! full runs are commands (`sluice-bench ...`), not tests.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sluice::broker::Mock;
use sluice_bench::broker::ApacheKafka;
use sluice_bench::Exes;

/// This package's `sluice-bench` and the `sluice` cargo built next to it (`cargo test
/// --workspace` builds both).
fn exes() -> Exes {
    Exes::beside(Path::new(env!("CARGO_BIN_EXE_sluice-bench"))).unwrap()
}

#[test]
fn the_pipeline_benchmark_reads_every_record_in_each_pipeline_and_compares_outputs() {
    use sluice_bench::pipeline::{run_on, PipelineBenchArgs};
    let args = PipelineBenchArgs { records: 3_000, partitions: 2, batch: 1_000, repeat: 1, bootstrap: None };
    let mut out = Vec::new();
    let rows = run_on(&args, &Mock::start().unwrap(), &mut out).unwrap();
    let names: Vec<_> = rows.iter().map(|r| r.pipeline).collect();
    assert_eq!(names, ["consume-only", "json-filter native", "json-filter WASM", "ad-clicks native", "ad-clicks WASM"]);
    assert!(rows.iter().all(|r| r.records == 3_000 && r.batches >= 3), "{rows:?}");
    assert_eq!(rows[0].output_rows, 0);
    assert!(rows[1].output_rows > 0 && rows[1].output_rows < 3_000, "json-filter keeps the clicks only: {rows:?}");
    assert_eq!(rows[1].output_rows, rows[2].output_rows);
    assert!(rows[3].output_rows > 0);
    assert_eq!(rows[3].output_rows, rows[4].output_rows);
    let table = String::from_utf8(out).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("| ") && l.contains('×')).count(), 5, "{table}");
}

#[test]
fn the_checkpoint_benchmark_compares_checkpointing_on_and_off_and_times_restarts() {
    use sluice_bench::checkpoint::{run_on, CheckpointBenchArgs};
    let args = CheckpointBenchArgs { records: 4_000, partitions: 2, batch: 500, repeat: 1, restarts: 2 };
    let mut out = Vec::new();
    let result = run_on(&args, &Mock::start().unwrap(), &exes(), &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    assert!(result.off_per_sec > 0.0 && result.on_per_sec > 0.0, "{table}");
    assert!(result.batches >= 8, "{table}");
    assert_eq!(result.restarts.len(), 2, "{table}");
    assert!(table.contains("| every batch |") && table.contains("restart after SIGKILL to first committed batch:"), "{table}");
}

#[test]
fn the_burst_benchmark_runs_with_backpressure_on_and_off_and_plots_both() {
    use sluice_bench::burst::{run_on, BurstBenchArgs};
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("burst.svg");
    let args = BurstBenchArgs {
        capacity: 2_000,
        interval: Duration::from_millis(250),
        before: Duration::from_secs(1),
        burst: Duration::from_millis(500),
        after: Duration::from_secs(15),
        svg: Some(svg.clone()),
        partitions: 2,
        kafka: Vec::new(),
    };
    let mut out = Vec::new();
    let runs = run_on(&args, &Mock::start().unwrap(), &exes(), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(runs.iter().map(|r| r.backpressure).collect::<Vec<_>>(), [true, false]);
    for run in &runs {
        assert!(run.peak_lag() > 1_000, "the 10× burst shows as lag: {report}");
        assert!(run.batches.iter().all(|b| b.rss_mib > 0.0), "{report}");
    }
    // The summary states each run's own figures.
    for run in &runs {
        let recover = run.batches_to_recover().map_or("never, within the run".to_string(), |n| format!("{n} batches"));
        let summary =
            format!("backpressure {}: back within 1.2× the interval after the step up: {recover}; peak lag {};", if run.backpressure { "on" } else { "off" }, run.peak_lag());
        assert!(report.contains(&summary), "`{summary}` in {report}");
    }
    // Without backpressure the batch after the burst takes all of it, ~20× the interval:
    // the report says where that time went.
    assert!(report.lines().any(|l| l.starts_with("slow at") && l.contains("\"plugins\":")), "{report}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<polyline").count(), 6, "three panels for each run");
}

#[test]
fn the_swap_benchmark_times_each_swap_against_the_median_batch() {
    use sluice_bench::swap::{run_on, SwapBenchArgs};
    let args = SwapBenchArgs { rate: 2_000, interval: Duration::from_millis(250), swaps: 2, every: Duration::from_secs(1), partitions: 2 };
    let mut out = Vec::new();
    let stalls = run_on(&args, &Mock::start().unwrap(), &exes(), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(stalls.len(), 2, "{report}");
    assert!(stalls.iter().all(|s| s.first_batch > Duration::ZERO && s.median > Duration::ZERO), "{report}");
    let worst = stalls.iter().map(|s| s.stall_intervals).fold(0.0, f64::max);
    assert!(report.contains(&format!("worst stall {worst:.2} intervals")), "the summary states the worst of the swaps' stalls ({worst:.2}): {report}");
}

#[test]
fn the_latency_benchmark_measures_each_kept_event_from_its_producer_to_the_sink() {
    use sluice_bench::latency::{run_on, LatencyBenchArgs};
    let args = LatencyBenchArgs { rate: 2_000, interval: Duration::from_millis(100), duration: Duration::from_secs(3), warmup: Duration::from_secs(1), partitions: 2 };
    let mut out = Vec::new();
    let report = run_on(&args, &Mock::start().unwrap(), &exes(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    // About 3 s of clicks (most events are clicks) at 2 000 events/s are counted, no warm-up.
    let counted = report.latencies_ms.len();
    assert!((2_000..=7_000).contains(&counted), "{counted} events counted: {text}");
    assert!(report.latencies_ms.windows(2).all(|w| w[0] <= w[1]) && report.latencies_ms[0] >= 0, "{text}");
    assert!(report.quantile(0.5).unwrap() < 10_000, "a median of seconds means the stamps are not wall-clock times: {text}");
    assert!(text.contains("| 2000 | 100 ms | "), "{text}");
}

#[test]
fn the_peers_benchmark_runs_sluice_and_the_native_ceiling_as_processes_and_compares_their_windows() {
    use sluice_bench::peers::{run_on, PeersBenchArgs};
    let dir = tempfile::tempdir().unwrap();
    let args = PeersBenchArgs {
        records: 20_000,
        partitions: 2,
        event_time_rate: 200,
        venv: dir.path().join("venv"),
        // The native ceiling first: it is compared with sluice's windows all the same.
        systems: vec!["native".into(), "sluice".into()],
        json: Some(dir.path().join("peers.json")),
        csv: Some(dir.path().join("peers.csv")),
        bootstrap: None,
    };
    let mut out = Vec::new();
    let results = run_on(&args, &Mock::start().unwrap(), &exes(), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(results.len(), 2, "{report}");
    // 100 s of event time: windows up to 30 s after the start are closed for everyone.
    assert!(results[1].windows >= 12, "{report}");
    assert_eq!(results[0].matches_sluice, Some(true), "the same aggregation gives the same windows: {report}");
    assert_eq!(results[1].matches_sluice, None, "sluice is the reference: {report}");
    assert!(results.iter().all(|r| r.records_per_sec > 0.0 && r.peak_rss_mib > 1.0), "{report}");
    assert!(report.contains("sluice / native Rust over rdkafka: "), "{report}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("peers.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read_to_string(dir.path().join("peers.csv")).unwrap().lines().count(), 3);
}

#[test]
fn quix_streams_and_bytewax_close_the_same_windows_as_sluice_on_apache_kafka() {
    use sluice_bench::peers::{run_on, PeersBenchArgs};
    let broker = ApacheKafka::start().unwrap();
    let args = PeersBenchArgs {
        records: 20_000,
        partitions: 2,
        event_time_rate: 200,
        // Shared with `sluice bench peers`: PyPI is asked once per machine.
        venv: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers-venv"),
        systems: vec!["sluice".into(), "quix".into(), "bytewax".into()],
        json: None,
        csv: None,
        bootstrap: None,
    };
    let mut out = Vec::new();
    let results = run_on(&args, &broker, &exes(), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert!(results[0].windows >= 12, "{report}");
    assert_eq!(results.iter().map(|r| r.matches_sluice).collect::<Vec<_>>(), [None, Some(true), Some(true)], "{report}");
}

#[test]
fn bench_plugins_compares_native_and_webassembly_on_the_same_rows() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["plugins", "--records", "2000", "--batch-sizes", "500,2000", "--repeat", "1"])
        .env("SLUICE_CACHE_DIR", cache.path())
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| json-filter") || l.starts_with("| ad-clicks")).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    assert!(rows.iter().all(|r| r.ends_with("× |")), "{stdout}");
}
