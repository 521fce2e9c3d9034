//! Plugins swapped live from the plugin directory while events keep coming.

use super::*;

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

pub(super) fn plugins_are_swapped_live_without_losing_or_repeating_a_record(broker: &dyn Broker) {
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
    let stop = Control::new();
    let mut events = EventStream::new(broker, "swap-clicks", 2);
    let summary = std::thread::scope(|scope| {
        let _stop_on_failure = StopOnDrop(&stop);
        let run = scope.spawn(|| {
            let mut sink = jsonl_dir(out.path());
            pipeline::run(&checked(&p), &runtime(), Until::Stopped, &stop, &mut sink, &mut |b| {
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
        stop.stop();
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
