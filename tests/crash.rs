//! The real-broker crash suite: `sluice run --available-now` as a child process on Apache
//! Kafka (started by the test on loopback ports, stopped by its PID), stopped at random
//! moments with SIGKILL or with SIGTERM (a clean stop) and started again with the same
//! command until it finishes. The seed's job as a user would run it: ad-clicks with its
//! default config (1-minute windows sliding 10 s, watermark delay 1 minute), events keyed by
//! `campaign_id` through the producer's default partitioner in ordinary producer batches,
//! a Parquet sink and a local checkpoint directory, over several batch sizes and partition
//! counts. After each trial the Parquet output must hold exactly the closed windows of an
//! independent batch computation of the query over the produced events
//! (`reference::windows_of_all`), each once.
//!
//! It prints trials, restarts, stops of each kind, windows lost, wrong and duplicated, and
//! failed restarts; all but the first two must be 0. `SLUICE_CRASH_TRIALS` sets the number
//! of trials (default 20), `SLUICE_CRASH_SEED` the seed of the stop moments (default 1;
//! printed, so a failing trial can be run again).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::broker::Broker;
use sluice::kafka::{Loader, Outgoing};
use sluice_bench::broker::ApacheKafka;
use sluice_tests::reference::{self, AdClicksParams, WindowDiff, WindowRow};
use sluice_tests::rng::Rng;

#[path = "support/seed_runs.rs"]
mod seed_runs;
use seed_runs::{pipeline_file, produce, topic_values, wait_until, windows, Extra, SEED_JOB};

