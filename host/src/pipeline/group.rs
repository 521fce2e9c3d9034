//! The batch loop of a consumer-group run (`source.assignment = "group"`): several `sluice
//! run` processes share the source partitions through Kafka's consumer-group protocol and
//! the shared checkpoint location; there is no coordinator of sluice's own.
//!
//! Each source partition this process owns is a task ([`Task`]) with its own plugin chain,
//! batch ids, offset log, commit log, checkpoints, sink manifest and watermark, under
//! `tasks/<topic>/<partition>` of the checkpoint location. Once per trigger the loop plans
//! every owned partition together (rate control is the process's), the source's one consumer
//! reads them all, and each task with records runs, sinks and checkpoints its own batch.
//!
//! With a repartition topic (`source.repartition`, see [`crate::repartition`]) the process
//! also subscribes to that topic: a source partition's task runs the steps before the
//! aggregate and produces to it, a repartition partition's task runs the aggregate.
//!
//! At a batch boundary the loop applies what the group moved ([`Membership::changes`]): a
//! revoked task's checkpoint is flushed and the task released; a new task is claimed
//! ([`crate::checkpoint::CheckpointStore::claim`]), recovered and replayed as a restart
//! would, then read from its position. A task whose store or sink says another process took
//! it over (fenced) is dropped without writing anything more.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::chain::Chain;
use crate::checkpoint::{CheckpointStore, CheckpointWriter, Metadata, PlannedBatch, SavedRange, TaskPlan, WriteMode, FORMAT_VERSION};
use crate::config::{Assignment, CheckedPipeline, Pipeline, WatermarkScope};
use crate::control::{Control, Wake};
use crate::kafka::{Changes, KafkaSource, Membership};
use crate::plan;
use crate::recovery::{self, TASK};
use crate::repartition::{Counted, KeyStage, RepartitionSink};
use crate::runtime::Runtime;
use crate::sink::{Sink, SinkTask};
use crate::source::{PartitionLag, Source, SourceError};
use crate::swap::{Found, Watcher};
use sluice_sdk::{OffsetRange, PluginKind};

use super::runner::{Held, Planned, Runner, Task};
use super::{load_chain, load_steps, now_ms, BatchProgress, RunError, RunOptions, RunSummary, Until};

type Key = (String, i32);

/// A task of this process, with the id of its next batch.
struct Owned {
    task: Task<'static>,
    next_batch_id: u64,
    /// Whether its chain has an aggregate (which a watermark alone moves on).
    stateful: bool,
    /// Which steps its chain runs.
    role: Role,
}

/// What a task runs: the whole chain, or with a repartition topic, the steps before the
/// aggregate (a source partition's task) or the aggregate (a repartition partition's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every step (no repartition topic).
    Whole,
    /// The steps before the aggregate, then to the repartition topic.
    Source,
    /// The aggregate, over the repartition topic.
    Aggregate,
}

impl Role {
    /// The pipeline steps (of `steps`) a task in this role runs, in chain order.
    fn steps(self, steps: usize) -> std::ops::Range<usize> {
        match self {
            Role::Whole => 0..steps,
            Role::Source => 0..steps - 1,
            Role::Aggregate => steps - 1..steps,
        }
    }
}

/// Opens a task's sink and dead-letter sink, for its role.
pub type SinkOpener<'a> = Box<dyn FnMut(Role, SinkTask) -> Result<(Box<dyn Sink>, Option<Box<dyn Sink>>), RunError> + 'a>;

/// What a group run talks to: the Kafka source, membership and sinks of `sluice run`, or
/// in-memory ones in the crash simulation.
pub struct GroupIo<'a> {
    /// Reads the partitions the group assigns (none at first).
    pub source: Box<dyn Source + 'a>,
    /// The process's membership of the consumer group.
    pub members: Box<dyn Members + 'a>,
    /// The topics the group shares (the source topics and a repartition topic).
    pub topics: Vec<String>,
    /// The checkpoint location; each task's store is under it.
    pub root: CheckpointStore,
    /// How tasks write their checkpoints (on a thread of their own in `sluice run`).
    pub writes: WriteMode,
    /// Watches the plugin directory: a new version is swapped into every task's chain.
    pub watcher: Option<Watcher>,
    /// A task's sink and dead-letter sink, for its role.
    pub sinks: SinkOpener<'a>,
    /// A task's plugin chain, for its role.
    pub chains: Box<dyn FnMut(Role) -> Result<Chain, RunError> + 'a>,
}

