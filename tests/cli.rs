//! The `sluice` binary as a user runs it: `plugin inspect`, `plugin test`, `demo`, and the
//! messages for input a user can get wrong.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice_tests::reference::{self, AdClicksParams, WindowRow};

fn sluice(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).env("SLUICE_CACHE_DIR", cache).env("SLUICE_LOG", "warn").output().expect("run sluice")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inspect_prints_name_version_kind_state_version_and_schema() {
    let cache = tempfile::tempdir().unwrap();
    let out = sluice(&["plugin", "inspect", "builtin:ad-clicks"], cache.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in ["name:          ad-clicks", "version:       1.0.0", "kind:          aggregate", "state version: 2", "window_start   Int64", "unique_users   Int64"] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }
    let out = sluice(&["plugin", "inspect", "builtin:json-filter", "--json"], cache.path());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "transform");
    assert_eq!(doc["output_schema"][5]["name"], "value");
}

#[test]
fn plugin_test_prints_the_windows_of_a_jsonl_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = EventGenerator::new(EventSpec { events_per_sec: 100, ..EventSpec::default() });
    let events: Vec<Value> = (0..3000).map(|_| serde_json::to_value(g.next_event()).unwrap()).collect();
    let mut file = String::new();
    for (i, e) in events.iter().enumerate() {
        file.push_str(&e.to_string());
        file.push('\n');
        if i == 10 {
            file.push_str("{\"campaign_id\": \"c\", \"cost\": 1}\n");
        }
    }
    let input = dir.path().join("clicks.jsonl");
    std::fs::write(&input, file).unwrap();
    let out = sluice(&["plugin", "test", "builtin:ad-clicks", "--input", input.to_str().unwrap(), "--batch-size", "100"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut rows: Vec<WindowRow> = text(&out.stdout).lines().map(|l| WindowRow::from_json(&serde_json::from_str(l).unwrap())).collect();
    rows.sort_by(|a, b| (a.window_start, &a.campaign_id).cmp(&(b.window_start, &b.campaign_id)));
    assert_eq!(rows, reference::ad_clicks(&events, AdClicksParams::default(), Some(100)));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 12: rejected: unexpected JSON content: missing field `user_id`"), "{stderr}");
    assert!(stderr.contains("ad-clicks: 3001 records in 31 batches"), "{stderr}");
}

#[test]
fn plugin_test_takes_config_inline_or_from_json_and_toml_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"n\": 1, \"s\": \"a\"}\n{\"n\": 5, \"s\": \"b\"}\n").unwrap();
    let toml = dir.path().join("filter.toml");
    std::fs::write(&toml, "select = [\"s\"]\n[[where]]\nfield = \"n\"\nop = \"gt\"\nvalue = 2\n").unwrap();
    let json_file = dir.path().join("filter.json");
    std::fs::write(&json_file, r#"{"where": [{"field": "n", "op": "lt", "value": 2}]}"#).unwrap();
    let inline = r#"{"select": ["n"]}"#;
    for (config, expected) in
        [(toml.to_str().unwrap(), vec![json!({"s": "b"})]), (json_file.to_str().unwrap(), vec![json!({"n": 1, "s": "a"})]), (inline, vec![json!({"n": 1}), json!({"n": 5})])]
    {
        let out = sluice(&["plugin", "test", "builtin:json-filter", "-i", input.to_str().unwrap(), "-c", config], dir.path());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let rows: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows, expected, "config {config}");
    }
}

