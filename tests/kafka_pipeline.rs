//! The micro-batch pipeline end to end, each test twice: against librdkafka's in-process
//! mock cluster and against a real broker process (tansu, installed by `.ci/setup`,
//! started on a free loopback port and stopped by its PID). Known data in, sink contents
//! compared with an independent computation, starting offsets, several topics and
//! partitions, the Parquet and Kafka sinks, and a sink failure that must not move the
//! consumer group's offsets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice::broker::{Broker, Mock, Tansu};
use sluice::config::{ParquetCompression, Pipeline, PluginSource, Sink as SinkConfig, Source, StartingOffsets, Step};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};
use sluice::pipeline::{self, Until};
use sluice::runtime::{Limits, Runtime};
use sluice::sink::{JsonlSink, Sink, SinkError};
use sluice_tests::reference::{self, AdClicksParams, WindowRow};

fn runtime() -> Runtime {
    Runtime::new(None).unwrap()
}

fn pipeline(bootstrap: &str, topics: &[&str], start: StartingOffsets, max: Option<u64>, steps: Vec<Step>) -> Pipeline {
    Pipeline {
        name: "test".into(),
        source: Source { topics: topics.iter().map(|t| t.to_string()).collect(), starting_offsets: start, max_offsets_per_trigger: max, group_id: "sluice-test".into() },
        trigger_interval: Duration::from_millis(50),
        kafka: BTreeMap::from([("bootstrap.servers".to_string(), bootstrap.to_string())]),
        steps,
        sink: SinkConfig::Jsonl { path: "-".into() },
    }
}

fn builtin(name: &str, config: &str) -> Step {
    Step { source: PluginSource::Builtin(name.into()), config: config.into(), limits: Limits::default() }
}

/// Produce seed-style events round-robin over the partitions of `topics`; returns them in
/// production order.
fn produce(broker: &dyn Broker, topics: &[(&str, i32)], n: usize) -> Vec<Value> {
    let loader = Loader::connect(&broker.bootstrap(), broker.exact_producer_settings()).unwrap();
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

fn read_dir_rows(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>())
        .collect()
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
        .map(|e| ((e.topic().to_string(), e.partition()), match e.offset() { Offset::Offset(o) => o, _ => -1 }))
        .collect()
}

fn ad_clicks_over_two_topics_and_five_partitions_equals_the_independent_computation(broker: &dyn Broker) {
    broker.create_topic("clicks-a", 3).unwrap();
    broker.create_topic("clicks-b", 2).unwrap();
    let bootstrap = broker.bootstrap();
    let events = produce(broker, &[("clicks-a", 3), ("clicks-b", 2)], 6_000);

    let out = tempfile::tempdir().unwrap();
    let mut sink = JsonlSink::open(out.path().to_str().unwrap()).unwrap();
    let p = pipeline(&bootstrap, &["clicks-a", "clicks-b"], StartingOffsets::Earliest, Some(1_000), vec![builtin("ad-clicks", "{}")]);
    let mut batches = Vec::new();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |b| batches.push(b.clone())).unwrap();
    assert_eq!(summary.records, 6_000);
    assert!(batches.len() >= 6, "maxOffsetsPerTrigger 1000 splits 6000 records into at least 6 batches, got {}", batches.len());
    assert!(batches.iter().all(|b| b.records <= 1_000));

    assert_same_windows(&read_dir_rows(out.path()), &events);
    let offsets = committed(&bootstrap, "sluice-test", &[("clicks-a", 0), ("clicks-a", 1), ("clicks-a", 2), ("clicks-b", 0), ("clicks-b", 1)]);
    assert_eq!(offsets.values().sum::<i64>(), 6_000, "the group's offsets reach the end: {offsets:?}");
}

