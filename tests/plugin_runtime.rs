//! The plugin runtime end to end, with the example plugins and the hostile test plugins
//! compiled from source: results against independent computations, snapshot/restore,
//! edge cases, and every kind of misbehaviour contained with a clear error.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::examples;
use sluice::offline::{self, Sink, Summary};
use sluice::runtime::{CallError, Limits, LoadError, LoadedPlugin, PluginInstance, Runtime, TrapKind};
use sluice_sdk::json::JsonRows;
use sluice_sdk::{Context, ErrorKind, PluginKind, RecordParts, RecordsBuilder};
use sluice_tests::reference::{self, AdClicksParams, WindowRow};

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(None).expect("runtime"))
}

fn load(bytes: &[u8], name: &str) -> LoadedPlugin {
    runtime().load(bytes, name, Limits::default()).expect("example plugin loads")
}

fn hostile(limits: Limits) -> LoadedPlugin {
    runtime().load_file(sluice_tests::HOSTILE_WASM, limits).expect("hostile plugin loads")
}

#[derive(Default)]
struct Collect {
    rows: Vec<Value>,
    rejected: Vec<(u64, String)>,
}

impl Sink for Collect {
    fn rows(&mut self, rows: &JsonRows) {
        self.rows.extend(rows.iter().map(|row| serde_json::from_slice::<Value>(row).unwrap()));
    }
    fn rejected(&mut self, line: u64, reason: &str) {
        self.rejected.push((line, reason.to_string()));
    }
}

fn run_lines(instance: &mut PluginInstance, lines: &[Vec<u8>], batch_size: usize) -> (Summary, Collect) {
    let mut input = Vec::new();
    for l in lines {
        input.extend_from_slice(l);
        input.push(b'\n');
    }
    let mut sink = Collect::default();
    let summary = offline::run(instance, &input[..], batch_size, &mut sink).expect("run succeeds");
    (summary, sink)
}

/// Seed-style events, out of order by up to 5 s (less than the 60 s watermark delay).
fn events(n: usize, seed: u64) -> Vec<Value> {
    let mut g = EventGenerator::new(EventSpec { seed, events_per_sec: 200, users: 400, ..EventSpec::default() });
    (0..n).map(|_| serde_json::to_value(g.next_event()).unwrap()).collect()
}

fn to_lines(values: &[Value]) -> Vec<Vec<u8>> {
    values.iter().map(|v| serde_json::to_vec(v).unwrap()).collect()
}

fn sorted_rows(rows: &[Value]) -> Vec<WindowRow> {
    let mut out: Vec<WindowRow> = rows.iter().map(WindowRow::from_json).collect();
    out.sort_by(|a, b| (a.window_start, &a.campaign_id).cmp(&(b.window_start, &b.campaign_id)));
    out
}

fn assert_same_windows(actual: &[Value], expected: &[WindowRow]) {
    let actual = sorted_rows(actual);
    assert_eq!(actual.len(), expected.len(), "number of windows");
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(a, e);
    }
}

#[test]
fn ad_clicks_in_one_batch_equals_the_independent_computation() {
    let data = events(12_000, 1);
    let mut instance = load(examples::AD_CLICKS, "ad-clicks").instantiate("{}").unwrap();
    let (summary, out) = run_lines(&mut instance, &to_lines(&data), data.len());
    assert_eq!(summary.batches, 1);
    let expected = reference::ad_clicks(&data, AdClicksParams::default(), None);
    assert!(expected.len() > 100, "the data set must span many windows, got {}", expected.len());
    assert_same_windows(&out.rows, &expected);
    assert_eq!((summary.rejected, summary.late), (0, 0));
}