#[test]
fn mistakes_get_a_message_that_says_what_is_wrong_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{}\n").unwrap();
    let not_wasm = dir.path().join("plugin.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    let input = input.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["plugin", "inspect", not_wasm.to_str().unwrap()], "not a WebAssembly file"),
        (vec!["plugin", "inspect", "builtin:nope"], "there is no built-in plugin `nope`; built-in plugins are: json-filter, ad-clicks"),
        (vec!["plugin", "inspect", sluice_tests::OTHER_WORLD_WASM], "not a sluice plugin: it does not export `describe`"),
        (
            vec!["plugin", "test", "builtin:json-filter", "-i", input, "-c", r#"{"wher": []}"#],
            "invalid config: unknown field `wher`, expected one of `where`, `select`, `on_invalid`",
        ),
        (vec!["plugin", "test", "builtin:json-filter", "-i", input, "-c", "{oops"], "--config is not valid JSON"),
        (vec!["plugin", "test", "builtin:json-filter", "-i", input, "-c", "missing.json"], "neither inline JSON"),
        (vec!["plugin", "test", "builtin:json-filter", "-i", "/nonexistent.jsonl"], "cannot open --input /nonexistent.jsonl"),
        (vec!["plugin", "test", "builtin:json-filter", "-i", input, "--batch-size", "0"], "--batch-size must be at least 1"),
        (
            vec!["plugin", "test", sluice_tests::HOSTILE_WASM, "-i", input, "-c", r#"{"mode": "spin"}"#, "--call-timeout", "200ms"],
            "batch 0 (lines 1-1): plugin hostile trapped in process: time budget of 200 ms per call exceeded",
        ),
    ];
    for (args, expected) in cases {
        let out = sluice(&args, dir.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} should fail; stderr: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected `{expected}` in:\n{stderr}");
    }
}

#[test]
fn a_repartition_topic_without_an_aggregate_last_is_refused_before_the_process_joins() {
    // Caught when the plugins load, before any broker is asked (none listens here).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let pipeline = format!(
        r#"[source]
topics = ["events"]
assignment = "group"
repartition = {{ topic = "events-by-campaign", key = "campaign_id" }}
[kafka]
"bootstrap.servers" = "127.0.0.1:9"
[[plugin]]
builtin = "json-filter"
[[plugin]]
builtin = "json-filter"
[sink]
format = "jsonl"
path = "{out}"
[checkpoint]
location = "{ck}"
"#,
        out = dir.path().join("out").display(),
        ck = dir.path().join("ck").display()
    );
    std::fs::write(&file, pipeline).unwrap();
    let out = sluice(&["run", file.to_str().unwrap()], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("source.repartition: the last step runs in the tasks of the repartition topic `events-by-campaign` and must be an aggregate"), "{stderr}");
}