/// The chain of a task in `role`.
fn chain_of(pipeline: &Pipeline, runtime: &Runtime, role: Role) -> Result<Chain, RunError> {
    // A source task keys its records for the repartition topic last.
    let tail = match (role, &pipeline.source.repartition) {
        (Role::Source, Some(r)) => Some(Box::new(KeyStage::new(r.key.clone())) as Box<dyn crate::chain::Stage>),
        _ => None,
    };
    let (chain, _) = load_steps(pipeline, runtime, role.steps(pipeline.steps.len()), tail)?;
    Ok(chain)
}

/// Run `pipeline` as one process of its consumer group until stopped (see the module docs).
pub fn run_group(
    pipeline: &CheckedPipeline,
    runtime: &Runtime,
    options: impl Into<RunOptions>,
    control: &Control,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    let options = options.into();
    if options.until == Until::AvailableNow {
        return Err(RunError::Inconsistent(
            "--available-now is not available with source.assignment = \"group\": the group moves partitions between processes while they run. Run without it and stop the processes when their lag is 0".into(),
        ));
    }
    let config = pipeline.checkpoint.as_ref().ok_or_else(|| RunError::Inconsistent("source.assignment = \"group\" needs [checkpoint]".into()))?;
    let root = CheckpointStore::open(config)?;
    let source = KafkaSource::unassigned(&pipeline.source, &pipeline.kafka)?;
    let properties: Vec<(String, String)> = pipeline.kafka.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    // The plugins load before the process joins: a step that cannot load fails the run
    // here, not at the first assignment.
    let (probe, watched) = load_chain(pipeline, runtime)?;
    let mut topics = pipeline.source.topics.clone();
    if let Some(repartition) = &pipeline.source.repartition {
        let last = probe.stages().last().expect("a checked pipeline has steps");
        if last.kind() != PluginKind::Aggregate {
            return Err(RunError::Inconsistent(format!(
                "source.repartition: the last step runs in the tasks of the repartition topic `{}` and must be an aggregate, but {} is a transform; without an aggregate every step can run in the source partitions' tasks, so remove [source.repartition]",
                repartition.topic,
                last.name()
            )));
        }
        // A source task's chain builds: the steps before the aggregate output records, which
        // the key step takes (the aggregate alone builds, as the whole chain did).
        chain_of(pipeline, runtime, Role::Source)?;
        crate::repartition::ensure_topic(&pipeline.kafka, &repartition.topic, &pipeline.source.topics)?;
        topics.push(repartition.topic.clone());
    } else if let Some(stateful) = probe.stages().find(|s| s.kind() == PluginKind::Aggregate) {
        if !pipeline.source.keyed {
            tracing::warn!(
                "{} is stateful and the input is not declared keyed (source.keyed = true): with source.assignment = \"group\" each task aggregates only its own partition's records, so a key whose records are spread over several partitions gets partial results from several tasks. Produce the input keyed by what the aggregate groups by and set source.keyed = true",
                stateful.name()
            );
        }
    }
    drop(probe);
    let watcher = super::watch(pipeline, runtime, watched, control);
    let membership = Membership::join(&pipeline.source.group_id, &topics, &properties)?;
    tracing::info!("joined consumer group `{}` for {}; tasks start as the group assigns partitions", pipeline.source.group_id, topics.join(", "));
    let io = GroupIo {
        source: Box::new(source),
        members: Box::new(membership),
        topics,
        root,
        writes: WriteMode::Background,
        watcher,
        sinks: Box::new(|role, task: SinkTask| {
            let sink: Box<dyn Sink> = match &pipeline.source.repartition {
                Some(r) if role == Role::Source => Box::new(RepartitionSink::open(&r.topic, &pipeline.kafka, &task.topic, task.partition)?),
                _ => crate::sink::open_task(&pipeline.sink, &pipeline.kafka, task.clone())?,
            };
            let dead_letters = match &pipeline.dead_letter {
                Some(config) => Some(crate::sink::open_task(config, &pipeline.kafka, task).map_err(RunError::DeadLetters)?),
                None => None,
            };
            Ok((sink, dead_letters))
        }),
        chains: Box::new(|role| chain_of(pipeline, runtime, role)),
    };
    run_group_with(pipeline, io, options, control, progress)
}

