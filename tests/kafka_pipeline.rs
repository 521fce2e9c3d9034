//! The micro-batch pipeline end to end, each test twice: against librdkafka's in-process
//! mock cluster and against Apache Kafka (installed by `.ci/setup-tests`, one node started
//! on free loopback ports and stopped by its PID). Known data in, sink contents
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
use sluice::broker::{ApacheKafka, Broker, Mock};
use sluice::config::{ParquetCompression, Pipeline, PluginSource, Sink as SinkConfig, Source, StartingOffsets, Step};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};
use sluice::pipeline::{self, Until};
use sluice::runtime::{Limits, Runtime};
use sluice::checkpoint::CheckpointStore;
use sluice::config::Checkpointing;
use sluice::pipeline::RunOptions;
use sluice::sink::{FileFormat, FileSink, Sink, SinkError};
use sluice_tests::reference::{self, AdClicksParams, WindowRow};

fn runtime() -> Runtime {
    Runtime::new(None).unwrap()
}

fn pipeline(bootstrap: &str, topics: &[&str], start: StartingOffsets, max: Option<u64>, steps: Vec<Step>) -> Pipeline {
    Pipeline {
        name: "test".into(),
        source: Source { topics: topics.iter().map(|t| t.to_string()).collect(), starting_offsets: start, max_offsets_per_trigger: max, partition_rates: Default::default(), group_id: "sluice-test".into() },
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
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("batch-"))
        .collect();
    files.sort();
    files
}

fn read_dir_rows(dir: &Path) -> Vec<Value> {
    let files = batch_files(dir);
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
    let mut sink = jsonl_dir(out.path());
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
        let mut sink = jsonl_dir(out.path());
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
    let mut sink = jsonl_dir(out.path());
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap();
    assert_eq!(summary.records, 0);
    produce(broker, &[("events", 2)], 10);
    let mut batches = Vec::new();
    let mut sink = jsonl_dir(out.path());
    pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |b| batches.push(b.batch_id)).unwrap();
    let first_run_files = batch_files(out.path()).len();
    assert_eq!(read_dir_rows(out.path()).len(), 10);
    let mut sink = jsonl_dir(out.path());
    produce(broker, &[("events", 2)], 10);
    let mut later = Vec::new();
    pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |b| later.push(b.batch_id)).unwrap();
    assert!(later[0] > batches[0], "batch ids continue after the files already there: {batches:?} then {later:?}");
    assert!(batch_files(out.path()).len() > first_run_files);
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
    broker.create_topic("dead", 1).unwrap();
    let bootstrap = broker.bootstrap();
    let loader = Loader::connect(&bootstrap, &[]).unwrap();
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
    // And one that is not JSON, for the dead-letter topic.
    let trace: &[(&str, Option<&[u8]>)] = &[("trace", Some(b"t-bad"))];
    loader.send("in", Outgoing { partition: Some(1), key: Some(b"k-bad"), value: Some(b"{not json"), headers: trace }).unwrap();
    loader.flush(Duration::from_secs(30)).unwrap();

    let mut p = pipeline(&bootstrap, &["in"], StartingOffsets::Earliest, None, vec![builtin("json-filter", r#"{"where": [{"field": "keep", "op": "eq", "value": true}], "select": ["id"]}"#)]);
    p.sink = SinkConfig::Kafka { topic: "out".into(), delivery: Default::default() };
    p.dead_letter = Some(SinkConfig::Kafka { topic: "dead".into(), delivery: Default::default() });
    let mut sink = sluice::sink::open(&p.sink, &p.kafka).unwrap();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), sink.as_mut(), &mut |_| {}).unwrap();
    assert_eq!((summary.records, summary.output_rows, summary.rejected), (51, 25, 1));

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

    // The dead letter: the record as it was, with why, who and where from in its headers.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("dead", 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let started = std::time::Instant::now();
    let letter = loop {
        use rdkafka::message::{Headers, Message};
        assert!(started.elapsed() < Duration::from_secs(30), "no dead letter arrived");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let h = m.headers().expect("headers");
            let headers: Vec<(String, String)> = h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect();
            break (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), headers);
        }
    };
    assert_eq!((letter.0.as_deref(), letter.1.as_deref()), (Some(&b"k-bad"[..]), Some(&b"{not json"[..])));
    let header = |k: &str| letter.2.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(header("trace"), Some("t-bad"));
    assert!(header("sluice.error.reason").is_some_and(|r| r.contains("invalid JSON")), "{:?}", letter.2);
    assert_eq!((header("sluice.error.plugin"), header("sluice.error.plugin.version")), (Some("json-filter"), Some("1.0.0")));
    assert_eq!((header("sluice.source.topic"), header("sluice.source.partition"), header("sluice.source.offset")), (Some("in"), Some("1"), Some("25")));
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

    let files: Vec<String> = batch_files(out.path()).iter().map(|f| f.file_name().unwrap().to_str().unwrap().to_string()).collect();
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

