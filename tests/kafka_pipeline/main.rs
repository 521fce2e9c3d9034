//! The micro-batch pipeline end to end, by concern (a module each), most tests twice:
//! against librdkafka's in-process mock cluster and against Apache Kafka (installed by
//! `.ci/setup-tests`, one node started on free loopback ports and stopped by its PID).
//! Known data in, sink contents compared with an independent computation: what a pipeline
//! writes (`results`), restarts from checkpoints (`checkpoints`), live plugin swaps
//! (`swaps`), failures of sinks, brokers, records and plugins (`failures`), rate control
//! (`rates`).

use sluice::control::Control;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use sluice::broker::{Broker, Mock};
use sluice::checkpoint::CheckpointStore;
use sluice::config::Checkpointing;
use sluice::config::{CheckedPipeline, ParquetCompression, Pipeline, PluginSource, Sink as SinkConfig, Source, StartingOffsets, Step};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};
use sluice::pipeline::RunOptions;
use sluice::pipeline::{self, Until};
use sluice::runtime::{Limits, Runtime};
use sluice::sink::{FileFormat, FileSink, Sink, SinkError};
use sluice_bench::broker::ApacheKafka;
use sluice_tests::reference::{self, AdClicksParams, WindowRow};

mod checkpoints;
mod failures;
mod rates;
mod results;
mod swaps;

/// The pipeline's logs in the test's captured output (shown when it fails) when `SLUICE_LOG`
/// is set, e.g. `SLUICE_LOG=sluice=debug`.
fn logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

fn runtime() -> Runtime {
    Runtime::new(None).unwrap()
}

fn pipeline(bootstrap: &str, topics: &[&str], start: StartingOffsets, max: Option<u64>, steps: Vec<Step>) -> Pipeline {
    Pipeline {
        name: "test".into(),
        source: Source {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            starting_offsets: start,
            max_offsets_per_trigger: max,
            partition_rates: Default::default(),
            group_id: "sluice-test".into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: Duration::from_millis(50),
        adaptive_interval: None,
        kafka: BTreeMap::from([("bootstrap.servers".to_string(), bootstrap.to_string())]),
        steps,
        plugin_dir: None,
        sink: SinkConfig::Jsonl { path: "-".into() },
        dead_letter: None,
        checkpoint: None,
        backpressure: None,
    }
}

fn builtin(name: &str, config: &str) -> Step {
    Step { source: PluginSource::Builtin(name.into()), config: config.into(), limits: Limits::default(), failure: Default::default() }
}

/// Produce seed-style events round-robin over the partitions of `topics`; returns them in
/// production order.
fn produce(broker: &dyn Broker, topics: &[(&str, i32)], n: usize) -> Vec<Value> {
    let loader = Loader::connect(&broker.bootstrap(), &[]).unwrap();
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: 100, ..EventSpec::default() });
    let slots: Vec<(&str, i32)> = topics.iter().flat_map(|&(t, parts)| (0..parts).map(move |p| (t, p))).collect();
    let events: Vec<Value> = (0..n).map(|_| serde_json::to_value(gen.next_event()).unwrap()).collect();
    let values: Vec<Vec<u8>> = events.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
    let records: Vec<(&str, Outgoing)> = events
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (e, value))| {
            let (topic, partition) = slots[i % slots.len()];
            (topic, Outgoing { partition: Some(partition), key: e["campaign_id"].as_str().map(str::as_bytes), value: Some(value), headers: &[] })
        })
        .collect();
    for (topic, record) in records {
        loader.send(topic, record).unwrap();
    }
    loader.flush(Duration::from_secs(30)).unwrap();
    events
}

/// A JSON-lines file sink on `dir`.
fn jsonl_dir(dir: &Path) -> FileSink {
    FileSink::open(dir.to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap()
}

/// The batch files a file sink shows to readers, sorted.
fn batch_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("batch-")).collect();
    files.sort();
    files
}

fn read_dir_rows(dir: &Path) -> Vec<Value> {
    let files = batch_files(dir);
    files.iter().flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>()).collect()
}

/// `rows` (ad-clicks output as JSON) are the windows the independent computation finds.
fn assert_same_windows(rows: &[Value], events: &[Value]) {
    let mut actual: Vec<WindowRow> = rows.iter().map(WindowRow::from_json).collect();
    actual.sort_by(|a, b| (a.window_start, &a.campaign_id).cmp(&(b.window_start, &b.campaign_id)));
    let expected = reference::ad_clicks(events, AdClicksParams::default(), None);
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(&expected) {
        // Batches hold partitions in turn, so costs are added in another order than produced.
        assert_eq!((a.window_start, &a.campaign_id, a.clicks, a.unique_users), (e.window_start, &e.campaign_id, e.clicks, e.unique_users));
        assert!((a.total_cost - e.total_cost).abs() <= 1e-9 * e.total_cost.abs().max(1.0), "{a:?} vs {e:?}");
    }
}

fn committed(bootstrap: &str, group: &str, parts: &[(&str, i32)]) -> HashMap<(String, i32), i64> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for &(t, p) in parts {
        tpl.add_partition(t, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| {
            (
                (e.topic().to_string(), e.partition()),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                },
            )
        })
        .collect()
}

/// Accepts `ok` batches, then fails.
struct FailingSink {
    ok: usize,
    written: Vec<u64>,
}