#[test]
fn ad_clicks_in_many_small_batches_equals_the_independent_computation() {
    let data = events(12_000, 2);
    let expected = reference::ad_clicks(&data, AdClicksParams::default(), None);
    for batch_size in [1, 7, 250] {
        let mut instance = load(examples::AD_CLICKS, "ad-clicks").instantiate("{}").unwrap();
        let (summary, out) = run_lines(&mut instance, &to_lines(&data), batch_size);
        assert_eq!(summary.batches as usize, data.len().div_ceil(batch_size));
        assert_same_windows(&out.rows, &expected);
        // Append mode: each (window, campaign) is emitted exactly once.
        assert_eq!(out.rows.len(), expected.len(), "batch size {batch_size}: a window was emitted twice");
    }
}

#[test]
fn ad_clicks_emits_windows_as_the_watermark_passes_not_only_at_the_end() {
    // 30 000 events at 200/s span 150 s of event time: windows ending before the watermark
    // (newest event − 60 s) must come out while the data is still flowing.
    let data = events(30_000, 3);
    let mut instance = load(examples::AD_CLICKS, "ad-clicks").instantiate("{}").unwrap();
    let lines = to_lines(&data);
    let mut emitted_before_flush = 0;
    let mut watermark = None;
    for (i, chunk) in lines.chunks(3000).enumerate() {
        let out = instance.process(&batch(chunk, (i * 3000) as i64), &ctx(i as u64, watermark)).unwrap();
        watermark = out.watermark_ms.or(watermark);
        emitted_before_flush += out.batches.iter().map(|b| b.num_rows()).sum::<usize>();
    }
    let max_ts = data.iter().map(|v| v["timestamp"].as_i64().unwrap()).max().unwrap();
    assert_eq!(watermark, Some(max_ts - 60_000), "watermark is the newest event time minus the delay");
    assert!(emitted_before_flush > 0, "closed windows must be emitted before the final flush");
}

fn batch(values: &[Vec<u8>], first_offset: i64) -> arrow_array::RecordBatch {
    let mut b = RecordsBuilder::default();
    for (i, v) in values.iter().enumerate() {
        let parts = RecordParts { topic: "t", partition: 0, offset: first_offset + i as i64, timestamp: None, key: None, value: Some(v) };
        b.append(parts, []);
    }
    b.finish()
}

fn ctx(batch_id: u64, watermark_ms: Option<i64>) -> Context {
    Context { batch_id, watermark_ms, ..Context::default() }
}

#[test]
fn ad_clicks_survives_snapshot_and_restore_into_a_fresh_instance_between_every_batch() {
    let mut data = events(8_000, 4);
    // Mix in events far behind the watermark so that late-data handling is part of the state.
    for i in (500..data.len()).step_by(997) {
        let mut late = data[i].clone();
        late["timestamp"] = json!(late["timestamp"].as_i64().unwrap() - 10 * 60_000);
        data.insert(i, late);
    }
    let lines = to_lines(&data);
    let plugin = load(examples::AD_CLICKS, "ad-clicks");
    let state_version = plugin.info().state_version;
    let mut rows = Vec::new();
    let mut watermark = None;
    let mut late = 0;
    let mut state: Option<Vec<u8>> = None;
    let chunks: Vec<_> = lines.chunks(300).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        // A brand-new instance for every batch, restored from the previous snapshot.
        let mut instance = plugin.instantiate("{}").unwrap();
        if let Some(s) = &state {
            instance.restore(s, state_version).unwrap();
        }
        let out = instance.process(&batch(chunk, (i * 300) as i64), &ctx(i as u64, watermark)).unwrap();
        watermark = out.watermark_ms.or(watermark);
        late += out.late_records;
        for b in &out.batches {
            rows.extend(sluice::sink::json_lines(b).unwrap().iter().map(|l| serde_json::from_slice::<Value>(l).unwrap()));
        }
        state = Some(instance.snapshot().unwrap());
    }
    let mut instance = plugin.instantiate("{}").unwrap();
    instance.restore(state.as_ref().unwrap(), state_version).unwrap();
    let out = instance.process(&batch(&[], 0), &ctx(chunks.len() as u64, Some(i64::MAX))).unwrap();
    for b in &out.batches {
        rows.extend(sluice::sink::json_lines(b).unwrap().iter().map(|l| serde_json::from_slice::<Value>(l).unwrap()));
    }
    let expected = reference::ad_clicks(&data, AdClicksParams::default(), Some(300));
    assert_same_windows(&rows, &expected);
    assert!(late > 0, "the very late events must be counted as late");
}

