//! What a pipeline writes: the windows of an independent computation over several topics and
//! partitions, starting offsets, the Parquet and Kafka sinks.

use super::*;

pub(super) fn ad_clicks_over_two_topics_and_five_partitions_equals_the_independent_computation(broker: &dyn Broker) {
    broker.create_topic("clicks-a", 3).unwrap();
    broker.create_topic("clicks-b", 2).unwrap();
    let bootstrap = broker.bootstrap();
    let events = produce(broker, &[("clicks-a", 3), ("clicks-b", 2)], 6_000);

    let out = tempfile::tempdir().unwrap();
    let mut sink = jsonl_dir(out.path());
    let p = pipeline(&bootstrap, &["clicks-a", "clicks-b"], StartingOffsets::Earliest, Some(1_000), vec![builtin("ad-clicks", "{}")]);
    let mut batches = Vec::new();
    let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |b| batches.push(b.clone())).unwrap();
    assert_eq!(summary.records, 6_000);
    assert!(batches.len() >= 6, "maxOffsetsPerTrigger 1000 splits 6000 records into at least 6 batches, got {}", batches.len());
    assert!(batches.iter().all(|b| b.records <= 1_000));

    assert_same_windows(&read_dir_rows(out.path()), &events);
    let offsets = committed(&bootstrap, "sluice-test", &[("clicks-a", 0), ("clicks-a", 1), ("clicks-a", 2), ("clicks-b", 0), ("clicks-b", 1)]);
    assert_eq!(offsets.values().sum::<i64>(), 6_000, "the group's offsets reach the end: {offsets:?}");
}

pub(super) fn earliest_reads_what_is_there_and_latest_only_what_comes_after_the_start(broker: &dyn Broker) {
    broker.create_topic("events", 2).unwrap();
    let bootstrap = broker.bootstrap();
    produce(broker, &[("events", 2)], 100);
    let filter = builtin("json-filter", "{}");
    for (start, expected, group) in [(StartingOffsets::Latest, 0, "g-latest"), (StartingOffsets::Earliest, 100, "g-earliest")] {
        let mut p = pipeline(&bootstrap, &["events"], start, None, vec![filter.clone()]);
        p.source.group_id = group.into();
        let out = tempfile::tempdir().unwrap();
        let mut sink = jsonl_dir(out.path());
        let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap();
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
    let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap();
    assert_eq!(summary.records, 0);
    produce(broker, &[("events", 2)], 10);
    let mut batches = Vec::new();
    let mut sink = jsonl_dir(out.path());
    pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |b| batches.push(b.batch_id)).unwrap();
    let first_run_files = batch_files(out.path()).len();
    assert_eq!(read_dir_rows(out.path()).len(), 10);
    let mut sink = jsonl_dir(out.path());
    produce(broker, &[("events", 2)], 10);
    let mut later = Vec::new();
    pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |b| later.push(b.batch_id)).unwrap();
    assert!(later[0] > batches[0], "batch ids continue after the files already there: {batches:?} then {later:?}");
    assert!(batch_files(out.path()).len() > first_run_files);
    assert_eq!(read_dir_rows(out.path()).len(), 20, "nothing written by the earlier run was replaced");
}

pub(super) fn the_kafka_sink_writes_transformed_records_with_their_keys_and_headers(broker: &dyn Broker) {
    broker.create_topic("in", 2).unwrap();
    broker.create_topic("out", 1).unwrap();
    broker.create_topic("dead", 1).unwrap();
    let bootstrap = broker.bootstrap();
    let loader = Loader::connect(&bootstrap, &[]).unwrap();
    let texts: Vec<[String; 3]> = (0..50).map(|i| [serde_json::json!({"id": i, "keep": i % 2 == 0, "noise": "x"}).to_string(), format!("k{i}"), format!("t{i}")]).collect();
    type Headers<'a> = [(&'a str, Option<&'a [u8]>); 2];
    let headers: Vec<Headers> = texts.iter().map(|[_, _, trace]| [("trace", Some(trace.as_bytes())), ("empty", None)]).collect();
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

    let mut p = pipeline(
        &bootstrap,
        &["in"],
        StartingOffsets::Earliest,
        None,
        vec![builtin("json-filter", r#"{"where": [{"field": "keep", "op": "eq", "value": true}], "select": ["id"]}"#)],
    );
    p.sink = SinkConfig::Kafka { topic: "out".into(), delivery: Default::default() };
    p.dead_letter = Some(SinkConfig::Kafka { topic: "dead".into(), delivery: Default::default() });
    let mut sink = sluice::sink::open(&p.sink, &p.kafka).unwrap();
    let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), sink.as_mut(), &mut |_| {}).unwrap();
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

pub(super) fn the_parquet_sink_holds_one_file_per_batch_with_the_windows_of_the_independent_computation(broker: &dyn Broker) {
    broker.create_topic("clicks", 4).unwrap();
    let bootstrap = broker.bootstrap();
    let events = produce(broker, &[("clicks", 4)], 4_000);
    let out = tempfile::tempdir().unwrap();
    let mut p = pipeline(&bootstrap, &["clicks"], StartingOffsets::Earliest, Some(500), vec![builtin("ad-clicks", "{}")]);
    p.sink = SinkConfig::Parquet { path: format!("file://{}", out.path().display()), compression: ParquetCompression::Zstd, options: BTreeMap::new() };
    let mut sink = sluice::sink::open(&p.sink, &p.kafka).unwrap();
    let mut batches = Vec::new();
    let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), sink.as_mut(), &mut |b| batches.push((b.batch_id, b.output_rows))).unwrap();
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
            rows.extend(sluice::sink::json_lines(&b).unwrap().iter().map(|l| serde_json::from_slice::<Value>(l).unwrap()));
        }
    }
    assert_same_windows(&rows, &events);
}

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