fn earliest_reads_what_is_there_and_latest_only_what_comes_after_the_start(broker: &dyn Broker) {
    broker.create_topic("events", 2).unwrap();
    let bootstrap = broker.bootstrap();
    produce(broker, &[("events", 2)], 100);
    let filter = builtin("json-filter", "{}");
    for (start, expected, group) in [(StartingOffsets::Latest, 0, "g-latest"), (StartingOffsets::Earliest, 100, "g-earliest")] {
        let mut p = pipeline(&bootstrap, &["events"], start, None, vec![filter.clone()]);
        p.source.group_id = group.into();
        let out = tempfile::tempdir().unwrap();
        let mut sink = JsonlSink::open(out.path().to_str().unwrap()).unwrap();
        let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap();
        assert_eq!(summary.records, expected, "{start:?}");
        assert_eq!(read_dir_rows(out.path()).len() as u64, expected, "{start:?}");
    }
    // A second run of the earliest group resumes from its committed offsets: only what was
    // produced since, and its output lands next to the first run's instead of replacing it.
    let p = {
        let mut p = pipeline(&bootstrap, &["events"], StartingOffsets::Earliest, None, vec![filter]);
        p.source.group_id = "g-earliest".into();
        p
    };
    let out = tempfile::tempdir().unwrap();
    let mut sink = JsonlSink::open(out.path().to_str().unwrap()).unwrap();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap();
    assert_eq!(summary.records, 0);
    produce(broker, &[("events", 2)], 10);
    let mut batches = Vec::new();
    let mut sink = JsonlSink::open(out.path().to_str().unwrap()).unwrap();
    pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |b| batches.push(b.batch_id)).unwrap();
    let first_run_files = std::fs::read_dir(out.path()).unwrap().count();
    assert_eq!(read_dir_rows(out.path()).len(), 10);
    let mut sink = JsonlSink::open(out.path().to_str().unwrap()).unwrap();
    produce(broker, &[("events", 2)], 10);
    let mut later = Vec::new();
    pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |b| later.push(b.batch_id)).unwrap();
    assert!(later[0] > batches[0], "batch ids continue after the files already there: {batches:?} then {later:?}");
    assert!(std::fs::read_dir(out.path()).unwrap().count() > first_run_files);
    assert_eq!(read_dir_rows(out.path()).len(), 20, "nothing written by the earlier run was replaced");
}

/// Accepts `ok` batches, then fails.
struct FailingSink {
    ok: usize,
    written: Vec<u64>,
}

impl Sink for FailingSink {
    fn write(&mut self, batch_id: u64, _batches: &[RecordBatch]) -> Result<(), SinkError> {
        if self.written.len() == self.ok {
            return Err(SinkError::Write {
                target: "test-sink".into(),
                batch_id,
                error: std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full"),
            });
        }
        self.written.push(batch_id);
        Ok(())
    }
}

fn a_sink_that_cannot_write_stops_the_run_and_offsets_stay_at_the_last_written_batch(broker: &dyn Broker) {
    broker.create_topic("events", 1).unwrap();
    let bootstrap = broker.bootstrap();
    produce(broker, &[("events", 1)], 500);
    let p = pipeline(&bootstrap, &["events"], StartingOffsets::Earliest, Some(100), vec![builtin("json-filter", "{}")]);
    let mut sink = FailingSink { ok: 2, written: Vec::new() };
    let err = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("sink test-sink: cannot write batch 2: disk full"), "{err}");
    assert_eq!(sink.written, vec![0, 1]);
    assert_eq!(committed(&bootstrap, "sluice-test", &[("events", 0)])[&("events".to_string(), 0)], 200, "only the two written batches are committed");
}