/// [`run_group`] over `io`: claim, recover, run and release the tasks the group assigns
/// until `control` stops the run.
pub fn run_group_with(
    pipeline: &Pipeline,
    io: GroupIo<'_>,
    options: impl Into<RunOptions>,
    control: &Control,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<RunSummary, RunError> {
    let options = options.into();
    let GroupIo { source, members, topics, root, writes, watcher, sinks, chains } = io;
    root.check_assignment(Assignment::Group)?;
    root.create_once(&Metadata {
        format_version: FORMAT_VERSION,
        pipeline: pipeline.name.clone(),
        topics: pipeline.source.topics.clone(),
        first_batch_id: 0,
        assignment: Assignment::Group,
    })?;
    let mut group = Group {
        runner: Runner::new(pipeline, &options, control, source, watcher),
        pipeline,
        root,
        members,
        writes,
        sinks,
        chains,
        topics,
        partitions: 0,
        tasks: BTreeMap::new(),
        fenced: Default::default(),
        ignore_state: options.ignore_state,
        global: None,
        global_read: None,
    };
    let result = group.run(progress);
    // Flush every task's checkpoint before leaving the group, so that their next owners
    // find them (a graceful release); the membership is dropped after the tasks.
    let flushed = group.release_all();
    let Group { runner, members, .. } = group;
    drop(members);
    result.and(flushed).map(|()| runner.summary)
}

/// A process's membership of its consumer group, as the batch loop uses it.
pub trait Members {
    /// What the group assigned and revoked since the last call.
    fn changes(&self) -> Changes;
    /// The loop is done with these revoked partitions: the group may move them.
    fn released(&self, keys: &[Key]);
    /// Commit the group's offsets to the ends of `ranges` (for lag tools).
    fn commit(&self, ranges: &[OffsetRange]) -> Result<(), SourceError>;
    /// How many partitions `topics` have together.
    fn partitions(&self, topics: &[String]) -> Result<usize, SourceError>;
}

impl Members for Membership {
    fn changes(&self) -> Changes {
        Membership::changes(self)
    }
    fn released(&self, keys: &[Key]) {
        Membership::released(self, keys);
    }
    fn commit(&self, ranges: &[OffsetRange]) -> Result<(), SourceError> {
        Membership::commit(self, ranges)
    }
    fn partitions(&self, topics: &[String]) -> Result<usize, SourceError> {
        Membership::partitions(self, topics)
    }
}

struct Group<'p> {
    runner: Runner<'p>,
    pipeline: &'p Pipeline,
    root: CheckpointStore,
    writes: WriteMode,
    members: Box<dyn Members + 'p>,
    sinks: SinkOpener<'p>,
    chains: Box<dyn FnMut(Role) -> Result<Chain, RunError> + 'p>,
    /// The topics the group shares (the source topics and a repartition topic).
    topics: Vec<String>,
    /// How many partitions they have together (0: not known), for the group's
    /// `maxOffsetsPerTrigger`.
    partitions: usize,
    tasks: BTreeMap<Key, Owned>,
    /// Tasks another process took over while the group still gives them to this one.
    fenced: std::collections::BTreeSet<Key>,
    ignore_state: bool,
    /// With `source.watermark = "global"`: the highest committed watermark of all tasks,
    /// and when it was read.
    global: Option<i64>,
    global_read: Option<Instant>,
}

/// How often the global watermark is read from the checkpoint location.
const GLOBAL_EVERY: Duration = Duration::from_secs(1);