#[test]
fn ad_clicks_window_length_slide_and_delay_are_configurable() {
    let data = events(3_000, 5);
    for (params, late_expected) in
        [(AdClicksParams { window_ms: 20_000, slide_ms: 5_000, delay_ms: 1_000 }, false), (AdClicksParams { window_ms: 5_000, slide_ms: 5_000, delay_ms: 1_000 }, true)]
    {
        let config = json!({"window_ms": params.window_ms, "slide_ms": params.slide_ms, "watermark_delay_ms": params.delay_ms});
        let mut instance = load(examples::AD_CLICKS, "ad-clicks").instantiate(&config.to_string()).unwrap();
        let (summary, out) = run_lines(&mut instance, &to_lines(&data), 100);
        // A 1 s delay is shorter than the 5 s disorder: events miss windows that already
        // closed, exactly as the reference predicts for batches of 100.
        let expected = reference::ad_clicks(&data, params, Some(100));
        assert_same_windows(&out.rows, &expected);
        assert_ne!(expected, reference::ad_clicks(&data, params, None), "{config}: some events must miss closed windows");
        // With tumbling windows an event has one window: missing it makes the event late.
        assert_eq!(summary.late > 0, late_expected, "{config}: late records {}", summary.late);
    }
}

#[test]
fn json_filter_handles_edge_cases_through_webassembly() {
    let config = json!({
        "where": [{"field": "kind", "op": "eq", "value": "click"}, {"field": "cost", "op": "gte", "value": 0.5}],
        "select": ["id", "geo.country"]
    })
    .to_string();
    let mut instance = load(examples::JSON_FILTER, "json-filter").instantiate(&config).unwrap();
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!(r#"{{"kind": "click", "cost": 1, "id": 9, "pad": "{}"}}"#, "x".repeat(2 << 20));
    let lines: Vec<Vec<u8>> = vec![
        br#"{"kind": "click", "cost": 0.5, "id": 1, "geo": {"country": "KR", "city": "Seoul"}}"#.to_vec(),
        br#"{"kind": "view", "cost": 3, "id": 2}"#.to_vec(),
        br#"{"kind": "click", "cost": 0.49, "id": 3}"#.to_vec(),
        br#"{"kind": "click", "cost": "1", "id": 4}"#.to_vec(),
        b"{\"kind\": \"click\", \"cost\": 1, \"id\": \"\xff\"}".to_vec(),
        br#"{"kind": "click", "cost": NaN, "id": 6}"#.to_vec(),
        deep.into_bytes(),
        br#"[1, 2, 3]"#.to_vec(),
        br#"{"kind": "click", "cost": 1e400, "id": 9}"#.to_vec(),
        huge.into_bytes(),
        br#"{"kind": "click", "cost": 7, "id": 11, "geo": null}"#.to_vec(),
    ];
    let (summary, out) = run_lines(&mut instance, &lines, 4);
    assert_eq!(out.rows, vec![json!({"id": 1, "geo": {"country": "KR"}}), json!({"id": 9}), json!({"id": 11})], "kept rows, projected");
    let rejected: Vec<u64> = out.rejected.iter().map(|(l, _)| *l).collect();
    assert_eq!(rejected, vec![5, 6, 7, 8, 9], "rejected lines: {:?}", out.rejected);
    assert!(out.rejected[2].1.contains("recursion limit"), "{:?}", out.rejected[2]);
    assert!(out.rejected[3].1.contains("not an object"), "{:?}", out.rejected[3]);
    assert!(out.rejected[4].1.contains("field `cost`: number out of range"), "{:?}", out.rejected[4]);
    assert_eq!((summary.records, summary.output_rows, summary.rejected), (11, 3, 5));
}

#[test]
fn inspect_reports_what_plugins_say_about_themselves() {
    let info = load(examples::AD_CLICKS, "ad-clicks").info().clone();
    assert_eq!((info.name.as_str(), info.version.as_str(), info.kind, info.state_version), ("ad-clicks", "1.0.0", PluginKind::Aggregate, 2));
    let columns: Vec<_> = info.output_schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(columns, ["window_start", "window_end", "campaign_id", "clicks", "total_cost", "unique_users"]);
    assert_eq!(info.content_hash.len(), 64);
    let info = load(examples::JSON_FILTER, "json-filter").info().clone();
    assert_eq!((info.kind, info.state_version), (PluginKind::Transform, 0));
    assert!(sluice_sdk::is_record_schema(&info.output_schema));
}

#[test]
fn bad_plugin_config_is_a_plugin_error_naming_the_key() {
    let err = load(examples::JSON_FILTER, "json-filter").instantiate(r#"{"select": "id"}"#).err().unwrap();
    match &err {
        CallError::Plugin { kind: ErrorKind::InvalidConfig, message, .. } => assert!(message.contains("expected a sequence"), "{message}"),
        other => panic!("expected an invalid-config error, got {other}"),
    }
    assert!(err.to_string().starts_with("plugin json-filter: init failed: invalid config"), "{err}");
    let err = load(examples::AD_CLICKS, "ad-clicks").instantiate(r#"{"slide_ms": 0}"#).err().unwrap();
    assert!(err.to_string().contains("must be positive"), "{err}");
}

#[test]
fn restoring_state_of_another_version_is_refused_and_the_instance_keeps_working() {
    let plugin = load(examples::AD_CLICKS, "ad-clicks");
    let mut instance = plugin.instantiate("{}").unwrap();
    let state = instance.snapshot().unwrap();
    let err = instance.restore(&state, 99).unwrap_err();
    assert!(matches!(err, CallError::Plugin { kind: ErrorKind::IncompatibleState, .. }), "{err}");
    assert!(err.to_string().contains("state version 99"), "{err}");
    let err = instance.restore(b"\xff\xff\xff\xff\xff\xff", plugin.info().state_version).unwrap_err();
    assert!(matches!(err, CallError::Plugin { kind: ErrorKind::IncompatibleState, .. }), "{err}");
    let lines = to_lines(&events(10, 9));
    instance.process(&batch(&lines, 0), &ctx(0, None)).expect("the instance still works");
}

fn not_a_sluice_plugin(result: Result<LoadedPlugin, LoadError>) -> String {
    match result {
        Ok(_) => panic!("must not load"),
        Err(e) => e.to_string(),
    }
}

/// After a failure, the host must still load and run a good plugin.
fn host_still_works() {
    let mut instance = load(examples::JSON_FILTER, "json-filter").instantiate("{}").unwrap();
    let out = instance.process(&batch(&[b"{\"a\":1}".to_vec()], 0), &ctx(0, None)).unwrap();
    assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
}

#[test]
fn files_that_are_not_sluice_plugins_are_refused_with_a_clear_error() {
    let text = not_a_sluice_plugin(runtime().load(b"name = \"not wasm\"\n", "config.toml", Limits::default()));
    assert!(text.contains("config.toml: not a WebAssembly file"), "{text}");
    let core_module = b"\0asm\x01\0\0\0";
    let text = not_a_sluice_plugin(runtime().load(core_module, "core.wasm", Limits::default()));
    assert!(text.contains("core WebAssembly module, not a component") && text.contains("wasm32-wasip2"), "{text}");
    let mut truncated = std::fs::read(sluice_tests::HOSTILE_WASM).unwrap();
    truncated.truncate(truncated.len() / 2);
    let text = not_a_sluice_plugin(runtime().load(&truncated, "truncated.wasm", Limits::default()));
    assert!(text.contains("truncated.wasm: not a valid WebAssembly component"), "{text}");
    let text = not_a_sluice_plugin(runtime().load_file(sluice_tests::OTHER_WORLD_WASM, Limits::default()));
    assert!(text.contains("not a sluice plugin: it does not export `describe`, `init`, `process`, `snapshot`, `restore` (it exports: `greet`)"), "{text}");
    let text = not_a_sluice_plugin(runtime().load_file("/nonexistent/plugin.wasm", Limits::default()));
    assert!(text.contains("cannot read plugin file /nonexistent/plugin.wasm"), "{text}");
    host_still_works();
}

fn trap_of(result: Result<impl std::fmt::Debug, CallError>) -> (TrapKind, String) {
    match result {
        Err(e @ CallError::Trap { .. }) => {
            let text = e.to_string();
            let CallError::Trap { trap, .. } = e else { unreachable!() };
            (trap, text)
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

fn hostile_instance(mode: &str, limits: Limits) -> PluginInstance {
    hostile(limits).instantiate(&json!({"mode": mode}).to_string()).unwrap()
}

#[test]
fn an_infinite_loop_is_stopped_by_the_time_budget() {
    let limits = Limits { call_timeout: Duration::from_millis(300), ..Limits::default() };
    let mut instance = hostile_instance("spin", limits);
    let started = Instant::now();
    let (trap, text) = trap_of(instance.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)));
    let took = started.elapsed();
    assert_eq!(trap, TrapKind::Timeout(Duration::from_millis(300)));
    assert!(text.contains("plugin hostile trapped in process: time budget of 300 ms per call exceeded"), "{text}");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "stopped after {took:?}");
    // The instance is gone; the plugin is not.
    assert!(instance.is_discarded());
    assert!(matches!(instance.snapshot(), Err(CallError::Discarded { .. })));
    hostile(Limits::default()).instantiate("{}").expect("a new instance of the same plugin works");
    host_still_works();
}

#[test]
fn an_infinite_loop_in_init_is_stopped_too() {
    let limits = Limits { call_timeout: Duration::from_millis(200), ..Limits::default() };
    let (trap, text) = trap_of(hostile(limits).instantiate(r#"{"mode": "slow-init"}"#));
    assert_eq!(trap, TrapKind::Timeout(Duration::from_millis(200)));
    assert!(text.contains("trapped in init"), "{text}");
    host_still_works();
}

#[test]
fn a_memory_bomb_is_stopped_by_the_memory_cap() {
    let limits = Limits { memory_bytes: 64 << 20, ..Limits::default() };
    let mut instance = hostile_instance("alloc", limits);
    let (trap, text) = trap_of(instance.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)));
    assert_eq!(trap, TrapKind::Memory(64 << 20), "{text}");
    assert!(text.contains("memory limit of 64 MiB exceeded"), "{text}");
    host_still_works();
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let mut instance = hostile_instance("panic", Limits::default());
    let (trap, text) = trap_of(instance.process(&batch(&[b"{}".to_vec(), b"{}".to_vec()], 0), &ctx(0, None)));
    match trap {
        TrapKind::Panic(msg) => assert!(msg.contains("hostile plugin panicked on purpose with 2 records"), "{msg}"),
        other => panic!("expected a panic, got {other:?}"),
    }
    assert!(text.contains("src/lib.rs"), "the message names the plugin's source line: {text}");
    host_still_works();
}

#[test]
fn a_stack_overflow_is_contained() {
    let mut instance = hostile_instance("recurse", Limits::default());
    let (trap, _) = trap_of(instance.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)));
    assert_eq!(trap, TrapKind::StackOverflow);
    host_still_works();
}

#[test]
fn compiled_plugins_are_cached_on_disk_and_a_corrupt_cache_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cold = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
    let info = cold.load(examples::JSON_FILTER, "json-filter", Limits::default()).unwrap().info().clone();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one artifact per plugin: {files:?}");
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with(&info.content_hash));

    let warm = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
    let meta = || std::fs::metadata(&files[0]).unwrap();
    let (inode, written, bytes) = (std::os::unix::fs::MetadataExt::ino(&meta()), meta().modified().unwrap(), std::fs::read(&files[0]).unwrap());
    std::thread::sleep(Duration::from_millis(20));
    warm.load(examples::JSON_FILTER, "json-filter", Limits::default()).unwrap();
    // A rewrite would put a new file in place (written aside, then renamed).
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&meta()), inode, "a cache hit does not rewrite the artifact");
    assert_eq!(std::fs::read(&files[0]).unwrap(), bytes);
    assert!(meta().modified().unwrap() > written, "a cache hit marks the artifact used, so that pruning keeps it longest");

    std::fs::write(&files[0], b"garbage").unwrap();
    let repaired = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
    let mut instance = repaired.load(examples::JSON_FILTER, "json-filter", Limits::default()).unwrap().instantiate("{}").unwrap();
    instance.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)).unwrap();
    assert!(std::fs::read(&files[0]).unwrap().len() > 1000, "the corrupt file was rewritten");
}