fn with_checkpoint(mut p: Pipeline, dir: &Path) -> Pipeline {
    p.checkpoint = Some(Checkpointing { location: dir.display().to_string(), options: BTreeMap::new(), retain: 10 });
    p
}

/// Forwards to a file sink and remembers which batches were written.
struct Recording {
    inner: FileSink,
    written: Vec<u64>,
    fail_commit_of: Option<u64>,
}

impl Recording {
    fn new(dir: &Path) -> Self {
        Self { inner: jsonl_dir(dir), written: Vec::new(), fail_commit_of: None }
    }
}

impl Sink for Recording {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        self.written.push(batch_id);
        self.inner.write(batch_id, batches)
    }
    fn commit(&mut self, batch_id: u64) -> Result<(), SinkError> {
        if self.fail_commit_of == Some(batch_id) {
            return Err(SinkError::Store { target: "test".into(), batch_id, error: "the process died".into() });
        }
        self.inner.commit(batch_id)
    }
    fn is_committed(&self, batch_id: u64) -> bool {
        self.inner.is_committed(batch_id)
    }
    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        self.inner.last_batch_id()
    }
}

fn sorted_rows(dir: &Path) -> Vec<String> {
    let mut rows: Vec<String> = read_dir_rows(dir).iter().map(Value::to_string).collect();
    rows.sort();
    rows
}

/// Run `p` to the end of what is there, stopping early after `stop_after` batches; the ids
/// of the batches run.
fn run_with_checkpoint(p: &Pipeline, sink: &mut dyn Sink, stop_after: Option<usize>) -> Vec<u64> {
    let stop = AtomicBool::new(false);
    let mut ids = Vec::new();
    pipeline::run(p, &runtime(), Until::AvailableNow, &stop, sink, &mut |b| {
        ids.push(b.batch_id);
        if Some(ids.len()) == stop_after {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    ids
}

/// Short windows, so that the watermark closes some within a few thousand test events
/// (100 events a second of event time).
const SHORT_WINDOWS: &str = r#"{"window_ms": 10000, "slide_ms": 5000, "watermark_delay_ms": 5000}"#;
const SHORT_PARAMS: AdClicksParams = AdClicksParams { window_ms: 10_000, slide_ms: 5_000, delay_ms: 5_000 };

/// ad-clicks with [`SHORT_WINDOWS`] over `clicks`, checkpointed in `ck`.
fn short_window_pipeline(broker: &dyn Broker, max: u64, ck: &Path) -> Pipeline {
    with_checkpoint(pipeline(&broker.bootstrap(), &["clicks"], StartingOffsets::Earliest, Some(max), vec![builtin("ad-clicks", SHORT_WINDOWS)]), ck)
}

/// Windows of an uninterrupted checkpointed run over what `broker` holds in `clicks`.
fn uninterrupted_windows(broker: &dyn Broker, max: u64) -> Vec<String> {
    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut p = short_window_pipeline(broker, max, ck.path());
    p.source.group_id = "uninterrupted".into();
    run_with_checkpoint(&p, &mut jsonl_dir(out.path()), None);
    let rows = sorted_rows(out.path());
    assert!(rows.len() > 10, "the watermark closed windows: {rows:?}");
    rows
}

fn a_restart_resumes_from_the_checkpoint_with_plugin_state_and_matches_an_uninterrupted_run(broker: &dyn Broker) {
    broker.create_topic("clicks", 3).unwrap();
    let events = produce(broker, &[("clicks", 3)], 3_000);
    let expected = uninterrupted_windows(broker, 300);
    let key = |w: &WindowRow| format!("{} {} {} {}", w.window_start, w.campaign_id, w.clicks, w.unique_users);
    let reference: Vec<String> = reference::ad_clicks(&events, SHORT_PARAMS, None).iter().map(key).collect();
    for row in &expected {
        let w = WindowRow::from_json(&serde_json::from_str(row).unwrap());
        assert!(reference.contains(&key(&w)), "{row} is a window of the independent computation");
    }

    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = short_window_pipeline(broker, 300, ck.path());
    let first = run_with_checkpoint(&p, &mut jsonl_dir(out.path()), Some(3));
    assert_eq!(first, [0, 1, 2]);
    let second = run_with_checkpoint(&p, &mut jsonl_dir(out.path()), None);
    assert_eq!(second.first(), Some(&3), "batch ids continue after the checkpoint");
    assert_eq!(sorted_rows(out.path()), expected, "windows carried across the restart in plugin state");
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

fn a_batch_that_failed_after_it_was_planned_is_replayed_with_its_recorded_ranges(broker: &dyn Broker) {
    broker.create_topic("events", 2).unwrap();
    // id i lands on partition i % 2 at offset i / 2.
    produce_ids(broker, "events", &[0, 1], 0..500);
    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = with_checkpoint(pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, Some(100), vec![builtin("json-filter", "{}")]), ck.path());
    let mut sink = Recording::new(out.path());
    sink.fail_commit_of = Some(2);
    let error = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut sink, &mut |_| {}).unwrap_err();
    assert!(error.to_string().contains("the process died"), "{error}");
    assert_eq!(batch_files(out.path()).len(), 2, "the failed batch's file is not visible");
    let store = CheckpointStore::open(p.checkpoint.as_ref().unwrap()).unwrap();
    let recorded = store.planned(2).unwrap().expect("batch 2 was planned before it failed");
    let ranges: Vec<(i32, i64, i64)> = recorded.tasks[0].ranges.iter().map(|r| (r.partition, r.from, r.until)).collect();
    assert_eq!(ranges, [(0, 100, 150), (1, 100, 150)]);

    // More records on partition 0 only: a fresh plan would now split the budget otherwise.
    produce_ids(broker, "events", &[0], 500..900);
    let mut sink = Recording::new(out.path());
    run_with_checkpoint(&p, &mut sink, None);
    assert_eq!(sink.written.first(), Some(&2), "the failed batch runs first");
    let batch2 = std::fs::read_to_string(out.path().join("batch-000000000002.jsonl")).unwrap();
    assert_eq!(ids_in(&batch2), (200..300).collect::<Vec<_>>(), "replayed with exactly its recorded ranges");
    let all: String = batch_files(out.path()).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert_eq!(ids_in(&all), (0..900).collect::<Vec<_>>(), "every record exactly once");
}

fn a_damaged_newest_checkpoint_falls_back_to_the_one_before_without_writing_a_batch_twice(broker: &dyn Broker) {
    broker.create_topic("clicks", 2).unwrap();
    produce(broker, &[("clicks", 2)], 2_000);
    let expected = uninterrupted_windows(broker, 250);
    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = short_window_pipeline(broker, 250, ck.path());
    let first = run_with_checkpoint(&p, &mut jsonl_dir(out.path()), Some(4));
    assert_eq!(first, [0, 1, 2, 3]);
    let newest = ck.path().join("checkpoints").join(format!("{:020}", 3));
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() - 7]).unwrap();

    let mut sink = Recording::new(out.path());
    run_with_checkpoint(&p, &mut sink, None);
    assert!(!sink.written.contains(&3), "batch 3 was replayed for state, not written again: {:?}", sink.written);
    assert_eq!(sink.written.first(), Some(&4));
    assert_eq!(sorted_rows(out.path()), expected);
}

