//! The crash suite: `sluice run` as a child process over records on a real broker (tansu),
//! killed with SIGKILL at random moments and restarted until it finishes. Each trial starts
//! from empty output and checkpoint locations; after it, the Parquet sink must hold exactly
//! the window rows of a run that was never killed — none lost, none twice.
//!
//! `SLUICE_CRASH_TRIALS` sets the number of trials (default 20), `SLUICE_CRASH_SEED` the
//! seed of the kill moments (printed, so a failing trial can be run again).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice::broker::{Broker, Tansu};
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};

const RECORDS: usize = 8_000;
const PARTITIONS: i32 = 4;
/// Kills at most this many times per trial; the run after the last kill finishes.
const KILLS_PER_TRIAL: usize = 3;

/// A small PRNG (xorshift64*), so kill moments can be replayed from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn produce(broker: &dyn Broker) {
    let loader = Loader::connect(&broker.bootstrap(), broker.exact_producer_settings()).unwrap();
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: 200, ..EventSpec::default() });
    for i in 0..RECORDS {
        let event = gen.next_event();
        let value = serde_json::to_vec(&event).unwrap();
        let record = Outgoing { partition: Some(i as i32 % PARTITIONS), key: Some(event.campaign_id.as_bytes()), value: Some(&value), headers: &[] };
        loader.send("clicks", record).unwrap();
    }
    loader.flush(Duration::from_secs(60)).unwrap();
}

/// A pipeline file for one trial: its own group, output and checkpoint locations.
fn pipeline_file(dir: &Path, bootstrap: &str, name: &str) -> std::path::PathBuf {
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"name = "{name}"
[source]
topics = ["clicks"]
startingOffsets = "earliest"
maxOffsetsPerTrigger = 400
[trigger]
processingTime = "20ms"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[plugin]]
builtin = "json-filter"
config = {{ where = [{{ field = "event", op = "eq", value = "click" }}] }}
[[plugin]]
builtin = "ad-clicks"
config = {{ window_ms = 10000, slide_ms = 5000, watermark_delay_ms = 5000 }}
[sink]
format = "parquet"
path = "{out}"
[checkpoint]
location = "{ck}"
retain = 3
"#,
        out = dir.join(format!("{name}-out")).display(),
        ck = dir.join(format!("{name}-checkpoint")).display(),
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn spawn(file: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--available-now"])
        .arg(file)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// Window rows of the Parquet files a reader sees, as sortable text.
fn rows(out: &Path) -> Vec<String> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return rows };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap().build().unwrap();
            for batch in reader {
                rows.extend(sluice::offline::json_lines(&batch.unwrap()));
            }
        }
    }
    rows.sort();
    rows
}

/// Rows of `a` not matched one-for-one in `b`.
fn missing(a: &[String], b: &[String]) -> usize {
    let mut left: BTreeMap<&str, i64> = BTreeMap::new();
    for r in b {
        *left.entry(r).or_default() += 1;
    }
    a.iter()
        .filter(|r| {
            let n = left.entry(r).or_default();
            *n -= 1;
            *n < 0
        })
        .count()
}

#[test]
fn killed_at_random_moments_the_pipeline_loses_and_duplicates_no_row() {
    let trials: usize = std::env::var("SLUICE_CRASH_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("SLUICE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let broker = Tansu::start().unwrap();
    broker.create_topic("clicks", PARTITIONS).unwrap();
    produce(&broker);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");

    let started = Instant::now();
    let status = spawn(&pipeline_file(dir.path(), &broker.bootstrap(), "fault-free"), &log).wait().unwrap();
    let clean_run = started.elapsed();
    assert!(status.success(), "the fault-free run failed: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let expected = rows(&dir.path().join("fault-free-out"));
    assert!(!expected.is_empty(), "the fault-free run closed windows");

    let mut rng = Rng(seed);
    let (mut kills, mut lost, mut duplicated, mut runs) = (0, 0, 0, 0);
    for trial in 0..trials {
        let file = pipeline_file(dir.path(), &broker.bootstrap(), &format!("trial-{trial}"));
        let mut kills_here = 0;
        loop {
            let mut child = spawn(&file, &log);
            runs += 1;
            if kills_here < KILLS_PER_TRIAL {
                let delay = Duration::from_millis(rng.below(clean_run.as_millis() as u64 + 1));
                let deadline = Instant::now() + delay;
                while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if child.try_wait().unwrap().is_none() {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    kills_here += 1;
                    continue;
                }
            }
            let status = child.wait().unwrap();
            assert!(status.success(), "trial {trial} (seed {seed}): a restart failed: {}", std::fs::read_to_string(&log).unwrap_or_default());
            break;
        }
        let actual = rows(&dir.path().join(format!("trial-{trial}-out")));
        let (l, d) = (missing(&expected, &actual), missing(&actual, &expected));
        lost += l;
        duplicated += d;
        assert_eq!((l, d), (0, 0), "trial {trial} (seed {seed}): {l} rows lost, {d} rows duplicated or wrong");
    }
    eprintln!(
        "crash suite: seed {seed}, {trials} trials, {kills} kills, {runs} runs, {} expected rows per trial, {lost} rows lost, {duplicated} rows duplicated",
        expected.len()
    );
    assert!(kills * 2 >= trials, "too few kills landed before a run finished ({kills} in {trials} trials)");
}
