//! Scale-out on Apache Kafka: several `sluice run` processes with `source.assignment =
//! "group"` share a keyed topic through the consumer-group protocol and one checkpoint
//! location. Their Parquet output together must hold exactly the closed windows of an
//! independent computation of the seed's query, each once: per partition (a task's
//! watermark is its partition's), the windows `reference::windows_of_all` closes over the
//! events produced to that partition.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::broker::Broker;
use sluice_bench::broker::ApacheKafka;
use sluice_tests::reference::{self, AdClicksParams, WindowRow};
use sluice_tests::rng::Rng;

#[path = "support/seed_runs.rs"]
mod seed_runs;
use seed_runs::{produce_to, produce_unkeyed, topic_values, wait_until, windows, Extra, SEED_JOB};

/// Partitions of the test topic.
const PARTITIONS: i32 = 6;
/// How long the processes together may take to write every expected window.
const LIMIT: Duration = Duration::from_secs(240);

/// The closed windows of each partition's clicks, together.
fn expected(events: &[(Option<i32>, Value)]) -> Vec<WindowRow> {
    (0..PARTITIONS)
        .flat_map(|p| {
            let clicks: Vec<Value> = events.iter().filter(|(q, e)| *q == Some(p) && e["event"] == "click").map(|(_, e)| e.clone()).collect();
            reference::windows_of_all(&clicks, AdClicksParams::default(), true)
        })
        .collect()
}

/// A group-mode pipeline file `name` for `topic` with keyed input, writing Parquet to
/// `<name>-out` and checkpoints to `<name>-checkpoint`.
fn pipeline_file(dir: &Path, bootstrap: &str, name: &str, topic: &str, batch: u64) -> PathBuf {
    pipeline_file_with(dir, bootstrap, name, topic, batch, "assignment = \"group\"\nkeyed = true")
}

/// [`pipeline_file`] with `source` lines of its own (`assignment`, `watermark`, rates); a
/// short session timeout, so that a process that is gone loses its partitions within
/// seconds, and every checkpoint and log entry kept, for [`check_fencing`].
fn pipeline_file_with(dir: &Path, bootstrap: &str, name: &str, topic: &str, batch: u64, source: &str) -> PathBuf {
    let extra = Extra { source, kafka: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"", checkpoint: "retain = 100000" };
    seed_runs::pipeline_file(dir, bootstrap, name, topic, batch, SEED_JOB, "parquet", &extra)
}

/// `sluice run FILE`, logging to `log`.
fn spawn(file: &Path, log: &Path) -> Child {
    spawn_with(file, log, &[])
}