#[test]
fn demo_runs_the_example_plugins_over_a_mock_broker_and_prints_closing_windows() {
    let cache = tempfile::tempdir().unwrap();
    let out = sluice(&["demo", "--duration", "5s", "--rate", "4000", "--interval", "500ms", "--speedup", "60", "--http", "127.0.0.1:0"], cache.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("sluice demo: mock Kafka cluster at 127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("dashboard: http://127.0.0.1:"), "the demo prints its dashboard's URL: {stderr}");
    let windows = stdout.lines().filter(|l| l.starts_with("window ")).count();
    // 5 s at x60 is 300 s of event time: the first windows close while the demo runs.
    assert!(windows >= 12, "expected windows for all 12 campaigns, got:\n{stdout}\n{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("batch ") && !l.contains("| 0 windows closed")), "windows must close while running:\n{stderr}");
    let done = stderr.lines().find(|l| l.starts_with("done: ")).expect("a summary line");
    let numbers: Vec<u64> = done.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(numbers[0] > 10_000 && numbers[1] > 0 && numbers[1] <= numbers[0], "{done}");
}

fn produce_clicks(bootstrap: &str, topic: &str, n: usize) -> Vec<Value> {
    let loader = sluice::kafka::Loader::connect(bootstrap, &[]).unwrap();
    let mut g = EventGenerator::new(EventSpec::default());
    let events: Vec<Value> = (0..n).map(|_| serde_json::to_value(g.next_event()).unwrap()).collect();
    for e in &events {
        let value = serde_json::to_vec(e).unwrap();
        loader.send(topic, sluice::kafka::Outgoing { partition: Some(0), key: None, value: Some(&value), headers: &[] }).unwrap();
    }
    loader.flush(std::time::Duration::from_secs(30)).unwrap();
    events
}

fn pipeline_file(dir: &Path, bootstrap: &str, out: &Path) -> std::path::PathBuf {
    let file = dir.join("clicks.toml");
    std::fs::write(
        &file,
        format!(
            "[source]\ntopics = [\"events\"]\nstartingOffsets = \"earliest\"\n[trigger]\nprocessingTime = \"100ms\"\n[kafka]\n\"bootstrap.servers\" = \"{bootstrap}\"\n\
             [[plugin]]\nbuiltin = \"json-filter\"\nconfig = {{ where = [{{ field = \"event\", op = \"eq\", value = \"click\" }}], select = [\"user_id\"] }}\n\
             [sink]\nformat = \"jsonl\"\npath = \"{}\"\n[checkpoint]\nlocation = \"{}\"\n",
            out.display(),
            dir.join("checkpoint").display()
        ),
    )
    .unwrap();
    file
}

fn sink_rows(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|entries| entries.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default().lines().count()).sum()).unwrap_or(0)
}

#[test]
fn run_available_now_processes_a_topic_and_exits() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("events", 1, 1).unwrap();
    let events = produce_clicks(&cluster.bootstrap_servers(), "events", 500);
    let clicks = events.iter().filter(|e| e["event"] == "click").count();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let file = pipeline_file(dir.path(), &cluster.bootstrap_servers(), &out_dir);
    let out = sluice(&["run", file.to_str().unwrap(), "--available-now"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sink_rows(&out_dir), clicks);
    assert!(text(&out.stderr).contains(&format!("500 records in, {clicks} rows out, 0 rejected")), "{}", text(&out.stderr));

    // The checkpoint it left, as `sluice checkpoint show` lists it.
    let checkpoint = dir.path().join("checkpoint");
    let out = sluice(&["checkpoint", "show", checkpoint.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in ["pipeline clicks, topics events, format 1", "batch 0 ", "committed", "next offsets events/0@500", "json-filter 1.0.0 (sha256:", "stateless"] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }
    let out = sluice(&["checkpoint", "show", checkpoint.to_str().unwrap(), "--json"], dir.path());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = doc["checkpoints"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["tasks"][0]["positions"][0]["next"], 500);
    assert_eq!(last["committed"], true);

    // A second run resumes from the checkpoint: nothing new, nothing read again.
    let again = sluice(&["run", file.to_str().unwrap(), "--available-now"], dir.path());
    assert!(text(&again.stderr).contains("0 records in"), "{}", text(&again.stderr));
    assert_eq!(sink_rows(&out_dir), clicks);

    let out = sluice(&["checkpoint", "show", out_dir.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("holds no sluice checkpoint"), "{}", text(&out.stderr));
}

#[test]
fn run_stops_on_sigterm_after_finishing_its_batch_and_exits_zero() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("events", 1, 1).unwrap();
    produce_clicks(&cluster.bootstrap_servers(), "events", 200);
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let file = pipeline_file(dir.path(), &cluster.bootstrap_servers(), &out_dir);
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", file.to_str().unwrap(), "--http", "127.0.0.1:0"])
        .env("SLUICE_CACHE_DIR", dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while sink_rows(&out_dir) == 0 && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("stopped after"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(": dashboard at http://127.0.0.1:"), "--http prints the dashboard's URL: {}", text(&out.stderr));
    assert!(sink_rows(&out_dir) > 0);
}

#[test]
fn check_loads_a_pipeline_and_its_plugins_without_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/good/ad-clicks.toml");
    let out = sluice(&["check", example.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("pipeline ad-performance: OK"), "{stdout}");
    assert!(stdout.contains("plugins  json-filter 1.0.0 (transform) -> ad-clicks 1.0.0 (aggregate)"), "{stdout}");

    let base = "[source]\ntopics = [\"t\"]\n[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9\"\n[sink]\nformat = \"jsonl\"\npath = \"-\"\n";
    let cases = [
        ("[[plugin]]\nbuiltin = \"ad-clicks\"\n[[plugin]]\nbuiltin = \"json-filter\"\n", "plugin ad-clicks is an aggregate and must be the last step of the chain"),
        (
            "[[plugin]]\nbuiltin = \"json-filter\"\nconfig = { select = \"id\" }\n",
            "plugin[0]: plugin json-filter: init failed: invalid config: invalid type: string \"id\", expected a sequence",
        ),
        ("[[plugin]]\npath = \"missing.wasm\"\n", "plugin[0]: cannot read plugin file"),
        ("[[plugin]]\nbuiltin = \"nope\"\n", "plugin[0]: there is no built-in plugin `nope`"),
    ];
    for (steps, expected) in cases {
        let file = dir.path().join("p.toml");
        std::fs::write(&file, format!("{base}{steps}")).unwrap();
        let out = sluice(&["check", file.to_str().unwrap()], dir.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{steps}: {stderr}");
        assert!(stderr.contains(expected), "{steps}: expected `{expected}` in {stderr}");
    }
}

#[test]
fn check_reads_named_plugins_and_their_config_from_the_plugin_directory() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[source]\ntopics = [\"t\"]\n[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9\"\n[[plugin]]\nname = \"ad-clicks\"\n[sink]\nformat = \"jsonl\"\npath = \"-\"\n",
    )
    .unwrap();
    let check = |extra: &[&str]| {
        let mut args = vec!["check", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        sluice(&args, dir.path())
    };
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("plugin[0] names plugin `ad-clicks`, which is `ad-clicks.wasm` in the plugin directory, but none is set"), "{}", text(&out.stderr));
    let with_dir = ["--plugin-dir", plugins.to_str().unwrap()];
    let out = check(&with_dir);
    assert!(text(&out.stderr).contains(&format!("cannot read {}", plugins.join("ad-clicks.wasm").display())), "{}", text(&out.stderr));

    std::fs::copy(sluice_tests::AD_CLICKS_V2_WASM, plugins.join("ad-clicks.wasm")).unwrap();
    std::fs::write(plugins.join("ad-clicks.toml"), "window_ms = 10\nslide_ms = 20\n").unwrap();
    let out = check(&with_dir);
    assert!(text(&out.stderr).contains("init failed: invalid config") && text(&out.stderr).contains("must not exceed the window size"), "{}", text(&out.stderr));
    std::fs::write(plugins.join("ad-clicks.toml"), "window_ms = [").unwrap();
    let out = check(&with_dir);
    assert!(text(&out.stderr).contains(&plugins.join("ad-clicks.toml").display().to_string()), "{}", text(&out.stderr));
    std::fs::write(plugins.join("ad-clicks.toml"), "window_ms = 20000\n").unwrap();
    let out = check(&with_dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("plugins  ad-clicks 2.0.0 (aggregate)") && stdout.contains("plugin directory"), "{stdout}");
}

#[test]
fn sighup_applies_new_rate_settings_from_the_pipeline_file_while_running() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("events", 1, 1).unwrap();
    produce_clicks(&cluster.bootstrap_servers(), "events", 3_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tuned.toml");
    let write = |rate: u32| {
        let text = format!(
            "[source]\ntopics = [\"events\"]\nstartingOffsets = \"earliest\"\nmaxRatePerPartition = {rate}\n[trigger]\nprocessingTime = \"100ms\"\n\
             [kafka]\n\"bootstrap.servers\" = \"{}\"\n[[plugin]]\nbuiltin = \"json-filter\"\n[sink]\nformat = \"jsonl\"\npath = \"{}\"\n\
             [checkpoint]\nlocation = \"{}\"\n",
            cluster.bootstrap_servers(),
            dir.path().join("out").display(),
            dir.path().join("checkpoint").display()
        );
        std::fs::write(&file, text).unwrap();
    };
    write(100);
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_sluice")).args(["run", file.to_str().unwrap()]).env("SLUICE_CACHE_DIR", dir.path()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                lines.lock().unwrap().push(line.unwrap());
            }
        })
    };
    let seen = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
    let wait = |needle: &str| {
        let started = std::time::Instant::now();
        while !seen(needle) && started.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(seen(needle), "no `{needle}` in:\n{}", lines.lock().unwrap().join("\n"));
    };
    // Not a terminal: each batch's progress record is logged.
    wait(r#""records":10,"#); // 100 records/s × 100 ms
    wait(r#""plugins":[{"plugin":"json-filter 1.0.0","ms":"#);
    // A broken file keeps the running settings.
    std::fs::write(&file, "[source]\n").unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    wait("not retuned, the current settings stay");
    write(1_000);
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    wait("retuned from");
    wait(r#""records":100,"#);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert_eq!(status.code(), Some(0));
    let text = lines.lock().unwrap().join("\n");
    assert!(text.contains("partition rates PartitionRates { max: Some(100.0), min: None } -> PartitionRates { max: Some(1000.0), min: None }"), "{text}");
}