impl Group<'_> {
    fn run(&mut self, progress: &mut dyn FnMut(&BatchProgress)) -> Result<(), RunError> {
        let mut due = Instant::now();
        loop {
            if self.runner.control.is_stopped() {
                return Ok(());
            }
            if self.runner.control.take_retune() {
                self.runner.retune();
            }
            self.apply_changes(progress)?;
            self.swap_plugins();
            let tick = Instant::now();
            let scheduling_delay = tick.saturating_duration_since(due);
            if !self.tasks.is_empty() {
                self.trigger(tick, scheduling_delay, progress)?;
            }
            due = tick + self.runner.rate.interval();
            loop {
                match self.runner.control.wait_until(due) {
                    Wake::Deadline | Wake::Stop => break,
                    Wake::Retune => self.runner.retune(),
                    Wake::Swap => self.swap_plugins(),
                }
            }
        }
    }

    /// One trigger: plan every owned partition, then run each task's batch.
    fn trigger(&mut self, tick: Instant, scheduling_delay: Duration, progress: &mut dyn FnMut(&BatchProgress)) -> Result<(), RunError> {
        let lag = match self.runner.source.lag() {
            Ok(lag) => lag,
            Err(e) => {
                tracing::warn!("cannot plan the next batches: {e}; trying again");
                self.runner.control.sleep(self.runner.rate.interval().min(Duration::from_secs(5)));
                return Ok(());
            }
        };
        let budgets = self.runner.rate.budgets(&plan::lags(&lag, None));
        // maxOffsetsPerTrigger is the group's: this process reads its partitions' share.
        let max_records = self.runner.running.source.max_offsets_per_trigger.map(|max| plan::share_of_cap(max, self.tasks.len(), self.partitions));
        let ranges = plan::ranges(&lag, plan::Limits { targets: None, budgets: budgets.as_deref(), max_records });
        let global = self.global_watermark()?;
        let planning = tick.elapsed();
        let mut records = 0;
        let mut done = Vec::new();
        for (range, partition) in ranges.iter().zip(&lag) {
            if self.runner.control.is_stopped() {
                break;
            }
            let key = (range.topic.clone(), range.partition);
            let Some(owned) = self.tasks.get_mut(&key) else { continue };
            // The plan records the watermark it hands the plugins, so a replay is exact;
            // with a global watermark an idle task runs an empty batch when the others
            // moved it on (its windows close as they would in one process).
            let watermark = owned.task.watermark.max(global);
            if range.until <= range.from && (watermark <= owned.task.watermark || !owned.stateful) {
                continue;
            }
            let plan = PlannedBatch::new(owned.next_batch_id, now_ms(), vec![TaskPlan { task: TASK, ranges: vec![SavedRange::from(range)], watermark_ms: watermark }]);
            match self.runner.batch(&mut owned.task, &plan, Planned::New { scheduling_delay: None }, planning, std::slice::from_ref(partition), progress) {
                Ok(()) => {
                    owned.next_batch_id += 1;
                    // A chain without an aggregate reports no watermark: the one handed to
                    // it stands, so an idle task runs no empty batch again for it.
                    owned.task.watermark = owned.task.watermark.max(watermark);
                    records += range.until - range.from;
                    done.push(range.clone());
                }
                Err(e) if e.is_fenced() => self.drop_fenced(&key, &e)?,
                Err(e) => return Err(e),
            }
        }
        self.runner.rate.after_batch(now_ms(), records.max(0) as u64, tick.elapsed(), scheduling_delay);
        if let Err(e) = self.members.commit(&done) {
            tracing::warn!("committing the consumer group's offsets failed: {e}");
        }
        Ok(())
    }

    /// At a batch boundary: new plugin versions the watcher found and checked take over in
    /// every task's chain (each task gets instances of its own, built from the plugin
    /// directory as a new task's are; its state passes to them as in a run over all
    /// partitions). Tasks that start later build their chains with the new version.
    fn swap_plugins(&mut self) {
        let Some(watcher) = &self.runner.watcher else { return };
        let started = Instant::now();
        let mut steps = Vec::new();
        for found in watcher.found() {
            match found {
                Found::Ready { step, file, .. } => {
                    tracing::info!("plugin step {step}: a new version in {} takes over in every task from its next batch on", file.display());
                    steps.push(step);
                }
                Found::Rejected { step, file, reason } => {
                    self.runner.summary.swaps_failed += 1;
                    tracing::error!("plugin step {step}: the new version in {} is not swapped in, the running version stays: {reason}", file.display());
                }
            }
        }
        if steps.is_empty() {
            return;
        }
        for (key, owned) in &mut self.tasks {
            // The step's place in this task's chain.
            let runs = owned.role.steps(self.pipeline.steps.len());
            let index = |step: usize| runs.contains(&step).then(|| step - runs.start);
            if steps.iter().all(|&s| index(s).is_none()) {
                continue;
            }
            let mut fresh: Vec<Option<Box<dyn crate::chain::Stage>>> = match (self.chains)(owned.role) {
                Ok(chain) => chain.into_stages().into_iter().map(Some).collect(),
                Err(e) => {
                    self.runner.summary.swaps_failed += 1;
                    tracing::error!("task {}/{}: the new plugin versions cannot be loaded, the running ones stay: {e}", key.0, key.1);
                    continue;
                }
            };
            for &step in &steps {
                let Some(at) = index(step) else { continue };
                let Some(stage) = fresh.get_mut(at).and_then(Option::take) else { continue };
                if let Err(e) = owned.task.chain.swap(at, stage) {
                    self.runner.summary.swaps_failed += 1;
                    tracing::error!("task {}/{}: plugin step {step} is not swapped, the running version stays: {e}", key.0, key.1);
                }
            }
        }
        self.runner.swap_time += started.elapsed();
    }

    /// With `source.watermark = "global"`, the highest watermark of all the group's tasks:
    /// committed ones read from the checkpoint location (at most every [`GLOBAL_EVERY`]),
    /// and this process's own.
    fn global_watermark(&mut self) -> Result<Option<i64>, RunError> {
        if self.pipeline.source.watermark != WatermarkScope::Global {
            return Ok(None);
        }
        if self.global_read.is_none_or(|at| at.elapsed() >= GLOBAL_EVERY) {
            self.global = self.global.max(self.root.group_watermark()?);
            self.global_read = Some(Instant::now());
        }
        let own = self.tasks.values().filter_map(|o| o.task.watermark).max();
        self.global = self.global.max(own);
        Ok(self.global)
    }

    /// A task another process took over: dropped, and the source stops reading it. Unless
    /// the group moves it away meanwhile, it is claimed again at the next batch boundary:
    /// the other process may be one the group has not told yet that it lost the partition
    /// (it was paused past the session timeout), which stops when it learns; a task dropped
    /// for good would leave its partition without an owner until the next rebalance (found
    /// by the crash simulation with several processes).
    fn drop_fenced(&mut self, key: &Key, why: &RunError) -> Result<(), RunError> {
        tracing::warn!("task {}/{}: {why}; claiming it again unless the consumer group moves it away", key.0, key.1);
        self.tasks.remove(key);
        self.fenced.insert(key.clone());
        self.runner.source.reassign(std::slice::from_ref(key), &BTreeMap::new())?;
        Ok(())
    }

    /// Release what the group revoked, start what it assigned.
    fn apply_changes(&mut self, progress: &mut dyn FnMut(&BatchProgress)) -> Result<(), RunError> {
        let changes = self.members.changes();
        let mut assigned = changes.assigned;
        for (key, _) in &changes.revoked {
            self.fenced.remove(key);
        }
        for key in std::mem::take(&mut self.fenced) {
            if !assigned.contains(&key) {
                assigned.push(key);
            }
        }
        if assigned.is_empty() && changes.revoked.is_empty() {
            return Ok(());
        }
        let mut released = Vec::new();
        for (key, lost) in changes.revoked {
            if let Some(mut owned) = self.tasks.remove(&key) {
                match owned.task.flush() {
                    Ok(()) => tracing::info!("task {}/{} released after batch {}", key.0, key.1, owned.next_batch_id.saturating_sub(1)),
                    Err(e) if lost || e.is_fenced() => tracing::warn!("task {}/{} lost to another process: {e}", key.0, key.1),
                    Err(e) => return Err(e),
                }
            }
            released.push(key);
        }
        let mut added = BTreeMap::new();
        let mut replays = Vec::new();
        for key in assigned {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (owned, resume) = self.start(&key)?;
            let position = match resume.positions.as_ref().and_then(|p| p.get(&key)) {
                Some(&p) => p,
                None => self.runner.source.initial_positions(std::slice::from_ref(&key))?.get(&key).copied().unwrap_or(0),
            };
            added.insert(key.clone(), position);
            replays.push((key.clone(), resume.replay));
            self.tasks.insert(key, owned);
        }
        self.runner.source.reassign(&released, &added)?;
        self.members.released(&released);
        // Partitions may have been added to the topics: count them at each rebalance.
        self.partitions = self.members.partitions(&self.topics).unwrap_or_else(|e| {
            tracing::warn!("{e}; until the next rebalance a maxOffsetsPerTrigger caps this process's triggers as a whole, not its share of the group's");
            0
        });
        let owned: Vec<String> = self.tasks.keys().map(|(t, p)| format!("{t}/{p}")).collect();
        for observer in &self.runner.observers {
            observer.tasks(&owned);
        }
        for (key, plans) in replays {
            for plan in plans {
                let Some(owned) = self.tasks.get_mut(&key) else { break };
                tracing::info!("task {}/{}: replaying batch {} with its recorded offset ranges", key.0, key.1, plan.batch_id);
                let lag: Vec<PartitionLag> = self.runner.source.lag()?.into_iter().filter(|p| (&p.topic, p.partition) == (&key.0, key.1)).collect();
                match self.runner.batch(&mut owned.task, &plan, Planned::Replay, Duration::ZERO, &lag, progress) {
                    Ok(()) => {}
                    Err(e) if e.is_fenced() => {
                        self.drop_fenced(&key, &e)?;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Claim the task of `key`, open its sinks, build its chain and recover it.
    fn start(&mut self, key: &Key) -> Result<(Owned, recovery::Resume), RunError> {
        let pipeline: &Pipeline = self.pipeline;
        let mut store = self.root.task(&key.0, key.1);
        let claimed = store.claim(&pipeline.name, &pipeline.source.topics)?;
        let role = match &pipeline.source.repartition {
            None => Role::Whole,
            Some(r) if r.topic == key.0 => Role::Aggregate,
            Some(_) => Role::Source,
        };
        let (sink, dead_letters) = (self.sinks)(role, SinkTask { topic: key.0.clone(), partition: key.1, epoch: store.epoch() })?;
        let mut chain = (self.chains)(role)?;
        let stateful = chain.stages().any(|s| s.kind() == PluginKind::Aggregate);
        chain.set_control(self.runner.control.clone());
        let resume = recovery::recover(pipeline, Some(&store), &mut chain, &*sink, self.ignore_state)?;
        tracing::info!(
            "task {}/{}: claimed at batch {claimed} in epoch {}; {} batches to replay, new batches from {}",
            key.0,
            key.1,
            store.epoch(),
            resume.replay.len(),
            resume.next_batch_id
        );
        let store = std::sync::Arc::new(store);
        let task = Task {
            name: Some(format!("{}/{}", key.0, key.1)),
            chain: Held::Owned(Box::new(chain)),
            sink: Held::Owned(sink),
            dead_letters,
            writer: Some(CheckpointWriter::new(store.clone(), self.writes)),
            checkpoints: Some(store),
            watermark: resume.watermark_ms,
            counted: (role == Role::Aggregate).then(|| Counted::from_marks(&resume.upstream)),
        };
        Ok((Owned { task, next_batch_id: resume.next_batch_id, stateful, role }, resume))
    }

    /// Flush every task's checkpoint (at the end of the run).
    fn release_all(&mut self) -> Result<(), RunError> {
        let mut first_error = None;
        for (key, mut owned) in std::mem::take(&mut self.tasks) {
            if let Err(e) = owned.task.flush() {
                tracing::warn!("task {}/{}: its last checkpoint: {e}", key.0, key.1);
                if !e.is_fenced() {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