/// Each test body runs once on the mock cluster and once on Apache Kafka.
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

/// Replace `dir/name` in one step, as a careful publisher would (write, then rename).
fn publish(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// What the pipeline reported after one batch.
#[derive(Debug, Clone, Copy)]
struct Reported {
    batch_id: u64,
    records: u64,
    swaps: u64,
    swaps_failed: u64,
}

fn plugins_are_swapped_live_without_losing_or_repeating_a_record(broker: &dyn Broker) {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    broker.create_topic("swap-clicks", 2).unwrap();
    let (plugins, out, ck) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = plugins.path();
    let v1 = sluice::examples::named("ad-clicks").unwrap().to_vec();
    let v2 = std::fs::read(sluice_tests::AD_CLICKS_V2_WASM).unwrap();
    let windows = CONTINUOUS_WINDOWS;
    publish(dir, "ad-clicks.wasm", &v1);
    publish(dir, "ad-clicks.toml", windows.as_bytes());
    publish(dir, "filter.wasm", &std::fs::read(sluice_tests::HOSTILE_WASM).unwrap());
    publish(dir, "filter.toml", b"mode = \"ok\"\n");
    let named = |name: &str| Step { source: PluginSource::Dir(name.into()), config: "{}".into(), limits: Limits::default(), failure: Default::default() };
    let mut p = with_checkpoint(pipeline(&broker.bootstrap(), &["swap-clicks"], StartingOffsets::Earliest, Some(300), vec![named("filter"), named("ad-clicks")]), ck.path());
    p.plugin_dir = Some(dir.to_path_buf());

    let reports: Mutex<Vec<Reported>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut events = EventStream::new(broker, "swap-clicks", 2);
    let summary = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            let mut sink = jsonl_dir(out.path());
            pipeline::run(&p, &runtime(), Until::Stopped, &stop, &mut sink, &mut |b| {
                reports.lock().unwrap().push(Reported { batch_id: b.batch_id, records: b.records, swaps: b.swaps, swaps_failed: b.swaps_failed });
            })
        });
        // Send a round of events and wait until the pipeline has read all sent so far and
        // reports `swaps` and `swaps_failed` (nudging with a few more events meanwhile,
        // since counts are reported with batches).
        let round = |events: &mut EventStream, swaps: u64, swaps_failed: u64| {
            events.send(600);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let last = reports.lock().unwrap().clone();
                let read: u64 = last.iter().map(|r| r.records).sum();
                let now = last.last().map(|r| (r.swaps, r.swaps_failed));
                if read == events.sent.len() as u64 && now == Some((swaps, swaps_failed)) {
                    return;
                }
                assert!(!run.is_finished(), "the pipeline stopped");
                assert!(std::time::Instant::now() < deadline, "waited for {swaps} swaps and {swaps_failed} failed ones; reported {last:?}");
                if read == events.sent.len() as u64 {
                    std::thread::sleep(Duration::from_millis(300));
                    events.send(20);
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        round(&mut events, 0, 0);
        // v1 -> v2: a new component.
        publish(dir, "ad-clicks.wasm", &v2);
        round(&mut events, 1, 0);
        // A half-written file is never loaded; once complete, v1 takes over again.
        std::fs::write(dir.join("ad-clicks.wasm"), &v1[..v1.len() / 2]).unwrap();
        round(&mut events, 1, 1);
        std::fs::write(dir.join("ad-clicks.wasm"), &v1).unwrap();
        round(&mut events, 2, 1);
        // A config that init refuses is rejected; v1 keeps running.
        publish(dir, "ad-clicks.toml", b"window_ms = 10000\nslide_ms = 20000\n");
        round(&mut events, 2, 2);
        publish(dir, "ad-clicks.toml", windows.as_bytes());
        publish(dir, "ad-clicks.wasm", &v2);
        round(&mut events, 3, 2);
        // A filter version that traps in its first batch: the one before processes the
        // batch and runs on; saving a fixed config swaps again.
        publish(dir, "filter.toml", b"mode = \"panic\"\n");
        round(&mut events, 3, 3);
        publish(dir, "filter.toml", b"mode = \"ok\"\n");
        round(&mut events, 4, 3);
        stop.store(true, Ordering::SeqCst);
        run.join().unwrap().unwrap()
    });
    assert_eq!((summary.swaps, summary.swaps_failed), (4, 3));
    assert_eq!(summary.records, events.sent.len() as u64, "every record was read once");

    // Which ad-clicks version wrote each batch: 2.0.0 adds `avg_cost`. The first and third
    // promotions are v2, the second is v1 again (the fourth is the filter).
    let reports = reports.into_inner().unwrap();
    let promoted_at = |n: u64| reports.iter().find(|r| r.swaps == n).unwrap().batch_id;
    let v2_batches = |id: u64| (promoted_at(1)..promoted_at(2)).contains(&id) || id >= promoted_at(3);
    let mut rows = Vec::new();
    for file in batch_files(out.path()) {
        let id: u64 = file.file_name().unwrap().to_str().unwrap().trim_start_matches("batch-").split('.').next().unwrap().parse().unwrap();
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let row: Value = serde_json::from_str(line).unwrap();
            assert_eq!(row.get("avg_cost").is_some(), v2_batches(id), "batch {id}: {row}");
            rows.push(row);
        }
    }
    assert_closed_windows_match(&rows, &events.sent);
    // The checkpoint names the version whose state it holds.
    let last = CheckpointStore::open(p.checkpoint.as_ref().unwrap()).unwrap().recover().unwrap().checkpoint.unwrap();
    let identity = &last.tasks[0].plugins[1].identity;
    assert_eq!((identity.name.as_str(), identity.version.as_str()), ("ad-clicks", "2.0.0"));
}