#[test]
fn output_beyond_the_size_limit_is_refused_and_the_instance_goes_on() {
    let limits = Limits { max_output_bytes: 1 << 20, ..Limits::default() };
    let mut instance = hostile_instance("flood", limits);
    let records = vec![b"{\"a\": 1}".to_vec(); 20];
    let e = instance.process(&batch(&records, 0), &ctx(0, None)).unwrap_err();
    assert!(matches!(e, CallError::BadOutput { .. }), "{e}");
    assert!(e.to_string().contains("exceeds the limit of 1.0 MiB per call (maxOutputMb)"), "{e}");
    let e = instance.process(&batch(&records, 0), &ctx(1, None)).unwrap_err();
    assert!(matches!(e, CallError::BadOutput { .. }), "the instance was kept and is refused again: {e}");
    host_still_works();
}

#[test]
fn a_plugin_gets_no_files_no_environment_and_no_network() {
    let mut instance = hostile_instance("escape", Limits::default());
    let out = instance.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)).unwrap();
    let values = sluice_sdk::Batch::new(out.batches[0].clone()).unwrap();
    let report: Value = serde_json::from_slice(values.records().next().unwrap().value().unwrap()).unwrap();
    for attempt in ["read_file", "list_dir", "write_file", "env_var", "env_vars", "connect", "args"] {
        let outcome = report[attempt].as_str().unwrap();
        assert!(outcome.starts_with("denied"), "{attempt}: {outcome} (report {report})");
    }
    assert!(!std::path::Path::new("/tmp/sluice-escape").exists());
}

#[test]
fn broken_output_from_a_plugin_without_the_sdk_is_refused_with_the_reason() {
    let loaded = runtime().load_file(sluice_tests::RAW_OUTPUT_WASM, Limits::default()).unwrap();
    for (mode, expected) in [
        ("garbage", "plugin raw-output returned invalid output from process: output is not an Arrow IPC stream"),
        ("other-schema", "output columns [\"n: Int64\"] differ from the schema declared by init"),
        ("bad-row", "rejected row 1000000 of a batch of 2 rows"),
    ] {
        let mut instance = loaded.instantiate(mode).unwrap();
        let e = instance.process(&batch(&[b"{}".to_vec(), b"{}".to_vec()], 0), &ctx(0, None)).unwrap_err();
        assert!(e.to_string().contains(expected), "{mode}: {e}");
    }
    let mut fine = loaded.instantiate("forward").unwrap();
    assert_eq!(fine.process(&batch(&[b"{}".to_vec()], 0), &ctx(0, None)).unwrap().batches[0].num_rows(), 1);
}
