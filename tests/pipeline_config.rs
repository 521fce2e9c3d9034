//! The pipeline file: every example in tests/pipelines/good loads, and every file in
//! tests/pipelines/bad fails with the message its first line (`# error: ...`) names, and
//! where a second line says `# at: line L, column C`, points there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::chain::{FailurePolicy, OnFailure};
use sluice::config::{Backpressure, Checkpointing, Delivery, ParquetCompression, Pipeline, PluginSource, Repartition, Sink, StartingOffsets, DEFAULT_RETAIN};
use sluice::rate::{AdaptiveInterval, PartitionRates, PidSettings};

fn files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

#[test]
fn every_good_example_loads() {
    for file in files("good") {
        if let Err(e) = Pipeline::load(&file) {
            panic!("{} should load: {e}", file.display());
        }
    }
}

#[test]
fn every_bad_example_fails_with_its_message() {
    for file in files("bad") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = text.lines().next().and_then(|l| l.strip_prefix("# error: ")).unwrap_or_else(|| panic!("{} must start with `# error: <expected message>`", file.display()));
        match Pipeline::load(&file) {
            Ok(_) => panic!("{} should fail with `{expected}`", file.display()),
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains(expected), "{}:\n expected `{expected}`\n got      `{message}`", file.display());
                assert!(message.starts_with(&file.display().to_string()), "the message names the file: {message}");
                if let Some(at) = text.lines().nth(1).and_then(|l| l.strip_prefix("# at: ")) {
                    assert!(message.contains(at), "{}: the message points at {at}: {message}", file.display());
                }
            }
        }
    }
}

#[test]
fn the_commented_example_means_what_it_says() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/ad-clicks.toml");
    let p = Pipeline::load(&file).unwrap();
    assert_eq!(p.name, "ad-performance");
    assert_eq!(p.source.topics, ["ad-events"]);
    assert_eq!(p.source.starting_offsets, StartingOffsets::Earliest);
    assert_eq!(p.source.max_offsets_per_trigger, Some(100_000));
    assert_eq!(p.source.group_id, "ad-performance");
    assert_eq!(p.trigger_interval, Duration::from_secs(10));
    assert_eq!(p.kafka.get("fetch.wait.max.ms").map(String::as_str), Some("10"));
    assert_eq!(p.steps.len(), 2);
    assert_eq!(p.steps[0].source, PluginSource::Builtin("json-filter".into()));
    let filter: serde_json::Value = serde_json::from_str(&p.steps[0].config).unwrap();
    assert_eq!(filter["where"][0]["value"], "click");
    assert_eq!(p.steps[1].limits.memory_bytes, 1024 << 20);
    assert_eq!(p.steps[1].limits.call_timeout, Duration::from_secs(30));
    assert_eq!(p.steps[1].limits.max_output_bytes, 64 << 20);
    assert_eq!(p.steps[1].failure, FailurePolicy { retries: 3, backoff: Duration::from_millis(500), then: OnFailure::DeadLetter });
    assert_eq!(p.steps[0].failure, FailurePolicy::default());
    let clicks: serde_json::Value = serde_json::from_str(&p.steps[1].config).unwrap();
    assert_eq!(clicks["slide_ms"], 10000);
    assert_eq!(p.sink, Sink::Parquet { path: "out/ad-performance".into(), compression: ParquetCompression::Zstd, options: Default::default() });
    assert_eq!(p.adaptive_interval, Some(AdaptiveInterval { min: Duration::from_secs(1), max: Duration::from_secs(120) }));
    assert_eq!(p.source.partition_rates, PartitionRates { max: Some(50_000.0), min: Some(10.0) });
    assert_eq!(p.backpressure, Some(Backpressure { initial_rate: Some(20_000.0), pid: PidSettings::default() }));
    assert_eq!(p.checkpoint, Some(Checkpointing { location: "checkpoints/ad-performance".into(), options: Default::default(), retain: 20 }));
    assert_eq!(p.dead_letter, Some(Sink::Jsonl { path: "out/ad-performance-dead-letters".into() }));
}

#[test]
fn defaults_and_relative_plugin_paths() {
    let minimal = Pipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/minimal.toml")).unwrap();
    assert_eq!(minimal.name, "minimal");
    assert_eq!(minimal.source.group_id, "sluice-minimal");
    assert_eq!(minimal.source.starting_offsets, StartingOffsets::Latest);
    assert_eq!(minimal.trigger_interval, Duration::from_secs(1));
    assert_eq!(minimal.steps[0].config, "{}");
    assert_eq!(minimal.backpressure, None, "backpressure is off unless enabled");
    assert_eq!(minimal.dead_letter, None, "rejected records are only logged unless [deadLetter] is set");
    assert_eq!(minimal.adaptive_interval, None, "the interval is fixed unless adaptive");
    assert_eq!(minimal.checkpoint, Some(Checkpointing { location: "checkpoints/minimal".into(), options: Default::default(), retain: DEFAULT_RETAIN }));
    let to_kafka =
        Pipeline::parse(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/to-kafka.toml")).unwrap(), Path::new("/etc/sluice/p.toml"))
            .unwrap();
    assert_eq!(to_kafka.steps[0].source, PluginSource::File("/etc/sluice/plugins/json_filter.wasm".into()));
    assert_eq!(to_kafka.sink, Sink::Kafka { topic: "ad-clicks".into(), delivery: Delivery::ExactlyOnce { transactional_id: "sluice-clicks-only-sink-0".into() } });
    assert_eq!(to_kafka.dead_letter, Some(Sink::Kafka { topic: "ad-clicks-rejected".into(), delivery: Delivery::AtLeastOnce }), "at least once unless asked");
    assert_eq!(minimal.source.repartition, None, "no repartition topic unless named");
    let group = Pipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/group-repartition.toml")).unwrap();
    assert_eq!(group.source.repartition, Some(Repartition { topic: "ad-events-by-campaign".into(), key: Some("campaign_id".into()) }));
}

#[test]
fn named_plugins_come_from_the_plugin_directory_next_to_the_file() {
    let p =
        Pipeline::parse(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/hot-swap.toml")).unwrap(), Path::new("/etc/sluice/p.toml"))
            .unwrap();
    assert_eq!(p.plugin_dir, Some(PathBuf::from("/etc/sluice/plugins")));
    assert_eq!(p.steps[0].source, PluginSource::Dir("clicks-only".into()));
    assert_eq!(p.steps[1].source, PluginSource::Dir("ad-clicks".into()));
    assert_eq!(p.steps[1].config, r#"{"window_ms":60000}"#);
    let minimal = Pipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/minimal.toml")).unwrap();
    assert_eq!(minimal.plugin_dir, None);
}