/// Stops at most this many times per trial; the run after the last one finishes.
const STOPS_PER_TRIAL: usize = 2;
/// A run that takes longer than this has hung.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// `sluice run --available-now FILE`, logging to `log`, with one more variable if given.
fn spawn(file: &Path, log: &Path, env: Option<(&str, String)>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    command
        .args(["run", "--available-now"])
        .arg(file)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// One topic of seed-style events, its independent expected windows and the time of a
/// run without stops (to draw stop moments from).
struct Setup {
    topic: String,
    expected: Vec<WindowRow>,
    clean: Duration,
}

/// What a suite's trials add up to.
#[derive(Default)]
struct Tally {
    trials: usize,
    kills: usize,
    terms: usize,
    /// Runs that killed themselves at a kill point of the exactly-once sink.
    kill_points: usize,
    restarts: usize,
    failed_restarts: usize,
    diff: WindowDiff,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, trial: usize, what: &str, diff: WindowDiff) {
        if !diff.is_exact() {
            self.failures.push(format!("trial {trial} ({what}): {diff:?}"));
        }
        self.diff.lost += diff.lost;
        self.diff.wrong += diff.wrong;
        self.diff.duplicated += diff.duplicated;
    }

    fn report(&self, suite: &str, seed: u64, setups: &[Setup]) -> String {
        format!(
            "crash suite, {suite} (Apache Kafka {}): seed {seed}, {} trials, {} restarts ({} SIGKILL, {} SIGTERM, {} at a kill point of the sink), {} expected windows; windows lost {}, wrong {}, duplicated {}; failed restarts {}",
            sluice_bench::broker::KAFKA_VERSION,
            self.trials,
            self.restarts,
            self.kills,
            self.terms,
            self.kill_points,
            setups.iter().map(|s| s.expected.len().to_string()).collect::<Vec<_>>().join(" and "),
            self.diff.lost,
            self.diff.wrong,
            self.diff.duplicated,
            self.failed_restarts
        )
    }

    /// Fail with the failures and the end of sluice's log, if any.
    fn check(&self, seed: u64, log: &Path) {
        assert!(
            self.failures.is_empty(),
            "seed {seed}: {}\nsluice's log:\n{}",
            self.failures.join("\n"),
            std::fs::read_to_string(log).unwrap_or_default().lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        assert!(self.restarts * 2 >= self.trials, "too few stops landed before a run finished ({} in {} trials)", self.restarts, self.trials);
    }
}

fn crash_settings() -> (usize, u64) {
    let trials: usize = std::env::var("SLUICE_CRASH_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("SLUICE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    (trials, seed)
}

/// Two topics (1 and 3 partitions) of seed-style events, each with its independent
/// expected windows, and a clean Parquet run's time on each, checked against them.
fn setups(broker: &ApacheKafka, dir: &Path, log: &Path) -> Vec<Setup> {
    let mut setups = Vec::new();
    for partitions in [1, 3] {
        let topic = format!("clicks-{partitions}");
        broker.create_topic(&topic, partitions).unwrap();
        let events = produce(broker, &topic);
        let clicks: Vec<Value> = events.into_iter().filter(|e| e["event"] == "click").collect();
        let expected = reference::windows_of_all(&clicks, AdClicksParams::default(), true);
        assert!(expected.len() > 100, "the data closes windows ({})", expected.len());
        let file = pipeline_file(dir, &broker.bootstrap(), &format!("clean-{partitions}"), &topic, 3000, SEED_JOB, "parquet", &Extra::default());
        let started = Instant::now();
        let status = spawn(&file, log, None).wait().unwrap();
        assert!(status.success(), "the run without stops failed: {}", std::fs::read_to_string(log).unwrap_or_default());
        let clean = started.elapsed();
        let diff = reference::compare_windows(&expected, &windows(&dir.join(format!("clean-{partitions}-out"))));
        assert!(diff.is_exact(), "a run without stops differs from the reference on {partitions} partition(s): {diff:?}");
        setups.push(Setup { topic, expected, clean });
    }
    setups
}

/// Run `file` until a run finishes: up to [`STOPS_PER_TRIAL`] runs are stopped at a
/// random moment (SIGKILL or SIGTERM). The first run gets `first_env`, if any.
fn trial(trial: usize, file: &Path, log: &Path, clean: Duration, rng: &mut Rng, first_env: Option<(&str, String)>, tally: &mut Tally) {
    tally.trials += 1;
    let mut stops = 0;
    let mut env = first_env;
    loop {
        let kill_point = env.is_some();
        let mut child = spawn(file, log, env.take());
        if kill_point {
            // The run kills itself at its kill point, or finishes before reaching it.
            match wait_until(&mut child, Instant::now() + RUN_LIMIT) {
                Some(status) if status.code().is_none() => {
                    tally.kill_points += 1;
                    tally.restarts += 1;
                    continue;
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tally.failures.push(format!("trial {trial}: the run with a kill point ended with {other:?} instead of killing itself"));
                    break;
                }
            }
        }
        if stops < STOPS_PER_TRIAL {
            let delay = Duration::from_millis(300 + rng.below(clean.as_millis() as u64));
            if wait_until(&mut child, Instant::now() + delay).is_none() {
                stops += 1;
                tally.restarts += 1;
                if rng.below(2) == 0 {
                    child.kill().unwrap(); // SIGKILL, by the child's PID
                    tally.kills += 1;
                } else {
                    // SIGTERM: the batch in flight finishes, then the run exits 0.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    tally.terms += 1;
                }
                match wait_until(&mut child, Instant::now() + RUN_LIMIT) {
                    Some(status) if status.success() || status.code().is_none() => {}
                    other => {
                        let _ = child.kill();
                        let _ = child.wait();
                        tally.failed_restarts += 1;
                        tally.failures.push(format!("trial {trial}: a stopped run ended with {other:?}"));
                    }
                }
                continue;
            }
        }
        match wait_until(&mut child, Instant::now() + RUN_LIMIT) {
            Some(status) if status.success() => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                tally.failed_restarts += 1;
                tally.failures.push(format!("trial {trial}: a run ended with {other:?} (none: still running after {} s)", RUN_LIMIT.as_secs()));
            }
        }
        return;
    }
}

#[test]
fn stopped_at_random_moments_the_seed_job_gives_exactly_the_reference_windows() {
    let (trials, seed) = crash_settings();
    let broker = ApacheKafka::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    let setups = setups(&broker, dir.path(), &log);
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for n in 0..trials {
        let setup = &setups[n % setups.len()];
        let batch = [1000, 3000][(n / setups.len()) % 2];
        let name = format!("trial-{n}");
        let file = pipeline_file(dir.path(), &broker.bootstrap(), &name, &setup.topic, batch, SEED_JOB, "parquet", &Extra::default());
        trial(n, &file, &log, setup.clean, &mut rng, None, &mut tally);
        let diff = reference::compare_windows(&setup.expected, &windows(&dir.path().join(format!("{name}-out"))));
        tally.add(n, &format!("{}, batches of {batch}", setup.topic), diff);
    }
    eprintln!("{}", tally.report("Parquet sink", seed, &setups));
    tally.check(seed, &log);
}

/// The seed's job into an exactly-once Kafka sink, stopped at random moments and, in two
/// trials of three, killed by itself once: after a batch's records and marker are sent and
/// before its transaction commits, or after the commit and before the batch's checkpoint.
/// A `read_committed` reader of the output topic must see exactly the
/// reference windows, each once; a `read_uncommitted` one sees the aborted rows too, which
/// shows the kill points hit transactions with output in them.
#[test]
fn the_exactly_once_kafka_sink_gives_read_committed_readers_each_reference_window_once() {
    let (trials, seed) = crash_settings();
    let trials = trials.div_ceil(2);
    let broker = ApacheKafka::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    let setups = setups(&broker, dir.path(), &log);
    let mut rng = Rng::new(seed ^ 0x6b61666b61);
    let mut tally = Tally::default();
    let (mut committed_rows, mut uncommitted_rows) = (0, 0);
    for n in 0..trials {
        let setup = &setups[n % setups.len()];
        let batch = [1000, 3000][(n / setups.len()) % 2];
        let name = format!("eos-{n}");
        let out = format!("{name}-out");
        broker.create_topic(&out, 1).unwrap();
        let sink = format!("format = \"kafka\"\ntopic = \"{out}\"\ndeliveryGuarantee = \"exactly-once\"");
        let file = pipeline_file(dir.path(), &broker.bootstrap(), &name, &setup.topic, batch, SEED_JOB, &sink, &Extra::default());
        // Two trials in three kill themselves in batch 2, 3 or 4 (which close windows with
        // both batch sizes): before the transaction commits, or after it and before the
        // batch's checkpoint (the replay must not write it again).
        let point = ["sink-commit", "sink-committed", ""][n % 3];
        let kill_at = (!point.is_empty()).then(|| ("SLUICE_KILL_AT", format!("{point}:{}", 2 + rng.below(3))));
        trial(n, &file, &log, setup.clean, &mut rng, kill_at, &mut tally);
        let rows: Vec<WindowRow> = topic_values(&broker.bootstrap(), &out, "read_committed").iter().map(|v| WindowRow::from_json(&serde_json::from_str(v).unwrap())).collect();
        committed_rows += rows.len();
        uncommitted_rows += topic_values(&broker.bootstrap(), &out, "read_uncommitted").len();
        tally.add(n, &format!("{}, batches of {batch}", setup.topic), reference::compare_windows(&setup.expected, &rows));
    }
    eprintln!("{}; rows read committed {committed_rows}, uncommitted {uncommitted_rows}", tally.report("exactly-once Kafka sink", seed, &setups));
    tally.check(seed, &log);
    assert_eq!(tally.kill_points, trials - trials / 3, "two trials in three killed themselves at their kill point");
    assert!(uncommitted_rows > committed_rows, "the killed transactions held output rows, which read_committed readers never saw");
}

/// A second exactly-once sink with the same transactional id fences the first: the first
/// cannot commit any more, and says why. A batch written but not committed by a sink that
/// went away is never seen by `read_committed` readers, and its successor writes it anew.
#[test]
fn a_second_exactly_once_sink_with_the_same_transactional_id_fences_the_first() {
    use arrow_array::{Int64Array, RecordBatch};
    use sluice::config::Delivery;
    use sluice::sink::{KafkaSink, Sink};
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("fenced", 1).unwrap();
    let properties = std::collections::BTreeMap::from([("bootstrap.servers".to_string(), broker.bootstrap())]);
    let delivery = Delivery::ExactlyOnce { transactional_id: "sluice-fence-test".into() };
    let rows = |n: i64| {
        let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("n", arrow_schema::DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![std::sync::Arc::new(Int64Array::from(vec![n]))]).unwrap()
    };
    let mut first = KafkaSink::open("fenced", &delivery, &properties).unwrap();
    assert_eq!(first.last_batch_id().unwrap(), None);
    first.write(0, &[rows(0)]).unwrap();
    first.commit(0).unwrap();
    first.write(1, &[rows(1)]).unwrap();
    // A crash before batch 1 commits: the next sink aborts its transaction.
    drop(first);
    let mut second = KafkaSink::open("fenced", &delivery, &properties).unwrap();
    assert_eq!(second.last_batch_id().unwrap(), Some(0));
    assert!(second.is_committed(0) && !second.is_committed(1));
    let mut third = KafkaSink::open("fenced", &delivery, &properties).unwrap();
    // Sending may already fail, or the commit does.
    let error = second.write(1, &[rows(100)]).and_then(|()| second.commit(1)).unwrap_err().to_string();
    assert!(error.contains("fenced") && error.contains("sluice-fence-test"), "{error}");
    third.write(1, &[rows(1)]).unwrap();
    third.commit(1).unwrap();
    assert_eq!(topic_values(&broker.bootstrap(), "fenced", "read_committed"), ["{\"n\":0}", "{\"n\":1}"]);
    assert_eq!(KafkaSink::open("fenced", &delivery, &properties).unwrap().last_batch_id().unwrap(), Some(1));
}

/// Runs the seed's job on `broker` (topic `events` of `partitions` partitions, batches of
/// 500 every 200 ms, a checkpoint) as a child process, calls `fail` once a few batches
/// are committed and the run is not done, and checks the finished run's Parquet output
/// against the independent computation: nothing lost, nothing twice.
fn a_broker_failure_mid_run_loses_nothing(broker: &mut ApacheKafka, partitions: i32, fail: impl FnOnce(&mut ApacheKafka)) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    broker.create_topic("events", partitions).unwrap();
    let events = produce(broker, "events");
    let clicks: Vec<Value> = events.into_iter().filter(|e| e["event"] == "click").collect();
    let expected = reference::windows_of_all(&clicks, AdClicksParams::default(), true);
    let file = pipeline_file(dir.path(), &broker.bootstrap(), "failover", "events", 500, SEED_JOB, "parquet", &Extra::default());
    let text = std::fs::read_to_string(&file).unwrap().replace("processingTime = \"100ms\"", "processingTime = \"200ms\"");
    std::fs::write(&file, text).unwrap();
    let mut child = spawn(&file, &log, None);
    let manifest = dir.path().join("failover-out/_sluice_manifest");
    let committed = || std::fs::read_dir(&manifest).map(|d| d.count()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed() < 5 {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "the run did not commit 5 batches: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = committed();
    fail(broker);
    let status = wait_until(&mut child, Instant::now() + RUN_LIMIT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.is_some_and(|s| s.success()), "the run did not finish after the failure ({status:?}): {}", std::fs::read_to_string(&log).unwrap_or_default());
    let total = committed();
    assert!(before < total, "the failure came mid-run: {before} of {total} batches committed before it");
    let diff = reference::compare_windows(&expected, &windows(&dir.path().join("failover-out")));
    assert!(diff.is_exact(), "{diff:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    eprintln!("broker failure after {before} of {total} batches: {} windows as the reference", expected.len());
}

#[test]
fn the_single_broker_killed_and_restarted_on_its_log_directory_mid_run_loses_nothing() {
    let mut broker = ApacheKafka::cluster_with_session(1, Duration::from_secs(4)).unwrap();
    a_broker_failure_mid_run_loses_nothing(&mut broker, 3, |broker| {
        broker.kill();
        // Longer than a batch interval and than librdkafka's socket timeouts' first retries.
        std::thread::sleep(Duration::from_secs(5));
        broker.restart().unwrap();
    });
}

#[test]
fn on_three_nodes_the_run_goes_on_after_a_partition_leader_is_killed() {
    let mut cluster = ApacheKafka::cluster(3).unwrap();
    a_broker_failure_mid_run_loses_nothing(&mut cluster, 3, |cluster| {
        let leader = cluster.leader("events", 0).unwrap();
        cluster.kill_node(leader);
        // A new leader is elected from the other two replicas, which stay in sync.
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.leader("events", 0).map_or(true, |l| l == leader) {
            assert!(Instant::now() < deadline, "no new leader of events/0 within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// The `n` values of the JSON-lines files in `out`, sorted.
fn jsonl_values(out: &Path) -> Vec<i64> {
    let mut values: Vec<i64> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["n"].as_i64().unwrap()).collect::<Vec<_>>())
        .collect();
    values.sort_unstable();
    values
}

#[test]
fn input_from_transactional_producers_reads_committed_records_once_and_does_not_wait_at_markers() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("txn", 1).unwrap();
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).set("transactional.id", "sluice-test-txn").create().unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    // Committed 0..10, aborted 10..15, committed 15..18: offsets 0-9, a marker at 10,
    // aborted 11-15 and their marker at 16, 17-19 and a marker at 20.
    let mut n = 0;
    let mut expected = Vec::new();
    for (records, commit) in [(10, true), (5, false), (3, true)] {
        producer.begin_transaction().unwrap();
        for _ in 0..records {
            let value = format!("{{\"n\": {n}}}");
            producer.send(BaseRecord::<(), str>::to("txn").payload(&value)).unwrap();
            if commit {
                expected.push(n);
            }
            n += 1;
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        if commit {
            producer.commit_transaction(Duration::from_secs(30)).unwrap();
        } else {
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    // Batches of 7 end inside the aborted transaction and at markers.
    let mut child = spawn(&pipeline_file(dir.path(), &broker.bootstrap(), "txn", "txn", 7, "[[plugin]]\nbuiltin = \"json-filter\"", "jsonl", &Extra::default()), &log, None);
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs(90));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.is_some_and(|s| s.success()), "the run did not finish within 90 s ({status:?}): {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(jsonl_values(&dir.path().join("txn-out")), expected, "committed records once each, aborted ones never");
}

#[test]
fn batches_that_reread_what_the_consumer_read_ahead_hold_each_record_once() {
    use sluice::source::Source;
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("again", 1).unwrap();
    let loader = Loader::connect(&broker.bootstrap(), &[]).unwrap();
    for n in 0..3000 {
        let value = format!("{{\"n\": {n}}}");
        loader.send("again", Outgoing { partition: Some(0), key: None, value: Some(value.as_bytes()), headers: &[] }).unwrap();
    }
    loader.flush(Duration::from_secs(30)).unwrap();
    let config = sluice::config::Source {
        topics: vec!["again".into()],
        starting_offsets: sluice::config::StartingOffsets::Earliest,
        max_offsets_per_trigger: None,
        partition_rates: Default::default(),
        group_id: "again".into(),
        assignment: Default::default(),
        keyed: false,
        repartition: None,
        watermark: Default::default(),
    };
    let properties = std::collections::BTreeMap::from([("bootstrap.servers".to_string(), broker.bootstrap())]);
    let mut source = sluice::kafka::KafkaSource::connect(&config, &properties, None).unwrap();
    let range = |from, until| sluice_sdk::OffsetRange { topic: "again".into(), partition: 0, from, until };
    let offsets = |batch: arrow_array::RecordBatch| {
        use arrow_array::cast::AsArray;
        batch.column(2).as_primitive::<arrow_array::types::Int64Type>().values().to_vec()
    };
    // Each range starts behind or ahead of where the consumer has read (a replay after a
    // restart, a batch planned again): it is read again from its start, each record once.
    for (from, until) in [(0, 2000), (1000, 2500), (0, 3000), (2999, 3000), (1234, 1300)] {
        let batch = source.fetch(&[range(from, until)], Duration::from_secs(30)).unwrap();
        assert_eq!(offsets(batch), (from..until).collect::<Vec<_>>(), "range [{from}, {until})");
    }
}
