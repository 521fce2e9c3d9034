//! What goes wrong, and what the pipeline does: a failing sink, a missing topic or broker,
//! bad records, a broker outage, hostile plugins.

use super::*;

pub(super) fn a_sink_that_cannot_write_stops_the_run_and_offsets_stay_at_the_last_written_batch(broker: &dyn Broker) {
    broker.create_topic("events", 1).unwrap();
    let bootstrap = broker.bootstrap();
    produce(broker, &[("events", 1)], 500);
    let p = pipeline(&bootstrap, &["events"], StartingOffsets::Earliest, Some(100), vec![builtin("json-filter", "{}")]);
    let mut sink = FailingSink { ok: 2, written: Vec::new() };
    let err = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("sink test-sink: cannot write batch 2: disk full"), "{err}");
    assert_eq!(sink.written, vec![0, 1]);
    assert_eq!(committed(&bootstrap, "sluice-test", &[("events", 0)])[&("events".to_string(), 0)], 200, "only the two written batches are committed");
}

pub(super) fn a_missing_topic_or_unreachable_broker_is_reported_clearly(broker: &dyn Broker) {
    broker.create_topic("events", 1).unwrap();
    let p = pipeline(&broker.bootstrap(), &["nope"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    let mut sink = FailingSink { ok: 0, written: Vec::new() };
    let err = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("topic `nope` does not exist on the brokers; create it or fix source.topics"), "{err}");

    // Nothing listens on port 1 of the loopback address.
    let p = pipeline("127.0.0.1:1", &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    let err = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("reading metadata of topic `events`") && text.contains("check that the brokers in kafka.\"bootstrap.servers\" are reachable"), "{text}");
    assert!(sink.written.is_empty());
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

pub(super) fn bad_records_go_to_the_dead_letter_sink_and_good_ones_give_the_same_output(broker: &dyn Broker) {
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
    let options = RunOptions { until: Until::AvailableNow, observers: vec![history.clone()], ..RunOptions::default() };
    let summary = pipeline::run(&checked(&p), &runtime(), options, &Control::new(), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
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

pub(super) fn a_broker_outage_mid_run_makes_the_pipeline_wait_and_resume_with_nothing_lost(broker: &dyn Broker) {
    use std::sync::Mutex;
    logs();
    broker.create_topic("outage", 2).unwrap();
    let (out, ck) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let json_windows = r#"{"window_ms": 10000, "slide_ms": 5000, "watermark_delay_ms": 15000}"#;
    let p = with_checkpoint(pipeline(&broker.bootstrap(), &["outage"], StartingOffsets::Earliest, Some(300), vec![builtin("ad-clicks", json_windows)]), ck.path());
    let mut events = EventStream::new(broker, "outage", 2);
    let read = Mutex::new(0u64);
    let stop = Control::new();
    // Waits until `n` records were read, or the run ended (its error is then reported).
    let wait_until_read = |n: usize, read: &Mutex<u64>, run: &std::thread::ScopedJoinHandle<'_, _>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while *read.lock().unwrap() < n as u64 && !run.is_finished() {
            assert!(std::time::Instant::now() < deadline, "read {} of {n}", read.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let summary = std::thread::scope(|scope| {
        let _stop_on_failure = StopOnDrop(&stop);
        let run = scope.spawn(|| pipeline::run(&checked(&p), &runtime(), Until::Stopped, &stop, &mut jsonl_dir(out.path()), &mut |b| *read.lock().unwrap() += b.records));
        for _ in 0..2 {
            events.send(700);
            wait_until_read(events.sent.len(), &read, &run);
        }
        // The broker goes away for longer than a batch interval and a request timeout.
        broker.set_available(false).unwrap();
        std::thread::sleep(Duration::from_secs(12));
        assert!(!run.is_finished(), "the pipeline waits for the broker instead of stopping");
        broker.set_available(true).unwrap();
        for _ in 0..4 {
            events.send(700);
            wait_until_read(events.sent.len(), &read, &run);
        }
        stop.stop();
        run.join().unwrap().unwrap()
    });
    assert_eq!(summary.records, events.sent.len() as u64, "every record read once");
    assert_closed_windows_match(&read_dir_rows(out.path()), &events.sent);
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
            let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
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
            let summary = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut Discarding, &mut |_| {}).unwrap();
            assert_eq!((summary.records, summary.rejected), (30, 30), "{mode}");
            let letters = read_dir_rows(dead.path());
            assert_eq!(letters.len(), 30, "{mode}");
            let reason = letters[0]["reason"].as_str().unwrap();
            assert!(reason.contains("failed in hostile 0.1.0 2 times") && reason.contains(expected), "{mode}: {reason}");
            // Stopped (the default): the run ends with the trap, named.
            let mut p = pipeline(&bootstrap, &["target"], StartingOffsets::Earliest, Some(10), vec![hostile(mode, tight, OnFailure::Stop)]);
            p.source.group_id = format!("hostile-stop-{mode}");
            let e = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut Discarding, &mut |_| {}).unwrap_err();
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