/// [`spawn`] with these environment variables.
fn spawn_with(file: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(file)
        .envs(env.iter().copied())
        .env("SLUICE_LOG", "info,sluice::progress=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// Processes of one test, stopped by their PIDs when the test ends, however it ends.
struct Processes(Vec<Child>);

impl Processes {
    /// SIGTERM each (a graceful stop) and wait for it; the exit statuses.
    fn stop(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.0
            .iter_mut()
            .map(|c| {
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                wait_until(c, Instant::now() + Duration::from_secs(60))
            })
            .collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until `out` shows `count` window rows (or more), at most [`LIMIT`], or until a
/// process exits by itself (an error: they run until stopped).
fn await_windows(out: &Path, count: usize, processes: &mut Processes, log: &Path) -> usize {
    let deadline = Instant::now() + LIMIT;
    loop {
        let seen = windows(out).len();
        if seen >= count || Instant::now() >= deadline {
            return seen;
        }
        for c in &mut processes.0 {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("a process exited by itself ({status}):\n{}", log_tail(log));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A few windows that differ, for a failure message.
fn differences(expected: &[WindowRow], actual: &[WindowRow]) -> String {
    let key = |r: &WindowRow| (r.window_start, r.campaign_id.clone());
    let shown = |r: &WindowRow| format!("{} {} clicks {} users {}", r.campaign_id, r.window_start, r.clicks, r.unique_users);
    let missing: Vec<String> = expected.iter().filter(|e| !actual.iter().any(|a| key(a) == key(e) && a.clicks == e.clicks)).take(6).map(shown).collect();
    let extra: Vec<String> = actual.iter().filter(|a| !expected.iter().any(|e| key(a) == key(e) && a.clicks == e.clicks)).take(6).map(shown).collect();
    format!("expected, not written: {missing:?}; written, not expected: {extra:?}")
}

fn log_tail(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default().lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[test]
fn three_processes_in_one_group_write_exactly_the_reference_windows_each_once() {
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("clicks", PARTITIONS).unwrap();
    let events = produce_to(&broker, "clicks", Some(PARTITIONS), &|_, _| true);
    let expected = expected(&events);
    assert!(expected.len() > 100, "the data closes windows ({})", expected.len());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    let file = pipeline_file(dir.path(), &broker.bootstrap(), "three", "clicks", 1500);
    let mut processes = Processes((0..3).map(|_| spawn(&file, &log)).collect());
    let out = dir.path().join("three-out");
    let seen = await_windows(&out, expected.len(), &mut processes, &log);
    let statuses = processes.stop();
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "a process did not stop cleanly: {statuses:?}\n{}", log_tail(&log));
    let diff = reference::compare_windows(&expected, &windows(&out));
    assert!(diff.is_exact(), "{seen} of {} windows seen; {diff:?}\n{}", expected.len(), log_tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.matches("claimed at batch").count() >= PARTITIONS as usize, "every partition was claimed by a task:\n{}", log_tail(&log));
    // `sluice checkpoint show` lists every task's checkpoints, with nothing left to replay.
    let checkpoint = dir.path().join("three-checkpoint");
    let shown = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["checkpoint", "show", "--json"]).arg(&checkpoint).output().unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let doc: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), PARTITIONS as usize, "{doc}");
    for task in tasks {
        let committed = task["checkpoints"].as_array().unwrap().iter().filter(|c| c["committed"] == true).count();
        assert!(committed > 0 && task["planned_not_committed"].as_array().unwrap().is_empty(), "after a graceful stop: {task}");
    }
}

/// One topic of keyed events on a broker, and what its windows must be.
struct Setup {
    broker: ApacheKafka,
    expected: Vec<WindowRow>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

fn setup() -> Setup {
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("clicks", PARTITIONS).unwrap();
    let events = produce_to(&broker, "clicks", Some(PARTITIONS), &|_, _| true);
    let expected = expected(&events);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    Setup { broker, expected, dir, log }
}

impl Setup {
    /// Wait for every expected window, stop the processes gracefully, and compare.
    fn finish(&self, name: &str, mut processes: Processes, what: &str) {
        let out = self.dir.path().join(format!("{name}-out"));
        let seen = await_windows(&out, self.expected.len(), &mut processes, &self.log);
        let statuses = processes.stop();
        assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "{what}: a process did not stop cleanly: {statuses:?}\n{}", log_tail(&self.log));
        let actual = windows(&out);
        let diff = reference::compare_windows(&self.expected, &actual);
        if !diff.is_exact() {
            if let Ok(keep) = std::env::var("SLUICE_GROUP_KEEP") {
                let _ = Command::new("cp").arg("-r").arg(self.dir.path()).arg(&keep).status();
            }
        }
        assert!(diff.is_exact(), "{what}: {seen} of {} windows seen; {diff:?}; {}\n{}", self.expected.len(), differences(&self.expected, &actual), log_tail(&self.log));
    }
}

/// Claims of a task an earlier process owned (in epoch 2 or later).
fn moved_tasks(log: &Path) -> usize {
    lines_with(log, "claimed at batch").iter().filter(|l| !l.contains("in epoch 1;")).count()
}

/// One process of `file`, once it has claimed every partition's task.
fn first_owning_all(file: &Path, log: &Path) -> Processes {
    let processes = Processes(vec![spawn(file, log)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines_with(log, "claimed at batch").len() < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "the first process did not claim every partition:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
    processes
}

/// Wait until every partition's task was claimed and no task moved for 3 s.
fn await_settled(log: &Path, processes: &mut Processes) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = (0, Instant::now());
    loop {
        let claims = lines_with(log, "claimed at batch").len();
        if claims != last.0 {
            last = (claims, Instant::now());
        }
        if claims >= PARTITIONS as usize && last.1.elapsed() >= Duration::from_secs(3) {
            return;
        }
        assert!(Instant::now() < deadline, "the group did not settle:\n{}", log_tail(log));
        if let Some(status) = processes.0.iter_mut().find_map(|c| c.try_wait().unwrap()) {
            panic!("a process exited by itself ({status}):\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Log lines of `what` ("claimed at batch" …).
fn lines_with(log: &Path, what: &str) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(what)).map(str::to_string).collect()
}

#[test]
fn one_of_three_killed_at_random_moments_loses_and_repeats_nothing() {
    let trials: usize = std::env::var("SLUICE_GROUP_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("SLUICE_GROUP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let setup = setup();
    let mut rng = Rng::new(seed);
    let mut moved = 0;
    for trial in 0..trials {
        let name = format!("kill-{trial}");
        let file = pipeline_file(setup.dir.path(), &setup.broker.bootstrap(), &name, "clicks", 300);
        let mut processes = Processes((0..3).map(|_| spawn(&file, &setup.log)).collect());
        // Joining takes about 3 s (the broker's initial rebalance delay); reading
        // everything about 3 s more: kill within that.
        std::thread::sleep(Duration::from_millis(2500 + rng.below(3500)));
        let victim = rng.below(3) as usize;
        let claims_before = moved_tasks(&setup.log);
        processes.0[victim].kill().unwrap(); // SIGKILL, by its PID
        processes.0[victim].wait().unwrap();
        let mut survivors = Processes(processes.0.drain(..).enumerate().filter(|(i, _)| *i != victim).map(|(_, c)| c).collect());
        std::mem::swap(&mut processes, &mut survivors);
        setup.finish(&name, processes, &format!("seed {seed}, trial {trial}, process {victim} killed"));
        moved += moved_tasks(&setup.log) - claims_before;
    }
    eprintln!("group kill suite: seed {seed}, {trials} trials, {moved} tasks moved to another process after a kill");
    assert!(moved >= trials, "kills landed while processes owned tasks ({moved} tasks moved in {trials} trials)");
}

/// The sealed JSON body of a checkpoint log entry (magic, length, body, SHA-256).
fn sealed_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[16..16 + len]).unwrap()
}

/// For every task of a checkpoint location: after a claim (epoch e at entry k), every
/// offset log, commit log and sink manifest entry of a later batch is from epoch e or
/// later — nothing an earlier owner wrote after it was taken over. Returns the claims seen.
fn check_fencing(checkpoint: &Path, out: &Path) -> usize {
    let mut claims = 0;
    for p in 0..PARTITIONS {
        let task = checkpoint.join(format!("tasks/clicks/{p}"));
        let entries = |dir: &str| -> Vec<(u64, Value)> {
            let Ok(read) = std::fs::read_dir(task.join(dir)) else { return Vec::new() };
            read.map(|e| e.unwrap().path()).filter_map(|path| Some((path.file_name()?.to_str()?.split('.').next()?.parse().ok()?, sealed_json(&path)))).collect()
        };
        let plans = entries("offsets");
        let epoch = |v: &Value| v["epoch"].as_u64().unwrap_or(0);
        let manifest: Vec<(u64, Value)> = std::fs::read_dir(out.join(format!("_sluice_manifest/clicks/{p}")))
            .map(|read| {
                read.map(|e| e.unwrap().path())
                    .filter_map(|path| {
                        let id = path.file_name()?.to_str()?.strip_prefix("batch-")?.strip_suffix(".json")?.parse().ok()?;
                        Some((id, serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (claim_id, claim) in plans.iter().filter(|(_, v)| v["claim"] == true) {
            claims += 1;
            let e = epoch(claim);
            for (what, list) in [("offset log", &plans), ("commit log", &entries("commits")), ("sink manifest", &manifest)] {
                for (id, entry) in list.iter().filter(|(id, _)| id > claim_id) {
                    assert!(epoch(entry) >= e, "task clicks/{p}: {what} entry of batch {id} has epoch {} after the claim of epoch {e} at {claim_id}", epoch(entry));
                }
            }
        }
    }
    claims
}

#[test]
fn a_process_paused_past_the_session_timeout_is_fenced_and_writes_nothing_for_its_old_tasks() {
    let setup = setup();
    let name = "paused";
    let file = pipeline_file(setup.dir.path(), &setup.broker.bootstrap(), name, "clicks", 100);
    // The first process takes every partition; once it has, a second joins.
    let mut processes = first_owning_all(&file, &setup.log);
    processes.0.push(spawn(&file, &setup.log));
    std::thread::sleep(Duration::from_secs(2));
    let paused = processes.0[0].id() as i32;
    let before = moved_tasks(&setup.log);
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    // Past the session timeout (6 s) the group gives the paused process's partitions to
    // the other, which claims them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved_tasks(&setup.log) == before {
        assert!(Instant::now() < deadline, "no task moved while the first process was paused:\n{}", log_tail(&setup.log));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    unsafe { libc::kill(paused, libc::SIGCONT) };
    setup.finish(name, processes, "one process paused past the session timeout");
    // It learns it lost them from the group (a revoke without release) or, when it writes
    // before the group tells it, from the fencing of its checkpoints or sink.
    let lost = lines_with(&setup.log, "without a release").len();
    let fenced = lines_with(&setup.log, "took this task over").len() + lines_with(&setup.log, "newer owner").len();
    let claims = check_fencing(&setup.dir.path().join(format!("{name}-checkpoint")), &setup.dir.path().join(format!("{name}-out")));
    eprintln!("paused process: {lost} revokes without release, {fenced} fenced writes reported, {claims} claims checked");
    assert!(lost + fenced > 0, "the paused process noticed it was taken over:\n{}", log_tail(&setup.log));
    assert!(claims > PARTITIONS as usize, "tasks were claimed again after the pause ({claims} claims)");
}

#[test]
fn processes_joining_and_one_leaving_move_tasks_without_replaying_a_batch() {
    let setup = setup();
    let name = "joining";
    let file = pipeline_file(setup.dir.path(), &setup.broker.bootstrap(), name, "clicks", 100);
    let mut processes = first_owning_all(&file, &setup.log);
    processes.0.push(spawn(&file, &setup.log));
    processes.0.push(spawn(&file, &setup.log));
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved_tasks(&setup.log) < 4 {
        assert!(Instant::now() < deadline, "the joining processes did not take tasks over:\n{}", log_tail(&setup.log));
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM the first: its tasks finish their batch and checkpoint, then move.
    let before = moved_tasks(&setup.log);
    let mut first = processes.0.remove(0);
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let status = wait_until(&mut first, Instant::now() + Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "the first process did not stop cleanly: {status:?}\n{}", log_tail(&setup.log));
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved_tasks(&setup.log) < before + 2 {
        assert!(Instant::now() < deadline, "the stopped process's tasks did not move:\n{}", log_tail(&setup.log));
        std::thread::sleep(Duration::from_millis(100));
    }
    setup.finish(name, processes, "processes joining, one leaving");
    let claims = lines_with(&setup.log, "claimed at batch");
    let replaying: Vec<&String> = claims.iter().filter(|l| !l.contains("; 0 batches to replay")).collect();
    assert!(replaying.is_empty(), "a task moved gracefully had batches to replay: {replaying:#?}");
    assert!(lines_with(&setup.log, "without a release").is_empty(), "every move was a graceful release:\n{}", log_tail(&setup.log));
}

#[test]
fn with_a_global_watermark_an_idle_partition_closes_its_windows_as_one_process_would() {
    // Partition 5 gets events of the first 100 s only, then stays idle while the others go
    // on for 400 s: with its own watermark its last windows would stay open; with the
    // global one they close as the others advance, as in one process over all partitions.
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("clicks", PARTITIONS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    // Partitions read at the same pace: a rate cap, and the events produced once the
    // group has settled, so that no event is behind the global watermark when its
    // partition is read (what the reference assumes, as Spark's does).
    let source = "assignment = \"group\"\nkeyed = true\nwatermark = \"global\"\nmaxRatePerPartition = 300";
    let file = pipeline_file_with(dir.path(), &broker.bootstrap(), "global", "clicks", 100_000, source);
    let mut processes = Processes((0..3).map(|_| spawn(&file, &log)).collect());
    await_settled(&log, &mut processes);
    let idle_after = 1_767_225_600_000 + 100_000;
    let events = produce_to(&broker, "clicks", Some(PARTITIONS), &|p, e| p != Some(5) || e["timestamp"].as_i64().unwrap() < idle_after);
    let clicks: Vec<Value> = events.iter().filter(|(_, e)| e["event"] == "click").map(|(_, e)| e.clone()).collect();
    let expected = reference::windows_of_all(&clicks, AdClicksParams::default(), true);
    let per_task = self::expected(&events);
    assert!(expected.len() > per_task.len(), "the idle partition's last windows close only with the global watermark ({} vs {})", expected.len(), per_task.len());
    let out = dir.path().join("global-out");
    let seen = await_windows(&out, expected.len(), &mut processes, &log);
    let statuses = processes.stop();
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "a process did not stop cleanly: {statuses:?}\n{}", log_tail(&log));
    let actual = windows(&out);
    let diff = reference::compare_windows(&expected, &actual);
    assert!(diff.is_exact(), "{seen} of {} windows seen; {diff:?}; {}\n{}", expected.len(), differences(&expected, &actual), log_tail(&log));

    // One process over all partitions, reading everything in one batch (so that no
    // partition lags behind the watermark), writes the same.
    let one = pipeline_file_with(dir.path(), &broker.bootstrap(), "one", "clicks", 100_000, "");
    let status = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["run", "--available-now"]).arg(&one).env("SLUICE_LOG", "warn").stderr(Stdio::null()).status().unwrap();
    assert!(status.success());
    let diff = reference::compare_windows(&expected, &windows(&dir.path().join("one-out")));
    assert!(diff.is_exact(), "one process over all partitions: {diff:?}");
}

/// Kafka's `Utils.murmur2` (the hash its Java clients, and librdkafka's `murmur2_random`
/// partitioner, choose a key's partition by), written from its definition.
fn murmur2(key: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let chunks = key.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate() {
            h ^= (b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions`, as Kafka's Java clients choose it.
fn murmur2_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[test]
fn murmur2_is_kafkas() {
    // The cases of Kafka's UtilsTest.testMurmur2.
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
        (b"abc", 479_470_107),
    ];
    for (key, hash) in cases {
        assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
    }
}

#[test]
fn unkeyed_input_through_a_repartition_topic_gives_the_reference_windows_once_despite_a_kill() {
    // Every campaign's events are spread over all source partitions: only repartitioned
    // by campaign does one aggregate task see all of a campaign's events.
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("raw", PARTITIONS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    // The source partitions read at the same pace (the events are produced once the group
    // has settled), so that a repartition partition gets its events about in event-time
    // order; each aggregate task has its own watermark.
    let source = "assignment = \"group\"\nmaxRatePerPartition = 300\nrepartition = { topic = \"by-campaign\", key = \"campaign_id\" }";
    let file = pipeline_file_with(dir.path(), &broker.bootstrap(), "repartition", "raw", 100_000, source);
    // The process kills itself once a source task's batch 4 is in the repartition topic,
    // before that batch's checkpoint: the restarted one produces it again.
    let mut processes = Processes(vec![spawn_with(&file, &log, &[("SLUICE_KILL_AT", "repartition-produced:4")])]);
    await_settled(&log, &mut processes);
    assert_eq!(
        lines_with(&log, "claimed at batch").len(),
        2 * PARTITIONS as usize,
        "a task for each source and each repartition partition (created like the source):\n{}",
        log_tail(&log)
    );
    let events = produce_unkeyed(&broker, "raw", PARTITIONS);
    // Each repartition partition's task closes the windows of its campaigns' clicks.
    let expected: Vec<WindowRow> = (0..PARTITIONS)
        .flat_map(|p| {
            let clicks: Vec<Value> =
                events.iter().filter(|e| e["event"] == "click" && murmur2_partition(e["campaign_id"].as_str().unwrap().as_bytes(), PARTITIONS) == p).cloned().collect();
            reference::windows_of_all(&clicks, AdClicksParams::default(), true)
        })
        .collect();
    let status = wait_until(&mut processes.0[0], Instant::now() + Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "the process killed itself at the kill point ({status:?}):\n{}", log_tail(&log));
    let mut processes = Processes(vec![spawn(&file, &log)]);
    let out = dir.path().join("repartition-out");
    let seen = await_windows(&out, expected.len(), &mut processes, &log);
    let statuses = processes.stop();
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "the process did not stop cleanly: {statuses:?}\n{}", log_tail(&log));
    let actual = windows(&out);
    let diff = reference::compare_windows(&expected, &actual);
    assert!(diff.is_exact(), "{seen} of {} windows seen; {diff:?}; {}\n{}", expected.len(), differences(&expected, &actual), log_tail(&log));
    assert!(!lines_with(&log, "were counted before").is_empty(), "the replayed source batch's records reached the repartition topic twice and were skipped:\n{}", log_tail(&log));
}

#[test]
fn exactly_once_kafka_output_of_a_group_gives_each_window_once_with_a_process_killed_after_a_commit() {
    let setup = setup();
    let out = "eos-group-out";
    setup.broker.create_topic(out, 1).unwrap();
    let sink = format!("format = \"kafka\"\ntopic = \"{out}\"\ndeliveryGuarantee = \"exactly-once\"");
    let extra = Extra { source: "assignment = \"group\"\nkeyed = true", kafka: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"", checkpoint: "" };
    // Batches of about 1000 records a partition: the second closes windows.
    let file = seed_runs::pipeline_file(setup.dir.path(), &setup.broker.bootstrap(), "eos", "clicks", 6000, SEED_JOB, &sink, &extra);
    // One of three kills itself once a transaction of one of its tasks' batch 2 has
    // committed, before the batch's checkpoint: the task's next owner replays the batch
    // and must not write it again.
    let mut victim = Processes(vec![spawn_with(&file, &setup.log, &[("SLUICE_KILL_AT", "sink-committed:2")])]);
    let mut processes = Processes(vec![spawn(&file, &setup.log), spawn(&file, &setup.log)]);
    let status = wait_until(&mut victim.0[0], Instant::now() + Duration::from_secs(120));
    assert!(status.is_some_and(|s| !s.success()), "the first process killed itself at its kill point ({status:?}):\n{}", log_tail(&setup.log));
    let deadline = Instant::now() + LIMIT;
    let rows = loop {
        let rows: Vec<WindowRow> = topic_values(&setup.broker.bootstrap(), out, "read_committed").iter().map(|v| WindowRow::from_json(&serde_json::from_str(v).unwrap())).collect();
        if rows.len() >= setup.expected.len() || Instant::now() >= deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let statuses = processes.stop();
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "a process did not stop cleanly: {statuses:?}\n{}", log_tail(&setup.log));
    let diff = reference::compare_windows(&setup.expected, &rows);
    assert!(diff.is_exact(), "{} windows expected: {diff:?}; {}\n{}", setup.expected.len(), differences(&setup.expected, &rows), log_tail(&setup.log));
    assert!(!lines_with(&setup.log, "killing this process at sink-committed of batch 2").is_empty());
    assert!(!lines_with(&setup.log, "is already committed in the sink").is_empty(), "the new owner replayed the committed batch without writing it:\n{}", log_tail(&setup.log));
}

/// Window rows of the Parquet files in `out`, each with whether its file has the
/// `avg_cost` column (written by ad-clicks 2.0.0).
fn windows_with_avg_cost(out: &Path) -> Vec<(bool, WindowRow)> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap().build().unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let v2 = batch.schema().column_with_name("avg_cost").is_some();
                rows.extend(sluice_sdk::json::batch_to_rows(&batch).into_iter().map(|row| (v2, WindowRow::from_json(&Value::Object(row)))));
            }
        }
    }
    rows
}

#[test]
fn a_new_plugin_version_is_swapped_into_every_task_of_every_process() {
    let broker = ApacheKafka::start().unwrap();
    broker.create_topic("clicks", PARTITIONS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sluice.log");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let publish = |bytes: &[u8]| {
        std::fs::write(plugins.join(".ad-clicks.tmp"), bytes).unwrap();
        std::fs::rename(plugins.join(".ad-clicks.tmp"), plugins.join("ad-clicks.wasm")).unwrap();
    };
    publish(sluice::examples::named("ad-clicks").unwrap());
    let job = r#"[[plugin]]
builtin = "json-filter"
config = { where = [{ field = "event", op = "eq", value = "click" }] }
[[plugin]]
name = "ad-clicks""#;
    let extra = Extra { source: "assignment = \"group\"\nkeyed = true", kafka: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"", checkpoint: "" };
    let file = seed_runs::pipeline_file(dir.path(), &broker.bootstrap(), "swap", "clicks", 100_000, job, "parquet", &extra);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--plugin-dir"])
            .arg(&plugins)
            .arg(&file)
            .env("SLUICE_LOG", "info,sluice::progress=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut processes = Processes(vec![run(), run()]);
    await_settled(&log, &mut processes);
    // The first 200 s of events with version 1, the rest after version 2 took over.
    let half = 1_767_225_600_000 + 200_000;
    let first = produce_to(&broker, "clicks", Some(PARTITIONS), &|_, e| e["timestamp"].as_i64().unwrap() < half);
    let first_windows = expected(&first);
    let out = dir.path().join("swap-out");
    let seen = await_windows(&out, first_windows.len(), &mut processes, &log);
    assert_eq!(seen, first_windows.len(), "the first part's windows:\n{}", log_tail(&log));
    publish(&std::fs::read(sluice_tests::AD_CLICKS_V2_WASM).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines_with(&log, "takes over in every task").len() < 2 {
        assert!(Instant::now() < deadline, "both processes saw the new version:\n{}", log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = produce_to(&broker, "clicks", Some(PARTITIONS), &|_, e| e["timestamp"].as_i64().unwrap() >= half);
    let all: Vec<(Option<i32>, Value)> = first.into_iter().chain(rest).collect();
    let expected = expected(&all);
    let seen = await_windows(&out, expected.len(), &mut processes, &log);
    let statuses = processes.stop();
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "a process did not stop cleanly: {statuses:?}\n{}", log_tail(&log));
    let rows = windows_with_avg_cost(&out);
    let actual: Vec<WindowRow> = rows.iter().map(|(_, r)| r.clone()).collect();
    let diff = reference::compare_windows(&expected, &actual);
    assert!(diff.is_exact(), "{seen} of {} windows seen; {diff:?}; {}\n{}", expected.len(), differences(&expected, &actual), log_tail(&log));
    // Windows closed before the swap were written by version 1, all later ones by 2.
    let before: std::collections::BTreeSet<(i64, String)> = first_windows.iter().map(|w| (w.window_start, w.campaign_id.clone())).collect();
    for (v2, row) in &rows {
        assert_eq!(
            *v2,
            !before.contains(&(row.window_start, row.campaign_id.clone())),
            "window {} of {}: written by version {}",
            row.window_start,
            row.campaign_id,
            if *v2 { 2 } else { 1 }
        );
    }
    assert!(rows.iter().any(|(v2, _)| *v2) && rows.iter().any(|(v2, _)| !*v2));
}
