//! The deterministic crash simulation: the real batch loop (`pipeline::run_with`) with the
//! real plugins, sinks, checkpoint store and recovery, over an in-memory source and
//! in-memory stores that can "crash". A seeded schedule stops the process model at a step
//! boundary — before or after any write of the offset log, sink staging, manifest,
//! checkpoint, commit log or retention, at a fetch, or at a plugin call — or stops it
//! cleanly (as SIGTERM does), up to three times, then lets a last run finish. Everything the
//! process held in memory is dropped at a stop; only the stores and the topics outlive it.
//!
//! After each schedule the sink must equal an independent reference computed from the
//! input (not another run of sluice): the closed windows of the seed's query for
//! ad-clicks, the exact record set for transforms, the exact rejected set for the
//! dead-letter sink.
//!
//! `SLUICE_SIM_SCHEDULES` sets the schedules per scenario (default 1000; the group scenario
//! has `SLUICE_GROUP_SIM_SCHEDULES`, default 100), `SLUICE_SIM_SEED` the first seed (default
//! 1; schedule i uses seed + i), `SLUICE_SIM_EVENTS` the seed of the input (default 1). A
//! failing schedule prints its seed; `SLUICE_SIM_SCHEDULES=1 SLUICE_SIM_SEED=<seed>` runs it
//! alone. For the group scenario, `SLUICE_SIM_TRACE=1` prints every hand-over and
//! `SLUICE_SIM_DUMP=1` the processes' log and, on a failure, the tasks' offset and commit
//! logs and sink manifests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use object_store::memory::InMemory;
use serde_json::{json, Value};
use sluice::chain::{Chain, FailurePolicy, OnFailure, Stage};
use sluice::checkpoint::{CheckpointStore, PluginIdentity, WriteMode};
use sluice::config::{CheckedPipeline, Pipeline, Sink as SinkConfig, Source as SourceConfig, StartingOffsets};
use sluice::control::Control;
use sluice::pipeline::{self, Io, Until};
use sluice::runtime::{CallError, Limits, LoadedPlugin, Runtime};
use sluice::sink::{FileFormat, FileSink};
use sluice::source::memory::{MemoryGroup, MemoryLog, MemoryPartition, MemorySource};
use sluice::source::Source;
use sluice::store::{Hook, Location};
use sluice_sdk::{Context, Finished, PluginKind};
use sluice_tests::reference::{self, AdClicksParams, WindowRow};
use sluice_tests::rng::Rng;

/// What one scenario runs.
#[derive(Clone, Copy)]
struct Scenario {
    /// Plugins: `(builtin name, config)`.
    chain: &'static [(&'static str, &'static str)],
    partitions: i32,
    /// Records keyed by campaign (a partition per key hash), else round-robin.
    keyed: bool,
    events: usize,
    /// Every `bad_every`-th value is not JSON (0: none): rejected, to the dead letters.
    bad_every: usize,
    /// Offsets without records (transaction markers) after every `gap_every`-th record.
    gap_every: usize,
    /// The in-memory client delivers records again after each seek.
    redeliver: bool,
    /// What the sink must hold.
    expect: Expect,
}

