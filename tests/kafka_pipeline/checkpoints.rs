//! Restarts from checkpoints: plugin state, replayed plans, damaged checkpoints, state a
//! new plugin version cannot read.

use super::*;

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
    let stop = Control::new();
    let mut ids = Vec::new();
    pipeline::run(&checked(p), &runtime(), Until::AvailableNow, &stop, sink, &mut |b| {
        ids.push(b.batch_id);
        if Some(ids.len()) == stop_after {
            stop.stop();
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

pub(super) fn a_restart_resumes_from_the_checkpoint_with_plugin_state_and_matches_an_uninterrupted_run(broker: &dyn Broker) {
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

pub(super) fn a_batch_that_failed_after_it_was_planned_is_replayed_with_its_recorded_ranges(broker: &dyn Broker) {
    broker.create_topic("events", 2).unwrap();
    // id i lands on partition i % 2 at offset i / 2.
    produce_ids(broker, "events", &[0, 1], 0..500);
    let (ck, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = with_checkpoint(pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, Some(100), vec![builtin("json-filter", "{}")]), ck.path());
    let mut sink = Recording::new(out.path());
    sink.fail_commit_of = Some(2);
    let error = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut sink, &mut |_| {}).unwrap_err();
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

pub(super) fn a_damaged_newest_checkpoint_falls_back_to_the_one_before_without_writing_a_batch_twice(broker: &dyn Broker) {
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
    let error = pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("state version 99") && error.contains("--ignore-state"), "{error}");
    let options = RunOptions { until: Until::AvailableNow, ignore_state: true, ..Default::default() };
    let summary = pipeline::run(&checked(&p), &runtime(), options, &Control::new(), &mut jsonl_dir(out.path()), &mut |_| {}).unwrap();
    assert_eq!(summary.records, 10, "fresh state, resumed at the checkpoint's offsets");
}