/// Records no plugin can use, one of each kind, with the plugin expected to reject it.
fn bad_records() -> Vec<(&'static str, Option<Vec<u8>>, &'static str)> {
    let click = |rest: &str| format!(r#"{{"event": "click", "campaign_id": "campaign-01", "user_id": "u-1"{rest}}}"#).into_bytes();
    let nested = format!(r#"{{"event": "click", "x": {}{}}}"#, "[".repeat(5_000), "]".repeat(5_000)).into_bytes();
    let mut huge = b"{\"event\": \"click\", \"campaign_id\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 900_000));
    vec![
        ("invalid UTF-8", Some(vec![0xff, 0xfe, b'{', 0xc3, 0x28]), "json-filter"),
        ("invalid JSON", Some(b"{\"event\": \"click\", ".to_vec()), "json-filter"),
        ("null value", None, "json-filter"),
        ("empty value", Some(Vec::new()), "json-filter"),
        ("not an object", Some(b"[1, 2, 3]".to_vec()), "json-filter"),
        ("huge value, cut off", Some(huge), "json-filter"),
        ("NaN", Some(click(r#", "cost": NaN, "timestamp": 1767225600000"#)), "json-filter"),
        ("deeply nested", Some(nested), "ad-clicks"),
        ("missing fields", Some(click("")), "ad-clicks"),
        ("wrong types", Some(click(r#", "cost": "free", "timestamp": "today""#)), "ad-clicks"),
        ("number out of range", Some(click(r#", "cost": 1e999, "timestamp": 1767225600000"#)), "ad-clicks"),
    ]
}

fn bad_records_go_to_the_dead_letter_sink_and_good_ones_give_the_same_output(broker: &dyn Broker) {
    broker.create_topic("mixed", 2).unwrap();
    let loader = Loader::connect(&broker.bootstrap(), &[]).unwrap();
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: 100, ..EventSpec::default() });
    let bad = bad_records();
    let (mut good, mut next_offset, mut expected_dead) = (Vec::new(), [0i64; 2], BTreeMap::new());
    let headers: &[(&str, Option<&[u8]>)] = &[("trace", Some(b"t-1"))];
    for i in 0..2_000usize {
        let partition = (i % 2) as i32;
        let (key, value, h) = if i % 150 == 7 && i / 150 < bad.len() {
            let (kind, value, plugin) = &bad[i / 150];
            expected_dead.insert((partition, next_offset[partition as usize]), (*kind, value.clone(), *plugin));
            (Some(&b"bad"[..]), value.clone(), headers)
        } else {
            let e = serde_json::to_value(gen.next_event()).unwrap();
            let v = serde_json::to_vec(&e).unwrap();
            good.push(e);
            // Every third good record has no key: keys are not what the plugins read.
            (if i % 3 == 0 { None } else { Some(&b"k"[..]) }, Some(v), &[][..])
        };
        loader.send("mixed", Outgoing { partition: Some(partition), key, value: value.as_deref(), headers: h }).unwrap();
        next_offset[partition as usize] += 1;
    }
    loader.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(expected_dead.len(), bad.len());

    let (out, dead) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let filter = r#"{"where": [{"field": "event", "op": "eq", "value": "click"}], "select": ["campaign_id", "user_id", "cost", "timestamp"]}"#;
    let mut p = pipeline(&broker.bootstrap(), &["mixed"], StartingOffsets::Earliest, Some(400), vec![builtin("json-filter", filter), builtin("ad-clicks", "{}")]);
    p.dead_letter = Some(SinkConfig::Jsonl { path: dead.path().display().to_string() });
    let history = std::sync::Arc::new(pipeline::ProgressHistory::new(100));
    let options = RunOptions { until: Until::AvailableNow, history: Some(history.clone()), ..RunOptions::default() };
    let summary = pipeline::run(&p, &runtime(), options, &AtomicBool::new(false), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
    assert_eq!((summary.records, summary.rejected), (2_000, bad.len() as u64));

    // Each batch's progress record: what it read, where the time went, per plugin and
    // partition, and how many records went to the dead letters.
    let records = history.recent();
    assert_eq!(records.len() as u64, summary.batches);
    let sum = |key: &str| records.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("records"), sum("dead_letters"), sum("rejected")), (2_000, bad.len() as u64, bad.len() as u64));
    for r in &records {
        let plugins: Vec<&str> = r["plugins"].as_array().unwrap().iter().map(|p| p["plugin"].as_str().unwrap()).collect();
        assert_eq!(plugins, ["json-filter 1.0.0", "ad-clicks 1.0.0"], "{r}");
        let d = &r["duration_ms"];
        // The total is the whole batch: the phases add up to it (each rounded to 1 µs).
        let parts: f64 = ["plan", "fetch", "plugins", "sink", "checkpoint", "commit"].iter().map(|k| d[k].as_f64().unwrap()).sum();
        assert!((parts - d["total"].as_f64().unwrap()).abs() < 0.01 && d["plugins"].as_f64().unwrap() > 0.0, "{r}");
        let parts: u64 = r["partitions"].as_array().unwrap().iter().map(|p| (p["until"].as_i64().unwrap() - p["from"].as_i64().unwrap()) as u64).sum();
        assert_eq!(parts, r["records"].as_u64().unwrap(), "{r}");
    }
    let last = records.last().unwrap();
    assert_eq!((last["lag"].as_u64(), last["partitions"].as_array().unwrap().len()), (Some(0), 2));

    // The good records give what they give on their own.
    let clicks: Vec<Value> = good.into_iter().filter(|e| e["event"] == "click").collect();
    assert_same_windows(&read_dir_rows(out.path()), &clicks);
    // Each bad record is a dead letter: as it was, plus why and who rejected it.
    let letters = read_dir_rows(dead.path());
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for letter in &letters {
        let at = (letter["partition"].as_i64().unwrap() as i32, letter["offset"].as_i64().unwrap());
        let (kind, value, plugin) = expected_dead.get(&at).unwrap_or_else(|| panic!("not a bad record: {letter}"));
        assert_eq!(letter["plugin"], *plugin, "{kind}: {letter}");
        assert_eq!(letter["plugin_version"], "1.0.0");
        assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()), "{kind}: {letter}");
        assert_eq!((letter["topic"].as_str(), letter["key"].as_str()), (Some("mixed"), Some("bad")));
        assert_eq!(letter["headers"], serde_json::json!([{"key": "trace", "value": "t-1"}]), "{kind}: the record's own headers stay");
        let expected_value = match value {
            None => Value::Null,
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) => Value::from(s),
                Err(_) => Value::from(v.iter().map(|b| Value::from(*b)).collect::<Vec<_>>()),
            },
        };
        assert_eq!(letter["value"], expected_value, "{kind}");
    }
}

fn a_broker_outage_mid_run_makes_the_pipeline_wait_and_resume_with_nothing_lost(broker: &dyn Broker) {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    broker.create_topic("outage", 2).unwrap();
    let (out, ck) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let json_windows = r#"{"window_ms": 10000, "slide_ms": 5000, "watermark_delay_ms": 15000}"#;
    let p = with_checkpoint(pipeline(&broker.bootstrap(), &["outage"], StartingOffsets::Earliest, Some(300), vec![builtin("ad-clicks", json_windows)]), ck.path());
    let mut events = EventStream::new(broker, "outage", 2);
    let read = Mutex::new(0u64);
    let stop = AtomicBool::new(false);
    let wait_until_read = |n: usize, read: &Mutex<u64>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while *read.lock().unwrap() < n as u64 {
            assert!(std::time::Instant::now() < deadline, "read {} of {n}", read.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let summary = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            pipeline::run(&p, &runtime(), Until::Stopped, &stop, &mut jsonl_dir(out.path()), &mut |b| *read.lock().unwrap() += b.records)
        });
        for _ in 0..2 {
            events.send(700);
            wait_until_read(events.sent.len(), &read);
        }
        // The broker goes away for longer than a batch interval and a request timeout.
        broker.set_available(false).unwrap();
        std::thread::sleep(Duration::from_secs(12));
        assert!(!run.is_finished(), "the pipeline waits for the broker instead of stopping");
        broker.set_available(true).unwrap();
        for _ in 0..4 {
            events.send(700);
            wait_until_read(events.sent.len(), &read);
        }
        stop.store(true, Ordering::SeqCst);
        run.join().unwrap().unwrap()
    });
    assert_eq!(summary.records, events.sent.len() as u64, "every record read once");
    assert_closed_windows_match(&read_dir_rows(out.path()), &events.sent);
}

macro_rules! on_each_broker {
    ($($test:ident),* $(,)?) => {
        mod mock {
            $( #[test] fn $test() { super::$test(&super::Mock::start().unwrap()) } )*
        }
        mod kafka {
            $( #[test] fn $test() { super::$test(&super::ApacheKafka::start().unwrap()) } )*
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
    a_restart_resumes_from_the_checkpoint_with_plugin_state_and_matches_an_uninterrupted_run,
    a_batch_that_failed_after_it_was_planned_is_replayed_with_its_recorded_ranges,
    a_damaged_newest_checkpoint_falls_back_to_the_one_before_without_writing_a_batch_twice,
    plugins_are_swapped_live_without_losing_or_repeating_a_record,
    bad_records_go_to_the_dead_letter_sink_and_good_ones_give_the_same_output,
    a_broker_outage_mid_run_makes_the_pipeline_wait_and_resume_with_nothing_lost,
);

#[test]
fn a_kafka_sink_whose_topic_does_not_exist_says_so_when_it_opens_in_either_mode() {
    // Apache Kafka here does not create topics on request (auto.create.topics.enable=false).
    let broker = ApacheKafka::start().unwrap();
    let kafka = BTreeMap::from([("bootstrap.servers".to_string(), broker.bootstrap())]);
    for delivery in [sluice::config::Delivery::AtLeastOnce, sluice::config::Delivery::ExactlyOnce { transactional_id: "sluice-missing".into() }] {
        let error = sluice::sink::open(&SinkConfig::Kafka { topic: "missing-out".into(), delivery: delivery.clone() }, &kafka).err().expect("no such topic").to_string();
        assert!(error.contains("kafka topic `missing-out`") && error.contains("does not exist on the brokers; create it"), "{delivery:?}: {error}");
    }
}

#[test]
fn state_a_plugin_cannot_read_is_refused_with_the_way_out_and_ignore_state_starts_it_fresh() {
    let broker = Mock::start().unwrap();
    broker.create_topic("clicks", 1).unwrap();
    produce(&broker, &[("clicks", 1)], 300);
    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = with_checkpoint(pipeline(&broker.bootstrap(), &["clicks"], StartingOffsets::Earliest, Some(100), vec![builtin("ad-clicks", "{}")]), ck.path());
    run_with_checkpoint(&p, &mut jsonl_dir(out.path()), None);
    // Rewrite the newest checkpoint as if an ad-clicks with another state layout wrote it.
    let store = CheckpointStore::open(p.checkpoint.as_ref().unwrap()).unwrap();
    let mut newest = store.recover().unwrap().checkpoint.unwrap();
    newest.batch_id += 1;
    newest.tasks[0].plugins[0].identity.state_version = 99;
    store.commit(&newest).unwrap();

    produce(&broker, &[("clicks", 1)], 10);
    let error = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("state version 99") && error.contains("--ignore-state"), "{error}");
    let options = RunOptions { until: Until::AvailableNow, ignore_state: true, ..Default::default() };
    let summary = pipeline::run(&p, &runtime(), options, &AtomicBool::new(false), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
    assert_eq!(summary.records, 10, "fresh state, resumed at the checkpoint's offsets");
}

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

#[test]
fn the_checkpoint_benchmark_compares_checkpointing_on_and_off_and_times_restarts() {
    use sluice::bench::checkpoint::{run_on, CheckpointBenchArgs};
    let args = CheckpointBenchArgs { records: 4_000, partitions: 2, batch: 500, repeat: 1, restarts: 2 };
    let mut out = Vec::new();
    let result = run_on(&args, &Mock::start().unwrap(), Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    assert!(result.off_per_sec > 0.0 && result.on_per_sec > 0.0, "{table}");
    assert!(result.batches >= 8, "{table}");
    assert_eq!(result.restarts.len(), 2, "{table}");
    assert!(table.contains("| every batch |") && table.contains("restart after SIGKILL to first committed batch:"), "{table}");
}

#[test]
fn rate_limits_cap_each_batch_and_the_rest_waits_in_kafka() {
    let broker = Mock::start().unwrap();
    broker.create_topic("events", 2).unwrap();
    produce_ids(&broker, "events", &[0, 1], 0..600);
    let mut p = pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    p.trigger_interval = Duration::from_millis(100);
    p.source.partition_rates = sluice::rate::PartitionRates { max: Some(1_000.0), min: None };
    let mut sizes = Vec::new();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut FailingSink { ok: usize::MAX, written: Vec::new() }, &mut |b| sizes.push(b.records)).unwrap();
    assert_eq!(summary.records, 600, "nothing dropped");
    assert_eq!(sizes, [200, 200, 200, 0], "1000 records/s per partition × 100 ms × 2 partitions, then the final flush");

    // Backpressure starts at initialRate and then follows what the pipeline processes.
    let mut p = pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    p.source.group_id = "bp".into();
    p.trigger_interval = Duration::from_millis(100);
    p.backpressure = Some(sluice::config::Backpressure { initial_rate: Some(500.0), pid: Default::default() });
    let mut sizes = Vec::new();
    let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut FailingSink { ok: usize::MAX, written: Vec::new() }, &mut |b| sizes.push(b.records)).unwrap();
    assert_eq!(summary.records, 600);
    assert_eq!(sizes[..2], [50, 50], "500 records/s × 100 ms before the first estimate: {sizes:?}");
    assert!(sizes[2] > 50, "the estimate follows the processing rate, far above 500/s: {sizes:?}");
}

#[test]
fn the_burst_benchmark_runs_with_backpressure_on_and_off_and_plots_both() {
    use sluice::bench::burst::{run_on, BurstBenchArgs};
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
    let runs = run_on(&args, &Mock::start().unwrap(), Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(runs.iter().map(|r| r.backpressure).collect::<Vec<_>>(), [true, false]);
    for run in &runs {
        assert!(run.peak_lag() > 1_000, "the 10× burst shows as lag: {report}");
        assert!(run.batches.iter().all(|b| b.rss_mib > 0.0), "{report}");
    }
    // The summary states each run's own figures.
    for run in &runs {
        let recover = run.batches_to_recover().map_or("never, within the run".to_string(), |n| format!("{n} batches"));
        let summary = format!("backpressure {}: back within 1.2× the interval after the step up: {recover}; peak lag {};", if run.backpressure { "on" } else { "off" }, run.peak_lag());
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
    use sluice::bench::swap::{run_on, SwapBenchArgs};
    let args = SwapBenchArgs { rate: 2_000, interval: Duration::from_millis(250), swaps: 2, every: Duration::from_secs(1), partitions: 2 };
    let mut out = Vec::new();
    let stalls = run_on(&args, &Mock::start().unwrap(), Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(stalls.len(), 2, "{report}");
    assert!(stalls.iter().all(|s| s.first_batch > Duration::ZERO && s.median > Duration::ZERO), "{report}");
    let worst = stalls.iter().map(|s| s.stall_intervals).fold(0.0, f64::max);
    assert!(report.contains(&format!("worst stall {worst:.2} intervals")), "the summary states the worst of the swaps' stalls ({worst:.2}): {report}");
}

#[test]
fn the_latency_benchmark_measures_each_kept_event_from_its_producer_to_the_sink() {
    use sluice::bench::latency::{run_on, LatencyBenchArgs};
    let args = LatencyBenchArgs { rate: 2_000, interval: Duration::from_millis(100), duration: Duration::from_secs(3), warmup: Duration::from_secs(1), partitions: 2 };
    let mut out = Vec::new();
    let report = run_on(&args, &Mock::start().unwrap(), Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
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
    use sluice::bench::peers::{run_on, PeersBenchArgs};
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
    let results = run_on(&args, &Mock::start().unwrap(), Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
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
    use sluice::bench::peers::{run_on, PeersBenchArgs};
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
    let results = run_on(&args, &broker, Path::new(env!("CARGO_BIN_EXE_sluice")), &mut out).unwrap();
    let report = String::from_utf8(out).unwrap();
    assert!(results[0].windows >= 12, "{report}");
    assert_eq!(results.iter().map(|r| r.matches_sluice).collect::<Vec<_>>(), [None, Some(true), Some(true)], "{report}");
}

#[test]
fn hostile_plugins_are_contained_by_their_failure_policy_while_another_pipeline_runs_on() {
    use sluice::chain::{FailurePolicy, OnFailure};
    let broker = Mock::start().unwrap();
    broker.create_topic("calm", 2).unwrap();
    broker.create_topic("target", 1).unwrap();
    let bootstrap = broker.bootstrap();
    let events = produce(&broker, &[("calm", 2)], 2_000);
    let loader = Loader::connect(&bootstrap, &[]).unwrap();
    for i in 0..30 {
        let value = format!(r#"{{"i": {i}}}"#);
        loader.send("target", Outgoing { partition: Some(0), key: None, value: Some(value.as_bytes()), headers: &[] }).unwrap();
    }
    loader.flush(Duration::from_secs(30)).unwrap();

    let hostile = |mode: &str, limits: Limits, then: OnFailure| Step {
        source: PluginSource::File(sluice_tests::HOSTILE_WASM.into()),
        config: format!(r#"{{"mode": "{mode}"}}"#),
        limits,
        failure: FailurePolicy { retries: 1, backoff: Duration::from_millis(10), then },
    };
    let tight = Limits { memory_bytes: 32 << 20, call_timeout: Duration::from_millis(300), max_output_bytes: 64 << 10 };
    std::thread::scope(|scope| {
        // A healthy pipeline in the same process, all along.
        let calm = scope.spawn(|| {
            let out = tempfile::tempdir().unwrap();
            let mut p = pipeline(&bootstrap, &["calm"], StartingOffsets::Earliest, Some(100), vec![builtin("ad-clicks", "{}")]);
            p.source.group_id = "calm".into();
            let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
            assert_same_windows(&read_dir_rows(out.path()), &events);
            summary.batches
        });
        for (mode, expected) in [
            ("spin", "trapped in process: time budget of 300 ms per call exceeded"),
            ("alloc", "trapped in process: memory limit of 32 MiB exceeded"),
            ("recurse", "trapped in process: stack overflow"),
            ("panic", "hostile plugin panicked on purpose with 10 records"),
            ("flood", "MiB exceeds the limit of 0.1 MiB per call (maxOutputMb)"),
        ] {
            // Dead-lettered: the run goes on and every record of the failed batches is a
            // dead letter with the trap as its reason.
            let dead = tempfile::tempdir().unwrap();
            let mut p = pipeline(&bootstrap, &["target"], StartingOffsets::Earliest, Some(10), vec![hostile(mode, tight, OnFailure::DeadLetter)]);
            p.source.group_id = format!("hostile-{mode}");
            p.dead_letter = Some(SinkConfig::Jsonl { path: dead.path().display().to_string() });
            let summary = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut Discarding, &mut |_| {}).unwrap();
            assert_eq!((summary.records, summary.rejected), (30, 30), "{mode}");
            let letters = read_dir_rows(dead.path());
            assert_eq!(letters.len(), 30, "{mode}");
            let reason = letters[0]["reason"].as_str().unwrap();
            assert!(reason.contains("failed in hostile 0.1.0 2 times") && reason.contains(expected), "{mode}: {reason}");
            // Stopped (the default): the run ends with the trap, named.
            let mut p = pipeline(&bootstrap, &["target"], StartingOffsets::Earliest, Some(10), vec![hostile(mode, tight, OnFailure::Stop)]);
            p.source.group_id = format!("hostile-stop-{mode}");
            let e = pipeline::run(&p, &runtime(), Until::AvailableNow, &AtomicBool::new(false), &mut Discarding, &mut |_| {}).unwrap_err();
            assert!(e.to_string().contains("plugin hostile ") && e.to_string().contains(expected), "{mode}: {e}");
        }
        assert!(calm.join().unwrap() >= 20, "the healthy pipeline ran its batches");
    });
}

/// A sink that keeps nothing.
struct Discarding;

impl Sink for Discarding {
    fn write(&mut self, _: u64, _: &[RecordBatch]) -> Result<(), SinkError> {
        Ok(())
    }
}
