//! The dashboard in a real browser: `sluice demo` runs with its HTTP server on a free
//! loopback port, headless Chromium (Debian's `chromium`; `.ci/chromium` installs it when
//! it is missing) loads the dashboard, and the test checks that every chart drew the
//! batches it was given. A screenshot is saved to `target/test-artifacts/dashboard.png`.
//! The same run checks `/metrics` and `/progress` as a scraper sees them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The demo, stopped (SIGINT by PID, then SIGKILL) when the test ends, passed or not.
struct Demo {
    child: Child,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn chromium() -> PathBuf {
    if let Some(p) = on_path("chromium") {
        return p;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/chromium");
    let status = Command::new("bash").arg(&script).status().expect("run .ci/chromium");
    assert!(status.success(), "installing Chromium failed; run {} by hand to see why", script.display());
    on_path("chromium").expect("chromium on PATH after .ci/chromium")
}

/// GET `path` from `addr` (`host:port`): status line and body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {response:?}"));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of `attribute` on the element with `id` in serialized HTML.
fn attribute(html: &str, id: &str, attribute: &str) -> Option<String> {
    let start = html.find(&format!("id=\"{id}\""))?;
    let tag_start = html[..start].rfind('<')?;
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let at = tag.find(&format!("{attribute}=\""))? + attribute.len() + 2;
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

fn browser(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--virtual-time-budget=5000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[test]
fn the_dashboard_of_a_running_demo_draws_its_charts_in_headless_chromium() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--duration", "300s", "--rate", "3000", "--interval", "500ms", "--speedup", "30", "--http", "127.0.0.1:0"])
        .env("SLUICE_CACHE_DIR", dir.path())
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice demo");
    let mut demo = Demo { child };
    let (lines_tx, lines) = mpsc::channel();
    let stderr = demo.child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let url = loop {
        let line = lines.recv_timeout(Duration::from_secs(120)).expect("the demo prints its dashboard's URL");
        if let Some(rest) = line.strip_prefix("dashboard: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{url}");

    // Wait for a few batches, as the dashboard's first poll would.
    let started = Instant::now();
    let progress = loop {
        let (status, body) = get(&addr, "/progress");
        assert!(status.contains(" 200 "), "{status}");
        let progress: Value = serde_json::from_str(&body).unwrap();
        if progress["progress"].as_array().is_some_and(|p| p.len() >= 4) {
            break progress;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no batches after 2 minutes: {progress}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(progress["pipeline"], "demo");
    let last = progress["progress"].as_array().unwrap().last().unwrap();
    assert_eq!(last["interval_ms"], 500.0);
    let plugins: Vec<&str> = last["plugins"].as_array().unwrap().iter().map(|p| p["plugin"].as_str().unwrap()).collect();
    assert_eq!(plugins, ["json-filter 1.0.0", "ad-clicks 1.0.0"]);

    let (status, metrics) = get(&addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    let sample = |series: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).unwrap_or_else(|| panic!("no {series} in\n{metrics}")).parse().unwrap()
    };
    assert!(sample("sluice_batches_total") >= 4.0);
    assert!(sample("sluice_input_records_total") > 0.0);
    assert!(sample("sluice_batch_duration_seconds_count") >= 4.0);
    assert!(sample("sluice_plugin_seconds_total{plugin=\"ad-clicks\",version=\"1.0.0\"}") > 0.0);
    assert!(sample("sluice_plugin_seconds_total{plugin=\"json-filter\",version=\"1.0.0\"}") > 0.0);
    assert!(sample("sluice_batch_interval_seconds") == 0.5);
    for series in ["sluice_consumer_lag_records", "sluice_dead_letters_total", "sluice_plugin_swaps_total", "sluice_checkpoint_duration_seconds_sum"] {
        sample(series);
    }

    let dom = browser(&chromium, &dir.path().join("profile-dom"), &["--dump-dom"], &url);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success() && html.contains("<canvas"), "chromium --dump-dom failed: {}\n{html}", String::from_utf8_lossy(&dom.stderr));
    for (chart, series) in [("rates", 2), ("durations", 2), ("lag", 1), ("plugins", 2)] {
        let points: usize = attribute(&html, chart, "data-points").and_then(|p| p.parse().ok()).unwrap_or_default();
        let drawn: usize = attribute(&html, chart, "data-series").and_then(|p| p.parse().ok()).unwrap_or_default();
        assert!(points >= 4, "chart {chart} drew {points} points:\n{html}");
        assert_eq!(drawn, series, "chart {chart}");
    }
    assert!(html.contains("recent batches, updated"), "status line:\n{html}");
    assert!(html.contains("json-filter 1.0.0") && html.contains("ad-clicks 1.0.0"), "plugin legend:\n{html}");

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.canonicalize().unwrap().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = browser(&chromium, &dir.path().join("profile-shot"), &[&format!("--screenshot={}", shot.display()), "--window-size=1280,1000", "--hide-scrollbars"], &url);
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {} ({e}): {}", shot.display(), String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a {} byte screenshot", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());
    drop(demo);
}

#[test]
fn a_consumer_group_process_lists_its_tasks_in_headless_chromium() {
    use sluice::progress::{BatchProgress, Observer};
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    // The server of a group run, fed as its batch loop feeds it: the tasks it owns, then
    // batches of two of them.
    let observed = sluice::http::Observed::new("group");
    let server = sluice::http::Server::start("127.0.0.1:0", observed.clone()).unwrap();
    let history = observed.history.as_ref();
    history.tasks(&["clicks/0".into(), "clicks/1".into(), "by-campaign/2".into()]);
    for (task, batch_id, records, lag) in [("clicks/0", 7, 120, 30), ("by-campaign/2", 3, 45, 0)] {
        let p =
            BatchProgress { batch_id, task: Some(task.into()), records, lag, watermark_ms: Some(1_767_225_600_000), timestamp_ms: 1_767_225_660_000, ..BatchProgress::default() };
        history.batch(&p, &p.to_json());
    }
    let dom = browser(&chromium, &dir.path().join("profile"), &["--dump-dom"], &server.url());
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success(), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&dom.stderr));
    assert_eq!(attribute(&html, "tasks", "data-rows").as_deref(), Some("3"), "a row per task:\n{html}");
    let row = |task: &str| html.split("<tr>").find(|r| r.starts_with(&format!("<td>{task}</td>"))).unwrap_or_else(|| panic!("no row for {task}:\n{html}")).to_string();
    assert!(row("clicks/0").starts_with("<td>clicks/0</td><td>7</td><td>120</td><td>30</td><td>00:00:00</td><td>00:01:00</td>"), "{}", row("clicks/0"));
    assert!(row("clicks/1").contains("no batch yet"), "{}", row("clicks/1"));
    assert!(row("by-campaign/2").starts_with("<td>by-campaign/2</td><td>3</td><td>45</td><td>0</td>"), "{}", row("by-campaign/2"));
}