fn a_missing_topic_or_unreachable_broker_is_reported_clearly(broker: &dyn Broker) {
    broker.create_topic("events", 1).unwrap();
    let p = pipeline(&broker.bootstrap(), &["nope"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    let mut sink = FailingSink { ok: 0, written: Vec::new() };
    let err = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("topic `nope` does not exist on the brokers; create it or fix source.topics"), "{err}");

    // Nothing listens on port 1 of the loopback address.
    let p = pipeline("127.0.0.1:1", &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    let err = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("reading metadata of topic `events`") && text.contains("check that the brokers in kafka.\"bootstrap.servers\" are reachable"), "{text}");
    assert!(sink.written.is_empty());
}

fn the_kafka_sink_writes_transformed_records_with_their_keys_and_headers(broker: &dyn Broker) {
    broker.create_topic("in", 2).unwrap();
    broker.create_topic("out", 1).unwrap();
    let bootstrap = broker.bootstrap();
    let loader = Loader::connect(&bootstrap, broker.exact_producer_settings()).unwrap();
    let texts: Vec<[String; 3]> = (0..50)
        .map(|i| [serde_json::json!({"id": i, "keep": i % 2 == 0, "noise": "x"}).to_string(), format!("k{i}"), format!("t{i}")])
        .collect();
    let headers: Vec<[(&str, Option<&[u8]>); 2]> = texts.iter().map(|[_, _, trace]| [("trace", Some(trace.as_bytes())), ("empty", None)]).collect();
    let records: Vec<(&str, Outgoing)> = texts
        .iter()
        .zip(&headers)
        .enumerate()
        .map(|(i, ([value, key, _], headers))| ("in", Outgoing { partition: Some(i as i32 % 2), key: Some(key.as_bytes()), value: Some(value.as_bytes()), headers }))
        .collect();
    for (topic, record) in records {
        loader.send(topic, record).unwrap();
    }
    loader.flush(Duration::from_secs(30)).unwrap();

    let mut p = pipeline(&bootstrap, &["in"], StartingOffsets::Earliest, None, vec![builtin("json-filter", r#"{"where": [{"field": "keep", "op": "eq", "value": true}], "select": ["id"]}"#)]);
    p.sink = SinkConfig::Kafka { topic: "out".into() };
    let mut sink = sluice::sink::open(&p.sink, &p.kafka).unwrap();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), sink.as_mut(), &mut |_| {}).unwrap();
    assert_eq!((summary.records, summary.output_rows), (50, 25));

    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", "reader").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("out", 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while seen.len() < 25 && started.elapsed() < Duration::from_secs(30) {
        use rdkafka::message::{Headers, Message};
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let value: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let id = value["id"].as_i64().unwrap();
            assert_eq!(value, serde_json::json!({"id": id}), "projected value");
            assert_eq!(m.key(), Some(format!("k{id}").as_bytes()), "key kept");
            let h = m.headers().expect("headers kept");
            assert_eq!((h.get(0).key, h.get(0).value), ("trace", Some(format!("t{id}").as_bytes())));
            assert_eq!((h.get(1).key, h.get(1).value), ("empty", None));
            seen.push(id);
        }
    }
    seen.sort();
    assert_eq!(seen, (0..50).step_by(2).collect::<Vec<i64>>());
}

fn the_parquet_sink_holds_one_file_per_batch_with_the_windows_of_the_independent_computation(broker: &dyn Broker) {
    broker.create_topic("clicks", 4).unwrap();
    let bootstrap = broker.bootstrap();
    let events = produce(broker, &[("clicks", 4)], 4_000);
    let out = tempfile::tempdir().unwrap();
    let mut p = pipeline(&bootstrap, &["clicks"], StartingOffsets::Earliest, Some(500), vec![builtin("ad-clicks", "{}")]);
    p.sink = SinkConfig::Parquet { path: format!("file://{}", out.path().display()), compression: ParquetCompression::Zstd, options: BTreeMap::new() };
    let mut sink = sluice::sink::open(&p.sink, &p.kafka).unwrap();
    let mut batches = Vec::new();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), sink.as_mut(), &mut |b| batches.push((b.batch_id, b.output_rows))).unwrap();
    assert_eq!(summary.records, 4_000);

    let mut files: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let expected_files: Vec<String> = batches.iter().filter(|(_, rows)| *rows > 0).map(|(id, _)| format!("batch-{id:012}.parquet")).collect();
    assert_eq!(files, expected_files, "one file per batch with output, named by batch id");
    let mut rows = Vec::new();
    for f in &files {
        let file = std::fs::File::open(out.path().join(f)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        for b in reader {
            let b = b.unwrap();
            let names: Vec<_> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
            assert_eq!(names, ["window_start", "window_end", "campaign_id", "clicks", "total_cost", "unique_users"], "typed columns of the plugin's schema");
            rows.extend(sluice::offline::json_lines(&b).iter().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        }
    }
    assert_same_windows(&rows, &events);
}

/// Each test body runs once on the mock cluster and once on tansu.
macro_rules! on_each_broker {
    ($($test:ident),* $(,)?) => {
        mod mock {
            $( #[test] fn $test() { super::$test(&super::Mock::start().unwrap()) } )*
        }
        mod tansu {
            $( #[test] fn $test() { super::$test(&super::Tansu::start().unwrap()) } )*
        }
    };
}

on_each_broker!(
    ad_clicks_over_two_topics_and_five_partitions_equals_the_independent_computation,
    earliest_reads_what_is_there_and_latest_only_what_comes_after_the_start,
    a_sink_that_cannot_write_stops_the_run_and_offsets_stay_at_the_last_written_batch,
    a_missing_topic_or_unreachable_broker_is_reported_clearly,
    the_kafka_sink_writes_transformed_records_with_their_keys_and_headers,
    the_parquet_sink_holds_one_file_per_batch_with_the_windows_of_the_independent_computation,
);

#[test]
fn the_pipeline_benchmark_reads_every_record_in_each_pipeline_and_compares_outputs() {
    use sluice::bench::pipeline::{run_on, PipelineBenchArgs};
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