#[derive(Clone, Copy)]
enum Expect {
    /// Append-mode windows: exactly the closed ones, once each.
    ClosedWindows(AdClicksParams),
    /// Update-mode windows: the newest row of every window holds all of its events.
    UpdatedWindows(AdClicksParams),
    /// The records whose `event` is this (all with `None`), once each.
    Records(Option<&'static str>),
}

/// The seed of the simulations' input (`SLUICE_SIM_EVENTS`, default 1): the same for every
/// schedule, so that a schedule's seed alone replays it.
fn events_seed() -> u64 {
    std::env::var("SLUICE_SIM_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Seed-style events (12 campaigns, 400 users, costs 0.1–8.0, 10 events per second of
/// event time, up to 5 s out of order), each with its sequence number.
fn events(seed: u64, n: usize) -> Vec<Value> {
    let mut rng = Rng::new(seed ^ 0xe7e7);
    let base = 1_700_000_000_000_i64;
    (0..n)
        .map(|i| {
            json!({
                "seq": i,
                "event": if rng.below(3) == 0 { "view" } else { "click" },
                "campaign_id": format!("c-{}", rng.below(12)),
                "user_id": format!("u-{}", rng.below(400)),
                "cost": (1 + rng.below(79)) as f64 / 10.0,
                "timestamp": base + i as i64 * 100 - rng.below(5_000) as i64,
            })
        })
        .collect()
}

/// The topic: values (a bad one every `bad_every`), partitioned by key or round-robin,
/// with marker gaps. Returns the log and, per value, its (partition, offset).
fn topic(s: &Scenario, events: &[Value]) -> (Arc<MemoryLog>, Vec<(i32, i64)>) {
    let mut parts: Vec<MemoryPartition> = (0..s.partitions).map(|_| MemoryPartition::default()).collect();
    let mut placed = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let campaign = e["campaign_id"].as_str().unwrap();
        let p = if s.keyed { (campaign.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % s.partitions as u32) as usize } else { i % s.partitions as usize };
        let value = if s.bad_every > 0 && i % s.bad_every == s.bad_every - 1 { format!("{{\"seq\": {i}, not json").into_bytes() } else { e.to_string().into_bytes() };
        let offset = parts[p].push(e["timestamp"].as_i64(), Some(campaign.as_bytes().to_vec()), Some(value));
        placed.push((p as i32, offset));
        if s.gap_every > 0 && i % s.gap_every == 0 {
            parts[p].skip(1);
        }
    }
    (Arc::new(parts.into_iter().enumerate().map(|(i, p)| (("clicks".to_string(), i as i32), p)).collect()), placed)
}

/// How the process model stops: at step `at`, dead (every later step fails) or asked to
/// stop (the batch in flight finishes).
#[derive(Clone, Copy, Debug)]
enum Stop {
    Crash(u64),
    Clean(u64),
    Never,
}

/// Counts the steps of one process's life and stops it where the schedule says.
struct Steps {
    count: AtomicU64,
    stop: Stop,
    dead: AtomicBool,
    stopping: Control,
    /// The step where it died, for the failure message.
    died_at: Mutex<Option<String>>,
}

impl Steps {
    fn new(stop: Stop) -> Arc<Self> {
        Arc::new(Self { count: AtomicU64::new(0), stop, dead: AtomicBool::new(false), stopping: Control::new(), died_at: Mutex::new(None) })
    }

    /// One step boundary (`what`): fails when the process is dead.
    fn step(&self, what: &str) -> Result<(), String> {
        if self.dead.load(Ordering::SeqCst) {
            return Err("the process is dead (simulated crash)".into());
        }
        // Reads are not step boundaries: they change nothing a crash could cut.
        if what.starts_with("before get") || what.starts_with("before list") {
            return Ok(());
        }
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        match self.stop {
            Stop::Crash(at) if n == at => {
                self.dead.store(true, Ordering::SeqCst);
                *self.died_at.lock().unwrap() = Some(format!("step {n}: {what}"));
                Err(format!("simulated crash at step {n} ({what})"))
            }
            Stop::Clean(at) if n == at => {
                self.stopping.stop();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn hook(self: &Arc<Self>) -> Hook {
        let me = self.clone();
        Arc::new(move |what: &str| me.step(what))
    }
}

/// A plugin step that passes each call through a step boundary first (a crash mid-plugin).
struct Stepped {
    inner: Box<dyn Stage>,
    step: Hook,
}

impl Stage for Stepped {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn version(&self) -> &str {
        self.inner.version()
    }
    fn kind(&self) -> PluginKind {
        self.inner.kind()
    }
    fn output_schema(&self) -> &SchemaRef {
        self.inner.output_schema()
    }
    fn process(&mut self, batch: &RecordBatch, ctx: &Context) -> Result<Finished, CallError> {
        (self.step)(&format!("process {}", self.inner.name())).map_err(|message| CallError::Plugin {
            plugin: self.inner.name().to_string(),
            call: "process",
            kind: sluice_sdk::ErrorKind::BatchFailed,
            message,
        })?;
        self.inner.process(batch, ctx)
    }
    fn identity(&self) -> PluginIdentity {
        self.inner.identity()
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        self.inner.snapshot()
    }
    fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
        self.inner.restore(state, state_version)
    }
    fn rebuild(&mut self) -> Result<(), CallError> {
        self.inner.rebuild()
    }
}

/// What outlives a process: the topic, the group's offsets and the stores.
struct World {
    log: Arc<MemoryLog>,
    group: MemoryGroup,
    sink: Arc<InMemory>,
    dead_letters: Arc<InMemory>,
    checkpoints: Arc<InMemory>,
}

impl World {
    fn new(log: Arc<MemoryLog>) -> Self {
        Self { log, group: MemoryGroup::default(), sink: Arc::new(InMemory::new()), dead_letters: Arc::new(InMemory::new()), checkpoints: Arc::new(InMemory::new()) }
    }
}

struct Plugins {
    loaded: Vec<(LoadedPlugin, String)>,
}

impl Plugins {
    fn load(runtime: &Runtime, chain: &[(&str, &str)]) -> Self {
        let loaded = chain.iter().map(|(name, config)| (runtime.load_builtin(name, Limits::default()).unwrap(), config.to_string())).collect();
        Self { loaded }
    }

    fn chain(&self, step: &Hook) -> Chain {
        let stages: Vec<Box<dyn Stage>> =
            self.loaded.iter().map(|(plugin, config)| Box::new(Stepped { inner: Box::new(plugin.instantiate(config).unwrap()), step: step.clone() }) as Box<dyn Stage>).collect();
        let mut chain = Chain::of_stages(stages).unwrap();
        chain.set_policies(self.loaded.iter().map(|_| FailurePolicy::STOP_AT_ONCE));
        chain
    }
}

fn pipeline(max_records: u64) -> CheckedPipeline {
    Pipeline {
        name: "simulation".into(),
        source: SourceConfig {
            topics: vec!["clicks".into()],
            starting_offsets: StartingOffsets::Earliest,
            max_offsets_per_trigger: Some(max_records),
            partition_rates: Default::default(),
            group_id: "sim".into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: Duration::from_millis(1),
        adaptive_interval: None,
        kafka: BTreeMap::new(),
        steps: Vec::new(),
        plugin_dir: None,
        sink: SinkConfig::Jsonl { path: "-".into() },
        dead_letter: None,
        checkpoint: None,
        backpressure: None,
    }
    .check()
    .expect("the simulation's pipeline is valid")
}

/// One process's life: recover, run until available-now is done or the schedule stops it.
/// `Ok(true)` when it finished, `Ok(false)` when it was stopped (crashed or cleanly), `Err`
/// when it failed on its own.
fn run_once(world: &World, plugins: &Plugins, s: &Scenario, max_records: u64, mode: WriteMode, retain: usize, stop: Stop) -> Result<(bool, Arc<Steps>), String> {
    let steps = Steps::new(stop);
    let hook = steps.hook();
    let location = |store: &Arc<InMemory>, name: &str| Location::shared(store.clone(), name, Some(hook.clone())).unwrap();
    let opened = (|| -> Result<_, String> {
        let sink = FileSink::at(location(&world.sink, "memory://sink"), FileFormat::Jsonl).map_err(|e| e.to_string())?;
        let dead = FileSink::at(location(&world.dead_letters, "memory://dead-letters"), FileFormat::Jsonl).map_err(|e| e.to_string())?;
        Ok((sink, dead))
    })();
    let (mut sink, dead) = match opened {
        Ok(o) => o,
        Err(_) if steps.dead.load(Ordering::SeqCst) => return Ok((false, steps)),
        Err(e) => return Err(format!("opening the sinks failed: {e}")),
    };
    let checkpoints = Arc::new(CheckpointStore::at(location(&world.checkpoints, "memory://checkpoints"), retain));
    let (log, group, redeliver, source_steps) = (world.log.clone(), world.group.clone(), s.redeliver, steps.clone());
    let io = Io {
        connect: Box::new(move |resume| {
            let mut source = MemorySource::connect(log, group, resume, StartingOffsets::Earliest).with_hook(Arc::new(move |what| source_steps.step(what)));
            if redeliver {
                source = source.redeliver_after_seek();
            }
            Ok(Box::new(source) as Box<dyn Source>)
        }),
        checkpoints: Some(checkpoints),
        checkpoint_writes: mode,
        sink: &mut sink,
        dead_letters: Some(Box::new(dead)),
    };
    let mut chain = plugins.chain(&steps.hook());
    let result = pipeline::run_with(&pipeline(max_records), &mut chain, io, Until::AvailableNow, &steps.stopping, &mut |_| {});
    let stopped = steps.dead.load(Ordering::SeqCst) || steps.stopping.is_stopped();
    match result {
        Ok(_) => Ok((!stopped, steps)),
        Err(_) if steps.dead.load(Ordering::SeqCst) => Ok((false, steps)),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The committed output files of a file sink store, by batch id, as JSON values.
fn committed_rows(store: &Arc<InMemory>) -> BTreeMap<u64, Vec<Value>> {
    let location = Location::shared(store.clone(), "memory://read", None).unwrap();
    let mut out = BTreeMap::new();
    for (name, _) in location.list("").unwrap() {
        let Some(id) = name.strip_prefix("batch-").and_then(|n| n.strip_suffix(".jsonl")).and_then(|n| n.parse().ok()) else { continue };
        let text = String::from_utf8(location.get(&name).unwrap().unwrap()).unwrap();
        out.insert(id, text.lines().map(|l| serde_json::from_str(l).unwrap()).collect());
    }
    out
}

/// What the sinks must hold, from the input alone.
fn check(s: &Scenario, events: &[Value], placed: &[(i32, i64)], world: &World) -> Result<(), String> {
    let good: Vec<&Value> = events.iter().enumerate().filter(|(i, _)| !(s.bad_every > 0 && i % s.bad_every == s.bad_every - 1)).map(|(_, e)| e).collect();
    let output = committed_rows(&world.sink);
    match s.expect {
        Expect::ClosedWindows(params) => {
            let clicks: Vec<Value> = good.iter().filter(|e| s.chain.len() == 1 || e["event"] == "click").map(|e| (*e).clone()).collect();
            let expected = reference::windows_of_all(&clicks, params, true);
            let actual: Vec<WindowRow> = output.values().flatten().map(WindowRow::from_json).collect();
            let diff = reference::compare_windows(&expected, &actual);
            if !diff.is_exact() || expected.is_empty() {
                return Err(format!("{} expected windows: {diff:?}", expected.len()));
            }
        }
        Expect::UpdatedWindows(params) => {
            let expected = reference::windows_of_all(&good.iter().map(|e| (*e).clone()).collect::<Vec<_>>(), params, false);
            let mut newest: BTreeMap<(i64, String), WindowRow> = BTreeMap::new();
            for (batch, rows) in &output {
                let mut in_batch = BTreeSet::new();
                for row in rows.iter().map(WindowRow::from_json) {
                    if !in_batch.insert((row.window_start, row.campaign_id.clone())) {
                        return Err(format!("batch {batch} emitted window {} of {} twice", row.window_start, row.campaign_id));
                    }
                    newest.insert((row.window_start, row.campaign_id.clone()), row);
                }
            }
            let actual: Vec<WindowRow> = newest.into_values().collect();
            let diff = reference::compare_windows(&expected, &actual);
            if !diff.is_exact() {
                return Err(format!("{} windows, newest rows: {diff:?}", expected.len()));
            }
        }
        Expect::Records(event) => {
            let expected: Vec<u64> = good.iter().filter(|e| event.is_none_or(|ev| e["event"] == ev)).map(|e| e["seq"].as_u64().unwrap()).collect();
            let mut actual: Vec<u64> = output.values().flatten().map(|v| v["seq"].as_u64().unwrap()).collect();
            actual.sort_unstable();
            if actual != expected {
                let (want, got): (BTreeSet<u64>, BTreeSet<u64>) = (expected.iter().copied().collect(), actual.iter().copied().collect());
                return Err(format!(
                    "{} records expected, {} written: {} lost (first {:?}), {} written twice",
                    expected.len(),
                    actual.len(),
                    want.difference(&got).count(),
                    want.difference(&got).next(),
                    actual.len() - got.len()
                ));
            }
        }
    }
    if s.bad_every > 0 {
        let expected: BTreeSet<(i64, i64)> = (0..events.len()).filter(|i| i % s.bad_every == s.bad_every - 1).map(|i| (placed[i].0 as i64, placed[i].1)).collect();
        let letters: Vec<(i64, i64)> = committed_rows(&world.dead_letters).values().flatten().map(|v| (v["partition"].as_i64().unwrap(), v["offset"].as_i64().unwrap())).collect();
        if letters.len() != expected.len() || letters.iter().copied().collect::<BTreeSet<_>>() != expected {
            return Err(format!("dead letters: {} expected, {} written ({} distinct)", expected.len(), letters.len(), letters.iter().collect::<BTreeSet<_>>().len()));
        }
    }
    Ok(())
}

/// Run `schedules` seeded schedules of scenario `s`; panics with the seed of the first
/// that fails.
fn simulate(name: &str, s: Scenario) {
    let schedules: u64 = std::env::var("SLUICE_SIM_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let first_seed: u64 = std::env::var("SLUICE_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let runtime = Runtime::new(None).unwrap();
    let plugins = Plugins::load(&runtime, s.chain);
    let events = events(events_seed(), s.events);
    let (log, placed) = topic(&s, &events);
    let (mut crashes, mut clean_stops, mut runs) = (0, 0, 0);
    let mut totals: BTreeMap<(u64, bool, usize), u64> = BTreeMap::new();
    for seed in first_seed..first_seed + schedules {
        let mut rng = Rng::new(seed);
        let max_records = [97, 250, 600, 1500][rng.below(4) as usize];
        let mode = if rng.below(2) == 0 { WriteMode::Inline } else { WriteMode::Deferred };
        let retain = 1 + rng.below(3) as usize;
        let world = World::new(log.clone());
        // A run without stops tells how many steps a whole run has (once per setting).
        let total = *totals.entry((max_records, mode == WriteMode::Inline, retain)).or_insert_with(|| {
            let probe = World::new(log.clone());
            let (finished, steps) =
                run_once(&probe, &plugins, &s, max_records, mode, retain, Stop::Never).unwrap_or_else(|e| panic!("{name}, seed {seed}: a run without stops failed: {e}"));
            assert!(finished);
            check(&s, &events, &placed, &probe).unwrap_or_else(|e| panic!("{name}, seed {seed}: a run without stops is wrong: {e}"));
            steps.count.load(Ordering::SeqCst)
        });
        let stops = 1 + rng.below(3);
        let mut history = Vec::new();
        let mut finished = false;
        for i in 0..=stops {
            let stop = match (i < stops, rng.below(4)) {
                (false, _) => Stop::Never,
                (true, 0) => Stop::Clean(1 + rng.below(total)),
                (true, _) => Stop::Crash(1 + rng.below(total)),
            };
            runs += 1;
            let (done, steps) = run_once(&world, &plugins, &s, max_records, mode, retain, stop)
                .unwrap_or_else(|e| panic!("{name}, seed {seed}: run {} after stops {history:?} failed: {e}", i + 1));
            match stop {
                Stop::Crash(_) if steps.dead.load(Ordering::SeqCst) => crashes += 1,
                Stop::Clean(_) if steps.stopping.is_stopped() => clean_stops += 1,
                _ => {}
            }
            history.push(steps.died_at.lock().unwrap().clone().unwrap_or_else(|| format!("{stop:?}")));
            if done {
                finished = true;
                break;
            }
        }
        assert!(finished, "{name}, seed {seed}: the last run did not finish");
        check(&s, &events, &placed, &world).unwrap_or_else(|e| {
            panic!("{name}, seed {seed} (batch cap {max_records}, {mode:?}, retain {retain}, stops {history:?}): {e}; replay with SLUICE_SIM_SCHEDULES=1 SLUICE_SIM_SEED={seed}")
        });
    }
    eprintln!("simulation {name}: {schedules} schedules from seed {first_seed}, {runs} runs, {crashes} crashes, {clean_stops} clean stops: every sink equal to the reference");
    assert!(crashes > schedules / 2, "too few crashes landed ({crashes} in {schedules} schedules)");
}

const DEFAULTS: AdClicksParams = AdClicksParams { window_ms: 60_000, slide_ms: 10_000, delay_ms: 60_000 };

#[test]
fn ad_clicks_with_its_defaults_on_one_partition() {
    simulate(
        "ad-clicks defaults, 1 partition",
        Scenario {
            chain: &[("ad-clicks", "{}")],
            partitions: 1,
            keyed: false,
            events: 1500,
            bad_every: 0,
            gap_every: 0,
            redeliver: false,
            expect: Expect::ClosedWindows(DEFAULTS),
        },
    );
}

#[test]
fn json_filter_then_ad_clicks_keyed_on_three_partitions_with_dead_letters() {
    simulate(
        "json-filter -> ad-clicks, keyed, 3 partitions, dead letters",
        Scenario {
            chain: &[("json-filter", r#"{"where": [{"field": "event", "op": "eq", "value": "click"}]}"#), ("ad-clicks", "{}")],
            partitions: 3,
            keyed: true,
            events: 1500,
            bad_every: 53,
            gap_every: 0,
            redeliver: false,
            expect: Expect::ClosedWindows(DEFAULTS),
        },
    );
}

#[test]
fn a_transform_chain_writes_every_record_once_despite_gaps_and_redelivery() {
    simulate(
        "json-filter only, 2 partitions, gaps, redelivery",
        Scenario { chain: &[("json-filter", "{}")], partitions: 2, keyed: false, events: 1200, bad_every: 0, gap_every: 7, redeliver: true, expect: Expect::Records(None) },
    );
}

#[test]
fn update_mode_ends_with_every_window_complete() {
    simulate(
        "ad-clicks update mode, keyed, 2 partitions",
        Scenario {
            chain: &[("ad-clicks", r#"{"output_mode": "update"}"#)],
            partitions: 2,
            keyed: true,
            events: 1000,
            bad_every: 0,
            gap_every: 0,
            redeliver: false,
            expect: Expect::UpdatedWindows(DEFAULTS),
        },
    );
}

/// What a run reads from and writes to in the tests below: `log` from the earliest offset
/// (partition 0 delivering nothing from offset `withhold` on), checkpoints on `checkpoints`
/// if given, output to `out`, no dead letters.
fn memory_io<'a>(log: Arc<MemoryLog>, withhold: Option<i64>, checkpoints: Option<&Arc<InMemory>>, out: &'a mut FileSink) -> Io<'a> {
    Io {
        connect: Box::new(move |resume| {
            let source = MemorySource::connect(log, MemoryGroup::default(), resume, StartingOffsets::Earliest);
            Ok(Box::new(match withhold {
                Some(offset) => source.withhold("clicks", 0, offset),
                None => source,
            }) as Box<dyn Source>)
        }),
        checkpoints: checkpoints.map(|c| Arc::new(CheckpointStore::at(Location::shared(c.clone(), "memory://checkpoints", None).unwrap(), 3))),
        checkpoint_writes: WriteMode::Background,
        sink: out,
        dead_letters: None,
    }
}

/// A pipeline over `log` (json-filter forwarding everything) into a JSON-lines sink on
/// `sink`, with checkpoints on `checkpoints`.
fn forward(log: Arc<MemoryLog>, sink: &Arc<InMemory>, checkpoints: &Arc<InMemory>, withhold: Option<i64>, stall: Duration) -> Result<pipeline::RunSummary, pipeline::RunError> {
    let runtime = Runtime::new(None).unwrap();
    let plugins = Plugins::load(&runtime, &[("json-filter", "{}")]);
    let steps = Steps::new(Stop::Never);
    let mut out = FileSink::at(Location::shared(sink.clone(), "memory://sink", None).unwrap(), FileFormat::Jsonl).unwrap();
    let io = memory_io(log, withhold, Some(checkpoints), &mut out);
    let options = pipeline::RunOptions { until: Until::AvailableNow, stall_limit: Some(stall), ..Default::default() };
    pipeline::run_with(&pipeline(30), &mut plugins.chain(&steps.hook()), io, options, &Control::new(), &mut |_| {})
}

#[test]
fn a_batch_whose_offsets_never_come_fails_saying_what_is_missing_and_a_restart_loses_nothing() {
    let events = events(7, 100);
    let s = Scenario { chain: &[], partitions: 1, keyed: false, events: 100, bad_every: 0, gap_every: 0, redeliver: false, expect: Expect::Records(None) };
    let (log, _) = topic(&s, &events);
    let (sink, checkpoints) = (Arc::new(InMemory::new()), Arc::new(InMemory::new()));
    let started = std::time::Instant::now();
    let error = forward(log.clone(), &sink, &checkpoints, Some(40), Duration::from_secs(1)).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(20), "it failed after the stall limit, not much later ({:?})", started.elapsed());
    assert!(error.contains("batch 1 cannot be read") && error.contains("clicks/0") && error.contains("none after offset 40") && error.contains("retention"), "{error}");
    let seqs = |sink: &Arc<InMemory>| committed_rows(sink).values().flatten().map(|v| v["seq"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(seqs(&sink), (0..30).collect::<Vec<_>>(), "the batch before it is committed, the failed one is not");
    // Once the records can be read, a restart continues with the failed batch.
    forward(log, &sink, &checkpoints, None, Duration::from_secs(1)).unwrap();
    assert_eq!(seqs(&sink), (0..100).collect::<Vec<_>>());
}

#[test]
fn progress_counts_the_records_read_not_the_offsets_a_range_spans() {
    let events = events(9, 100);
    let s = Scenario { chain: &[], partitions: 1, keyed: false, events: 100, bad_every: 0, gap_every: 3, redeliver: false, expect: Expect::Records(None) };
    let (log, _) = topic(&s, &events);
    let high = log.values().map(|p| p.high).sum::<i64>();
    assert!(high > 120, "the topic has marker offsets ({high} offsets for 100 records)");
    let summary = forward(log, &Arc::new(InMemory::new()), &Arc::new(InMemory::new()), None, Duration::from_secs(1)).unwrap();
    assert_eq!((summary.records, summary.output_rows), (100, 100));
}

/// A thread that stops the run on `control` `after` once `ready` holds, and returns when
/// it asked.
fn stop_later(control: &Control, ready: impl Fn() -> bool + Send + 'static, after: Duration) -> std::thread::JoinHandle<std::time::Instant> {
    let control = control.clone();
    std::thread::spawn(move || {
        while !ready() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(after);
        let asked = std::time::Instant::now();
        control.stop();
        asked
    })
}

#[test]
fn a_stop_while_a_failed_batch_waits_for_its_retry_ends_the_run_within_a_second() {
    let events = events(11, 50);
    let s = Scenario { chain: &[], partitions: 1, keyed: false, events: 50, bad_every: 0, gap_every: 0, redeliver: false, expect: Expect::Records(None) };
    let (log, _) = topic(&s, &events);
    let runtime = Runtime::new(None).unwrap();
    let plugins = Plugins::load(&runtime, &[("json-filter", "{}")]);
    // The plugin's first call "crashes" and every later one fails: each retry fails too.
    let steps = Steps::new(Stop::Crash(1));
    let mut chain = plugins.chain(&steps.hook());
    // Many retries with a long backoff: without an interruptible wait this run would take
    // hours to give up.
    chain.set_policies([FailurePolicy { retries: 100, backoff: Duration::from_secs(10), then: OnFailure::Stop }]);
    let sink = Arc::new(InMemory::new());
    let mut out = FileSink::at(Location::shared(sink.clone(), "memory://sink", None).unwrap(), FileFormat::Jsonl).unwrap();
    let control = Control::new();
    // The chain's plugins stay on this thread; another one stops the run once the batch
    // has failed and the run waits 10 s for the first retry.
    let stopper = {
        let steps = steps.clone();
        stop_later(&control, move || steps.dead.load(Ordering::SeqCst), Duration::from_millis(300))
    };
    let io = memory_io(log, None, None, &mut out);
    let result = pipeline::run_with(&pipeline(30), &mut chain, io, Until::Stopped, &control, &mut |_| {});
    let asked = stopper.join().unwrap();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "the run ended {took:?} after the stop");
    let error = result.unwrap_err();
    let error = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ");
    assert!(error.contains("stopped while plugin json-filter") && error.contains("retry batch 0") && error.contains("runs again on restart"), "{error}");
    assert!(error.contains("simulated crash"), "the error keeps the failure that was to be retried: {error}");
    assert!(committed_rows(&sink).is_empty(), "the failed batch is not committed");
}

#[test]
fn a_stop_while_a_batch_waits_for_its_records_ends_the_run_within_a_second_and_loses_nothing() {
    let events = events(13, 100);
    let s = Scenario { chain: &[], partitions: 1, keyed: false, events: 100, bad_every: 0, gap_every: 0, redeliver: false, expect: Expect::Records(None) };
    let (log, _) = topic(&s, &events);
    let (sink, checkpoints) = (Arc::new(InMemory::new()), Arc::new(InMemory::new()));
    let runtime = Runtime::new(None).unwrap();
    let plugins = Plugins::load(&runtime, &[("json-filter", "{}")]);
    let steps = Steps::new(Stop::Never);
    let mut out = FileSink::at(Location::shared(sink.clone(), "memory://sink", None).unwrap(), FileFormat::Jsonl).unwrap();
    let control = Control::new();
    let batches = Arc::new(AtomicU64::new(0));
    // Records from offset 40 on never come; the run would wait for them for the stall
    // limit (two minutes) before failing.
    let stopper = {
        let batches = batches.clone();
        stop_later(&control, move || batches.load(Ordering::SeqCst) > 0, Duration::from_millis(700))
    };
    let io = memory_io(log, Some(40), Some(&checkpoints), &mut out);
    let options = pipeline::RunOptions { until: Until::Stopped, stall_limit: Some(Duration::from_secs(120)), ..Default::default() };
    let result = pipeline::run_with(&pipeline(30), &mut plugins.chain(&steps.hook()), io, options, &control, &mut |_| {
        batches.fetch_add(1, Ordering::SeqCst);
    });
    let asked = stopper.join().unwrap();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "the run ended {took:?} after the stop");
    match result {
        Err(pipeline::RunError::Stopped { batch_id: 1, waiting }) => assert!(waiting.contains("clicks/0"), "{waiting}"),
        other => panic!("expected a stop while batch 1 waits, got {other:?}"),
    }
    let seqs: Vec<u64> = committed_rows(&sink).values().flatten().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "the batch before is committed, the waiting one is not");
}

// Several processes of one consumer group (`source.assignment = "group"`): each process is
// a thread running the real group loop (`pipeline::run_group_with`) with its own in-memory
// source, a simulated membership, and the shared in-memory checkpoint and sink stores. The
// threads take turns: a process runs from one step boundary (a store write, a fetch, a
// plugin call, a look at the group's changes) to the next, then hands the baton to a
// process the seeded schedule picks, so every interleaving is reproducible from its seed.
// At hand-overs the schedule also plays the group's coordinator: processes join (their
// partitions move gracefully: revoked, released after the batch in flight, then given),
// crash (dead at once; their partitions go to the others without a release), or keep
// working on a partition the group already gave to another process (a zombie, told only
// later that it lost it, and fenced by the store meanwhile). When every partition's task
// has checkpointed its last record, every process is stopped, and the sink must hold
// exactly the windows an independent computation closes per partition, each once.

type Key = (String, i32);

/// What the group's coordinator does at a hand-over.
#[derive(Clone, Copy, Debug)]
enum GroupEvent {
    /// A new process joins; partitions move to it gracefully.
    Join,
    /// A process dies at once (a new one joins when it was the last).
    Crash,
    /// A partition is given to another process; its owner learns it lost it only later.
    Zombie,
}

struct GroupState {
    rng: Rng,
    /// Processes whose threads run (not crashed, not ended).
    alive: BTreeSet<usize>,
    /// Processes waiting at a step boundary.
    waiting: BTreeSet<usize>,
    /// The process whose turn it is.
    holder: Option<usize>,
    handoffs: u64,
    dead: BTreeSet<usize>,
    controls: BTreeMap<usize, Control>,
    /// Each partition's owner, as the group sees it.
    owners: BTreeMap<Key, usize>,
    /// What each process has not been told yet.
    pending: BTreeMap<usize, sluice::kafka::Changes>,
    /// Graceful moves waiting for their release: partition → (from, to).
    releasing: BTreeMap<Key, (usize, usize)>,
    /// Lost partitions a zombie is told about later: (at hand-over, process, partition).
    late: Vec<(u64, usize, Key)>,
    script: std::collections::VecDeque<(u64, GroupEvent)>,
    next_id: usize,
    finished: bool,
    history: Vec<String>,
}

struct GroupWorld {
    /// Itself, for the threads of the processes it starts.
    me: std::sync::Weak<GroupWorld>,
    state: Mutex<GroupState>,
    turn: std::sync::Condvar,
    log: Arc<MemoryLog>,
    group: MemoryGroup,
    sink: Arc<InMemory>,
    checkpoints: Arc<InMemory>,
    plugins: Arc<Plugins>,
    partitions: Vec<Key>,
    max_records: u64,
    retain: usize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    errors: Mutex<Vec<String>>,
    /// The processes' log (warnings), which counts what fencing stopped.
    log_to: tracing::Dispatch,
}

/// Counts the log lines of a process that found another process had taken its task over
/// (a checkpoint or sink write fenced).
struct FencedCounter(Arc<AtomicU64>);

impl std::io::Write for FencedCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        if text.contains("took this task over") || text.contains("newer owner") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GroupWorld {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step boundary of process `me`: hand the baton over and wait for the next turn.
    fn step(&self, me: usize, what: &str) -> Result<(), String> {
        let mut st = self.lock();
        if st.dead.contains(&me) {
            return Err("the process is dead (simulated crash)".into());
        }
        // Reads change nothing another process could see: not a hand-over.
        if what.starts_with("before get") || what.starts_with("before list") {
            return Ok(());
        }
        if std::env::var("SLUICE_SIM_TRACE").is_ok() {
            eprintln!("step {} p{me} {what}", st.handoffs);
        }
        if st.holder == Some(me) {
            st.holder = None;
        }
        st.waiting.insert(me);
        self.schedule(&mut st);
        while st.holder != Some(me) && !st.dead.contains(&me) {
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.waiting.remove(&me);
        if st.dead.contains(&me) {
            return Err(format!("simulated crash of process {me} at {what}"));
        }
        Ok(())
    }

    /// Process `me` ended.
    fn exit(&self, me: usize) {
        let mut st = self.lock();
        st.alive.remove(&me);
        st.waiting.remove(&me);
        if st.holder == Some(me) {
            st.holder = None;
        }
        self.schedule(&mut st);
        self.turn.notify_all();
    }

    /// When every live process waits: play the coordinator, then give the turn to one.
    fn schedule(self: &GroupWorld, st: &mut GroupState) {
        if st.holder.is_some() || st.alive.is_empty() || !st.alive.is_subset(&st.waiting) {
            return;
        }
        st.handoffs += 1;
        self.coordinate(st);
        if !st.alive.is_subset(&st.waiting) {
            // A process joined: it takes its first turn once its thread is at its first step.
            return;
        }
        let candidates: Vec<usize> = st.alive.iter().copied().collect();
        st.holder = Some(candidates[st.rng.below(candidates.len() as u64) as usize]);
        self.turn.notify_all();
    }

    fn coordinate(&self, st: &mut GroupState) {
        if st.finished {
            return;
        }
        let now = st.handoffs;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut st.late).into_iter().partition(|(at, _, _)| *at <= now);
        st.late = later;
        for (_, process, key) in due {
            if st.alive.contains(&process) {
                st.history.push(format!("{now}: process {process} learns it lost {}/{}", key.0, key.1));
                st.pending.entry(process).or_default().revoked.push((key, true));
            }
        }
        while st.script.front().is_some_and(|(at, _)| *at <= now) {
            let (_, event) = st.script.pop_front().unwrap();
            self.play(st, event);
        }
        if now.is_multiple_of(16) && self.done() {
            st.finished = true;
            st.history.push(format!("{now}: every task checkpointed its last record; stopping"));
            for c in st.controls.values() {
                c.stop();
            }
        }
    }

    fn play(&self, st: &mut GroupState, event: GroupEvent) {
        let now = st.handoffs;
        let alive: Vec<usize> = st.alive.iter().copied().collect();
        match event {
            GroupEvent::Join => self.join(st),
            GroupEvent::Crash => {
                let victim = alive[st.rng.below(alive.len() as u64) as usize];
                st.history.push(format!("{now}: process {victim} crashes"));
                st.dead.insert(victim);
                st.alive.remove(&victim);
                st.waiting.remove(&victim);
                st.pending.remove(&victim);
                st.late.retain(|(_, p, _)| *p != victim);
                if st.alive.is_empty() {
                    self.join(st);
                }
                let heirs: Vec<usize> = st.alive.iter().copied().collect();
                let orphans: Vec<Key> = st.owners.iter().filter(|(_, o)| **o == victim).map(|(k, _)| k.clone()).collect();
                for key in orphans {
                    match st.releasing.remove(&key) {
                        Some((_, to)) if st.alive.contains(&to) => self.assign(st, to, key),
                        _ => {
                            let heir = heirs[st.rng.below(heirs.len() as u64) as usize];
                            self.assign(st, heir, key);
                        }
                    }
                }
                let stranded: Vec<Key> = st.releasing.iter().filter(|(_, (_, to))| *to == victim).map(|(k, _)| k.clone()).collect();
                for key in stranded {
                    // Moving to the crashed process: it stays with its owner, who released it
                    // or will; given back to the owner at its release.
                    let from = st.releasing[&key].0;
                    st.releasing.insert(key, (from, from));
                }
                self.turn.notify_all();
            }
            GroupEvent::Zombie => {
                let movable: Vec<(Key, usize)> = st.owners.iter().filter(|(k, _)| !st.releasing.contains_key(*k)).map(|(k, o)| (k.clone(), *o)).collect();
                if alive.len() < 2 || movable.is_empty() {
                    return;
                }
                let (key, from) = movable[st.rng.below(movable.len() as u64) as usize].clone();
                let others: Vec<usize> = alive.iter().copied().filter(|p| *p != from).collect();
                let to = others[st.rng.below(others.len() as u64) as usize];
                let told = now + 1 + st.rng.below(300);
                st.history.push(format!("{now}: {}/{} given to process {to}; process {from} learns it at {told}", key.0, key.1));
                st.late.push((told, from, key.clone()));
                self.assign(st, to, key);
            }
        }
    }

    /// A new process: its thread starts, and partitions move to it gracefully.
    fn join(&self, st: &mut GroupState) {
        let me = st.next_id;
        st.next_id += 1;
        st.alive.insert(me);
        st.controls.insert(me, Control::new());
        st.history.push(format!("{}: process {me} joins", st.handoffs));
        let share = self.partitions.len().div_ceil(st.alive.len());
        let mut taken = 0;
        for key in &self.partitions {
            if taken == share {
                break;
            }
            match st.owners.get(key).copied() {
                None => {
                    self.assign(st, me, key.clone());
                    taken += 1;
                }
                Some(from) if from != me && !st.releasing.contains_key(key) && st.owners.values().filter(|o| **o == from).count() > share => {
                    st.releasing.insert(key.clone(), (from, me));
                    st.pending.entry(from).or_default().revoked.push((key.clone(), false));
                    taken += 1;
                }
                _ => {}
            }
        }
        let world = self.me.upgrade().expect("the world outlives its processes");
        self.threads.lock().unwrap().push(std::thread::spawn(move || process(world, me)));
    }

    /// Give `key` to `to`, telling it first that it lost it, if it was still to learn that.
    fn assign(&self, st: &mut GroupState, to: usize, key: Key) {
        if let Some(i) = st.late.iter().position(|(_, p, k)| *p == to && *k == key) {
            st.late.remove(i);
            st.pending.entry(to).or_default().revoked.push((key.clone(), true));
        }
        st.owners.insert(key.clone(), to);
        st.pending.entry(to).or_default().assigned.push(key);
    }

    /// Every partition's task has checkpointed its last record.
    fn done(&self) -> bool {
        let root = CheckpointStore::at(Location::shared(self.checkpoints.clone(), "memory://read", None).unwrap(), self.retain);
        self.partitions.iter().all(|(topic, partition)| {
            let high = self.log[&(topic.clone(), *partition)].high;
            match root.task(topic, *partition).recover() {
                Ok(r) => r.replay.is_empty() && r.checkpoint.is_some_and(|c| c.tasks.iter().flat_map(|t| &t.positions).any(|p| p.next >= high)),
                Err(_) => false,
            }
        })
    }
}

/// The membership of process `me`, played by the world.
struct SimMembers {
    world: Arc<GroupWorld>,
    me: usize,
}

impl pipeline::Members for SimMembers {
    fn changes(&self) -> sluice::kafka::Changes {
        // Looking at the group is a step boundary: an idle process takes turns too.
        if self.world.step(self.me, "changes").is_err() {
            return Default::default();
        }
        self.world.lock().pending.remove(&self.me).unwrap_or_default()
    }

    fn released(&self, keys: &[Key]) {
        let mut st = self.world.lock();
        if st.dead.contains(&self.me) {
            return;
        }
        for key in keys {
            if st.releasing.get(key).is_some_and(|(from, _)| *from == self.me) {
                let (_, to) = st.releasing.remove(key).unwrap();
                let now = st.handoffs;
                st.history.push(format!("{now}: process {} released {}/{}; given to process {to}", self.me, key.0, key.1));
                self.world.assign(&mut st, to, key.clone());
            }
        }
    }

    fn commit(&self, _ranges: &[sluice_sdk::OffsetRange]) -> Result<(), sluice::source::SourceError> {
        Ok(())
    }

    fn partitions(&self, _topics: &[String]) -> Result<usize, sluice::source::SourceError> {
        Ok(self.world.partitions.len())
    }
}

fn group_pipeline(max_records: u64) -> CheckedPipeline {
    let mut p: Pipeline = (*pipeline(max_records)).clone();
    p.source.assignment = sluice::config::Assignment::Group;
    p.source.keyed = true;
    // Not opened: the processes get their checkpoint store from the simulation.
    p.checkpoint = Some(sluice::config::Checkpointing { location: "simulated".into(), options: BTreeMap::new(), retain: 1 });
    p.check().expect("the group simulation's pipeline is valid")
}

/// One process: its thread's life, from its first turn until it is stopped or crashes.
fn process(world: Arc<GroupWorld>, me: usize) {
    let _log = tracing::dispatcher::set_default(&world.log_to);
    let _process = tracing::info_span!("process", id = me).entered();
    let result = (|| -> Result<(), String> {
        world.step(me, "start")?;
        let step: Hook = {
            let world = world.clone();
            Arc::new(move |what: &str| world.step(me, what))
        };
        let at = |store: &Arc<InMemory>, name: &str| Location::shared(store.clone(), name, Some(step.clone())).map_err(|e| e.to_string());
        let root = CheckpointStore::at(at(&world.checkpoints, "memory://checkpoints")?, world.retain);
        let source = MemorySource::unassigned(world.log.clone(), world.group.clone(), StartingOffsets::Earliest).with_hook(step.clone());
        let sink_at = at(&world.sink, "memory://sink")?;
        let io = pipeline::GroupIo {
            source: Box::new(source),
            members: Box::new(SimMembers { world: world.clone(), me }),
            topics: vec!["clicks".into()],
            root,
            writes: WriteMode::Inline,
            watcher: None,
            sinks: Box::new(|_, task| Ok((Box::new(FileSink::for_task(sink_at.clone(), FileFormat::Jsonl, task)?) as Box<dyn sluice::sink::Sink>, None))),
            chains: Box::new(|_| Ok(world.plugins.chain(&step))),
        };
        let control = world.lock().controls[&me].clone();
        pipeline::run_group_with(&group_pipeline(world.max_records), io, Until::Stopped, &control, &mut |_| {}).map(|_| ()).map_err(|e| format!("{e:#}"))
    })();
    if let Err(e) = result {
        if !world.lock().dead.contains(&me) {
            world.errors.lock().unwrap().push(format!("process {me}: {e}"));
        }
    }
    world.exit(me);
}

/// Committed output of the task views of a file sink store, as JSON values, each with the
/// file it is in.
fn committed_task_rows(store: &Arc<InMemory>) -> Vec<(String, Value)> {
    let location = Location::shared(store.clone(), "memory://read", None).unwrap();
    let mut rows = Vec::new();
    for (name, _) in location.list("").unwrap() {
        if name.starts_with('_') || !name.ends_with(".jsonl") {
            continue;
        }
        let text = String::from_utf8(location.get(&name).unwrap().unwrap()).unwrap();
        rows.extend(text.lines().map(|l| (name.clone(), serde_json::from_str::<Value>(l).unwrap())));
    }
    rows
}

/// One schedule of a group: process 0 owns every partition, `script` happens at its
/// hand-overs. The world once every process has ended.
fn run_group_schedule(
    log: &Arc<MemoryLog>,
    plugins: &Arc<Plugins>,
    seed: u64,
    max_records: u64,
    retain: usize,
    script: Vec<(u64, GroupEvent)>,
    fenced: &Arc<AtomicU64>,
) -> Result<Arc<GroupWorld>, String> {
    let counter = fenced.clone();
    let log_to = if std::env::var("SLUICE_SIM_DUMP").is_ok() {
        tracing::Dispatch::new(tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_writer(std::io::stderr).finish())
    } else {
        tracing::Dispatch::new(tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_writer(move || FencedCounter(counter.clone())).finish())
    };
    let partitions: Vec<Key> = log.keys().cloned().collect();
    let world = Arc::new_cyclic(|me| GroupWorld {
        me: me.clone(),
        state: Mutex::new(GroupState {
            rng: Rng::new(seed ^ 0x005e_ed0f_9a7e),
            alive: BTreeSet::new(),
            waiting: BTreeSet::new(),
            holder: None,
            handoffs: 0,
            dead: BTreeSet::new(),
            controls: BTreeMap::new(),
            owners: BTreeMap::new(),
            pending: BTreeMap::new(),
            releasing: BTreeMap::new(),
            late: Vec::new(),
            script: script.into(),
            next_id: 0,
            finished: false,
            history: Vec::new(),
        }),
        turn: std::sync::Condvar::new(),
        log: log.clone(),
        group: MemoryGroup::default(),
        sink: Arc::new(InMemory::new()),
        checkpoints: Arc::new(InMemory::new()),
        plugins: plugins.clone(),
        partitions,
        max_records,
        retain,
        threads: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        log_to,
    });
    {
        let mut st = world.lock();
        world.join(&mut st);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ended = world.lock().alive.is_empty();
        if ended {
            break;
        }
        if std::time::Instant::now() > deadline {
            let mut st = world.lock();
            let report = format!("no end after 120 s (hand-over {}; owners {:?}; history {:?})", st.handoffs, st.owners, st.history);
            // End every process: each step now fails.
            let all: Vec<usize> = (0..st.next_id).collect();
            st.dead.extend(all);
            st.alive.clear();
            world.turn.notify_all();
            return Err(report);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    loop {
        let Some(thread) = world.threads.lock().unwrap().pop() else { break };
        thread.join().map_err(|_| "a process thread panicked".to_string())?;
    }
    let errors = world.errors.lock().unwrap().clone();
    let st = world.lock();
    if !errors.is_empty() {
        return Err(format!("{errors:?} (history {:?})", st.history));
    }
    if !st.finished {
        return Err(format!("every process ended before the input was done (history {:?})", st.history));
    }
    drop(st);
    Ok(world)
}

/// Run `schedules` seeded schedules of scenario `s` on a group of processes; panics with
/// the seed of the first whose output differs from the reference.
fn simulate_group(name: &str, s: Scenario) {
    let schedules: u64 = std::env::var("SLUICE_GROUP_SIM_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let first_seed: u64 = std::env::var("SLUICE_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let runtime = Runtime::new(None).unwrap();
    let plugins = Arc::new(Plugins::load(&runtime, s.chain));
    let events = events(events_seed(), s.events);
    let (log, placed) = topic(&s, &events);
    // Each partition's task closes the windows of its partition's clicks (its own watermark).
    let expected: Vec<WindowRow> = (0..s.partitions)
        .flat_map(|p| {
            let clicks: Vec<Value> = events.iter().zip(&placed).filter(|(e, (q, _))| *q == p && e["event"] == "click").map(|(e, _)| e.clone()).collect();
            reference::windows_of_all(&clicks, DEFAULTS, true)
        })
        .collect();
    assert!(expected.len() > 20, "the input closes windows ({})", expected.len());
    // How many hand-overs a run without events takes: the events are spread over them.
    let fenced = Arc::new(AtomicU64::new(0));
    let horizon = run_group_schedule(&log, &plugins, 0, 97, 2, Vec::new(), &fenced).unwrap_or_else(|e| panic!("{name}: a run without events failed: {e}")).lock().handoffs;
    let (mut crashes, mut zombies, mut joins) = (0, 0, 0);
    for seed in first_seed..first_seed + schedules {
        let mut rng = Rng::new(seed);
        let max_records = [40, 97, 250][rng.below(3) as usize];
        let retain = 1 + rng.below(3) as usize;
        let mut script: Vec<(u64, GroupEvent)> = (0..2).map(|_| (1 + rng.below(horizon), GroupEvent::Join)).collect();
        for _ in 0..rng.below(4) {
            script.push((1 + rng.below(horizon), if rng.below(2) == 0 { GroupEvent::Crash } else { GroupEvent::Zombie }));
        }
        script.sort_by_key(|(at, _)| *at);
        for (_, e) in &script {
            match e {
                GroupEvent::Join => joins += 1,
                GroupEvent::Crash => crashes += 1,
                GroupEvent::Zombie => zombies += 1,
            }
        }
        let world = run_group_schedule(&log, &plugins, seed, max_records, retain, script.clone(), &fenced).unwrap_or_else(|e| {
            panic!("{name}, seed {seed} (batch cap {max_records}, retain {retain}, script {script:?}): {e}; replay with SLUICE_GROUP_SIM_SCHEDULES=1 SLUICE_SIM_SEED={seed}")
        });
        let rows = committed_task_rows(&world.sink);
        let actual: Vec<WindowRow> = rows.iter().map(|(_, r)| WindowRow::from_json(r)).collect();
        let diff = reference::compare_windows(&expected, &actual);
        if !diff.is_exact() {
            // Where each window written more than once is.
            let mut files: BTreeMap<(i64, String), Vec<&str>> = BTreeMap::new();
            for ((file, _), row) in rows.iter().zip(&actual) {
                files.entry((row.window_start, row.campaign_id.clone())).or_default().push(file);
            }
            let twice: Vec<_> = files.iter().filter(|(_, f)| f.len() > 1).take(6).collect();
            if std::env::var("SLUICE_SIM_DUMP").is_ok() {
                let location = Location::shared(world.checkpoints.clone(), "memory://read", None).unwrap();
                let dirs: Vec<String> = world.partitions.iter().flat_map(|(t, p)| ["offsets", "commits", "checkpoints"].map(|d| format!("tasks/{t}/{p}/{d}"))).collect();
                for (name, _) in dirs.iter().flat_map(|d| location.list(d).unwrap().into_iter().map(move |(n, x)| (format!("{d}/{n}"), x))) {
                    let bytes = location.get(&name).unwrap().unwrap();
                    let shown = if name.contains("offsets/") || name.contains("commits/") {
                        String::from_utf8_lossy(&bytes[16..bytes.len() - 32]).to_string()
                    } else {
                        format!("{} bytes", bytes.len())
                    };
                    eprintln!("{name}: {shown}");
                }
                let sink = Location::shared(world.sink.clone(), "memory://read", None).unwrap();
                let manifests: Vec<String> = world.partitions.iter().map(|(t, p)| format!("_sluice_manifest/{t}/{p}")).collect();
                for (name, _) in manifests.iter().flat_map(|d| sink.list(d).unwrap().into_iter().map(move |(n, x)| (format!("{d}/{n}"), x))) {
                    let bytes = sink.get(&name).unwrap().unwrap();
                    eprintln!("{name}: {}", if name.ends_with(".json") { String::from_utf8_lossy(&bytes).to_string() } else { format!("{} bytes", bytes.len()) });
                }
            }
            panic!(
                "{name}, seed {seed} (batch cap {max_records}, retain {retain}): {} expected windows: {diff:?}; written more than once: {twice:?}; history {:?}; replay with SLUICE_GROUP_SIM_SCHEDULES=1 SLUICE_SIM_SEED={seed}",
                expected.len(),
                world.lock().history
            );
        }
    }
    let fenced = fenced.load(Ordering::SeqCst);
    eprintln!(
        "group simulation {name}: {schedules} schedules from seed {first_seed} over {horizon} hand-overs each: {joins} joins, {crashes} crashes, {zombies} zombies scripted, {fenced} writes fenced; every sink equal to the reference"
    );
    assert!(schedules < 20 || fenced > 0, "some processes left behind were fenced ({zombies} zombies scripted)");
}

#[test]
fn a_group_of_processes_joining_crashing_and_left_behind_writes_exactly_the_reference_windows() {
    simulate_group(
        "json-filter -> ad-clicks, keyed, 3 partitions, a group of processes",
        Scenario {
            chain: &[("json-filter", r#"{"where": [{"field": "event", "op": "eq", "value": "click"}]}"#), ("ad-clicks", "{}")],
            partitions: 3,
            keyed: true,
            events: 1500,
            bad_every: 0,
            gap_every: 0,
            redeliver: false,
            expect: Expect::ClosedWindows(DEFAULTS),
        },
    );
}