impl Sink for FailingSink {
    fn write(&mut self, batch_id: u64, _batches: &[RecordBatch]) -> Result<(), SinkError> {
        if self.written.len() == self.ok {
            return Err(SinkError::Write { target: "test-sink".into(), batch_id, error: std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full") });
        }
        self.written.push(batch_id);
        Ok(())
    }
}

/// Stops a run when dropped: a failed assertion in a test's thread scope then ends the run
/// it started instead of waiting for it forever.
struct StopOnDrop<'a>(&'a Control);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// `p`, checked as every run needs it.
fn checked(p: &Pipeline) -> CheckedPipeline {
    p.clone().check().expect("the test's pipeline is valid")
}

fn with_checkpoint(mut p: Pipeline, dir: &Path) -> Pipeline {
    p.checkpoint = Some(Checkpointing { location: dir.display().to_string(), options: BTreeMap::new(), retain: 10 });
    p
}

/// Produce `{"id": i}` for each id, round-robin over `partitions` of `topic`.
fn produce_ids(broker: &dyn Broker, topic: &str, partitions: &[i32], ids: std::ops::Range<i64>) {
    let loader = Loader::connect(&broker.bootstrap(), &[]).unwrap();
    for (n, id) in ids.enumerate() {
        let value = serde_json::json!({ "id": id }).to_string();
        loader.send(topic, Outgoing { partition: Some(partitions[n % partitions.len()]), key: None, value: Some(value.as_bytes()), headers: &[] }).unwrap();
    }
    loader.flush(Duration::from_secs(30)).unwrap();
}

fn ids_in(text: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_i64().unwrap()).collect();
    ids.sort();
    ids
}

/// Short windows with a watermark delay longer than the events' disorder (≤ 3 s) plus how
/// far one partition can be read ahead of another in the continuous-run tests (a round of
/// events, ≤ 7.5 s of event time): no event is late, as in the one-batch reference.
const CONTINUOUS_WINDOWS: &str = "window_ms = 10000\nslide_ms = 5000\nwatermark_delay_ms = 15000\n";
const CONTINUOUS_PARAMS: AdClicksParams = AdClicksParams { window_ms: 10_000, slide_ms: 5_000, delay_ms: 15_000 };

/// `rows` (ad-clicks output of a run that was stopped, so its newest windows are still
/// open) hold exactly the independent computation's counts for the windows the watermark
/// closed, and none before the newest closed one is missing.
fn assert_closed_windows_match(rows: &[Value], events: &[Value]) {
    let expected = reference::ad_clicks(events, CONTINUOUS_PARAMS, None);
    let mut actual: Vec<WindowRow> = rows.iter().map(WindowRow::from_json).collect();
    actual.sort_by(|a, b| (a.window_start, &a.campaign_id).cmp(&(b.window_start, &b.campaign_id)));
    let newest = actual.iter().map(|w| w.window_end).max().expect("windows closed");
    let closed: Vec<&WindowRow> = expected.iter().filter(|w| w.window_end <= newest).collect();
    assert!(closed.len() > 20, "windows closed during the run: {}", closed.len());
    assert_eq!(actual.len(), closed.len());
    for (a, e) in actual.iter().zip(closed) {
        assert_eq!((a.window_start, &a.campaign_id, a.clicks, a.unique_users), (e.window_start, &e.campaign_id, e.clicks, e.unique_users));
    }
}

/// Produces seed-style events, continuing the same event stream call after call.
struct EventStream {
    loader: Loader,
    gen: EventGenerator,
    topic: &'static str,
    partitions: i32,
    sent: Vec<Value>,
}

impl EventStream {
    fn new(broker: &dyn Broker, topic: &'static str, partitions: i32) -> Self {
        let loader = Loader::connect(&broker.bootstrap(), &[]).unwrap();
        Self { loader, gen: EventGenerator::new(EventSpec { events_per_sec: 100, ..EventSpec::default() }), topic, partitions, sent: Vec::new() }
    }

    fn send(&mut self, n: usize) {
        for _ in 0..n {
            let e = serde_json::to_value(self.gen.next_event()).unwrap();
            let value = serde_json::to_vec(&e).unwrap();
            let partition = (self.sent.len() % self.partitions as usize) as i32;
            self.loader.send(self.topic, Outgoing { partition: Some(partition), key: None, value: Some(&value), headers: &[] }).unwrap();
            self.sent.push(e);
        }
        self.loader.flush(Duration::from_secs(30)).unwrap();
    }
}

/// Each test body runs once on the mock cluster and once on Apache Kafka.
macro_rules! on_each_broker {
    ($($module:ident :: $test:ident),* $(,)?) => {
        mod mock {
            $( #[test] fn $test() { super::$module::$test(&super::Mock::start().unwrap()) } )*
        }
        mod kafka {
            $( #[test] fn $test() { super::$module::$test(&super::ApacheKafka::start().unwrap()) } )*
        }
    };
}

on_each_broker!(
    results::ad_clicks_over_two_topics_and_five_partitions_equals_the_independent_computation,
    results::earliest_reads_what_is_there_and_latest_only_what_comes_after_the_start,
    failures::a_sink_that_cannot_write_stops_the_run_and_offsets_stay_at_the_last_written_batch,
    failures::a_missing_topic_or_unreachable_broker_is_reported_clearly,
    results::the_kafka_sink_writes_transformed_records_with_their_keys_and_headers,
    results::the_parquet_sink_holds_one_file_per_batch_with_the_windows_of_the_independent_computation,
    checkpoints::a_restart_resumes_from_the_checkpoint_with_plugin_state_and_matches_an_uninterrupted_run,
    checkpoints::a_batch_that_failed_after_it_was_planned_is_replayed_with_its_recorded_ranges,
    checkpoints::a_damaged_newest_checkpoint_falls_back_to_the_one_before_without_writing_a_batch_twice,
    swaps::plugins_are_swapped_live_without_losing_or_repeating_a_record,
    failures::bad_records_go_to_the_dead_letter_sink_and_good_ones_give_the_same_output,
    failures::a_broker_outage_mid_run_makes_the_pipeline_wait_and_resume_with_nothing_lost,
);
