//! Checkpoints: what makes a restart continue exactly where the last committed batch ended.
//!
//! Spark Structured Streaming's model, with plugin state in the same object as the offsets
//! it belongs to. Under a location (a local directory or any object-store URL):
//!
//! ```text
//! metadata                 the pipeline name and the first batch id
//! offsets/<batch id>       the offset log: batch N's plan (ranges per task, watermark,
//!                          processing time), written before the batch is fetched
//! checkpoints/<batch id>   after batch N: per task the next offsets, plugin identity and
//!                          state, watermark, rate-controller state
//! commits/<batch id>       the commit log: batch N is done; names its checkpoint's hash
//! ```
//!
//! Every object is sealed (magic, length, SHA-256 of the body) and written with one atomic
//! put, so a reader never sees half of one, and a damaged one is recognised. Recovery takes
//! the newest checkpoint whose commit entry and checksum agree, and replays the batches
//! planned after it with the ranges, watermark and processing time of their offset log
//! entries, so a replayed batch gives the same output.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Checkpointing;
use crate::store::{Location, StoreError};

/// Layout version of the objects; a reader refuses others.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"SLUICE\x00\x01";
const METADATA: &str = "metadata";
const OFFSETS: &str = "offsets";
const CHECKPOINTS: &str = "checkpoints";
const COMMITS: &str = "commits";

/// A checkpoint location that cannot be used, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("checkpoint {0}")]
    Store(#[from] StoreError),
    /// The thread that writes checkpoints stopped: after a failed checkpoint, or unexpectedly.
    #[error("the checkpoint writer stopped (an earlier checkpoint could not be written, or its thread ended); restart the run: it resumes from the last committed checkpoint")]
    WriterGone,
    /// The objects cannot be used to resume.
    #[error("checkpoint location {location}: {message}")]
    Unusable {
        /// The location.
        location: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// An offset range of one partition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// First offset.
    pub from: i64,
    /// One past the last offset.
    pub until: i64,
}

impl From<&sluice_sdk::OffsetRange> for SavedRange {
    fn from(r: &sluice_sdk::OffsetRange) -> Self {
        Self { topic: r.topic.clone(), partition: r.partition, from: r.from, until: r.until }
    }
}

impl From<&SavedRange> for sluice_sdk::OffsetRange {
    fn from(r: &SavedRange) -> Self {
        Self { topic: r.topic.clone(), partition: r.partition, from: r.from, until: r.until }
    }
}

/// One task's part of a planned batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlan {
    /// Task id (one task, 0, over all partitions for now).
    pub task: u32,
    /// Ranges, in plan order.
    pub ranges: Vec<SavedRange>,
    /// Watermark handed to the plugins.
    pub watermark_ms: Option<i64>,
}

/// An offset log entry: everything needed to run batch N again identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBatch {
    /// Batch id.
    pub batch_id: u64,
    /// Processing time handed to the plugins.
    pub processing_time_ms: i64,
    /// Per task.
    pub tasks: Vec<TaskPlan>,
}

/// Which plugin wrote a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginIdentity {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// SHA-256 of the component, hex.
    pub content_hash: String,
    /// Layout version of its state.
    pub state_version: u32,
}

/// One plugin step's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedPlugin {
    /// Who wrote it.
    pub identity: PluginIdentity,
    /// The state bytes (stateless transforms have none).
    pub state: Option<Vec<u8>>,
}

/// A next offset of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Next offset to read.
    pub next: i64,
}

/// One task's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// Task id.
    pub task: u32,
    /// Where each of its partitions continues.
    pub positions: Vec<Position>,
    /// Its plugin chain, in step order.
    pub plugins: Vec<SavedPlugin>,
    /// The watermark after the batch.
    pub watermark_ms: Option<i64>,
}

/// The state after batch N committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Batch id.
    pub batch_id: u64,
    /// When it was written (ms since the epoch).
    pub created_ms: i64,
    /// Per task.
    pub tasks: Vec<TaskState>,
    /// The rate controller's state (none until rate control keeps any).
    pub rate_controller: Option<serde_json::Value>,
}

/// The location's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Layout version.
    pub format_version: u32,
    /// Pipeline name when created.
    pub pipeline: String,
    /// Source topics when created.
    pub topics: Vec<String>,
    /// The id of the first batch planned here.
    pub first_batch_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CommitEntry {
    batch_id: u64,
    checkpoint_sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    batch_id: u64,
    created_ms: i64,
    tasks: Vec<TaskHeader>,
    rate_controller: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct TaskHeader {
    task: u32,
    positions: Vec<Position>,
    plugins: Vec<PluginHeader>,
    watermark_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct PluginHeader {
    #[serde(flatten)]
    identity: PluginIdentity,
    /// Offset and length of the state bytes after the header.
    state: Option<(u64, u64)>,
}

/// Wrap `body`: magic, body length, body, SHA-256 of the body.
fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&Sha256::digest(body));
    out
}

/// The body of a sealed object, or why it cannot be trusted.
fn unseal(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err("not a sluice checkpoint object (wrong header)".into());
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let expected = 16usize.saturating_add(len).saturating_add(32);
    if bytes.len() != expected {
        return Err(format!("truncated or padded: {} bytes where its header promises {expected}", bytes.len()));
    }
    let body = &bytes[16..16 + len];
    if Sha256::digest(body).as_slice() != &bytes[16 + len..] {
        return Err("checksum mismatch: the content was changed or damaged".into());
    }
    Ok(body)
}

fn encode_checkpoint(c: &Checkpoint) -> Vec<u8> {
    let mut blobs = Vec::new();
    let tasks = c
        .tasks
        .iter()
        .map(|t| TaskHeader {
            task: t.task,
            positions: t.positions.clone(),
            watermark_ms: t.watermark_ms,
            plugins: t
                .plugins
                .iter()
                .map(|p| PluginHeader {
                    identity: p.identity.clone(),
                    state: p.state.as_ref().map(|s| {
                        let at = blobs.len() as u64;
                        blobs.extend_from_slice(s);
                        (at, s.len() as u64)
                    }),
                })
                .collect(),
        })
        .collect();
    let header = Header { batch_id: c.batch_id, created_ms: c.created_ms, tasks, rate_controller: c.rate_controller.clone() };
    let json = serde_json::to_vec(&header).expect("a checkpoint header serializes");
    let mut body = Vec::with_capacity(8 + json.len() + blobs.len());
    body.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    body.extend_from_slice(&blobs);
    seal(&body)
}

fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, String> {
    let body = unseal(bytes)?;
    if body.len() < 8 {
        return Err("too short for a checkpoint".into());
    }
    let version = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("written in checkpoint format {version}; this sluice reads format {FORMAT_VERSION}"));
    }
    let len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
    let json = body.get(8..8 + len).ok_or("header length beyond the end")?;
    let blobs = &body[8 + len..];
    let header: Header = serde_json::from_slice(json).map_err(|e| format!("unreadable header: {e}"))?;
    let tasks = header
        .tasks
        .into_iter()
        .map(|t| {
            let plugins = t
                .plugins
                .into_iter()
                .map(|p| {
                    let state = match p.state {
                        None => None,
                        Some((at, len)) => Some(
                            blobs.get(at as usize..(at + len) as usize).ok_or_else(|| format!("state of {} beyond the end", p.identity.name))?.to_vec(),
                        ),
                    };
                    Ok(SavedPlugin { identity: p.identity, state })
                })
                .collect::<Result<_, String>>()?;
            Ok(TaskState { task: t.task, positions: t.positions, plugins, watermark_ms: t.watermark_ms })
        })
        .collect::<Result<_, String>>()?;
    Ok(Checkpoint { batch_id: header.batch_id, created_ms: header.created_ms, tasks, rate_controller: header.rate_controller })
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    seal(&serde_json::to_vec(value).expect("checkpoint entries serialize"))
}

fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(unseal(bytes)?).map_err(|e| format!("unreadable: {e}"))
}

fn name(dir: &str, batch_id: u64) -> String {
    format!("{dir}/{batch_id:020}")
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The location's identity; `None` for a new location.
    pub metadata: Option<Metadata>,
    /// The newest usable checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// Batches planned after it, to run again in order with their recorded plans.
    pub replay: Vec<PlannedBatch>,
    /// What was skipped and why (damaged checkpoints, an unreadable last plan).
    pub warnings: Vec<String>,
}

impl Recovered {
    /// The id of the first batch to plan after the replayed ones.
    pub fn next_batch_id(&self) -> Option<u64> {
        match (self.replay.last(), &self.checkpoint, &self.metadata) {
            (Some(p), _, _) => Some(p.batch_id + 1),
            (None, Some(c), _) => Some(c.batch_id + 1),
            (None, None, Some(m)) => Some(m.first_batch_id),
            (None, None, None) => None,
        }
    }
}

/// One checkpoint as `sluice checkpoint show` lists it.
#[derive(Debug)]
pub struct Listed {
    /// Batch id.
    pub batch_id: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Committed (its commit entry names it)?
    pub committed: bool,
    /// The checkpoint, or why it cannot be read.
    pub content: Result<Checkpoint, String>,
}

/// How a [`CheckpointWriter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// On a thread of its own while the next batch runs (what `sluice run` does).
    #[default]
    Background,
    /// At once, on the caller's thread: as if the writer thread were always done first.
    Inline,
    /// On the caller's thread, but only when the next checkpoint is handed over or the run
    /// ends: as if the writer thread were always done last. With [`WriteMode::Inline`]
    /// these are the two ends of what the background thread can do, in a deterministic
    /// order (the crash simulation runs both).
    Deferred,
}

/// Commits checkpoints one at a time and in order; by default on a thread of its own, so
/// that the next batch runs while a checkpoint is encoded, hashed, written (fsynced) and
/// old ones pruned. At most one checkpoint is in flight: handing over the next waits for it.
///
/// A crash while one is in flight loses nothing: that batch's plan is in the offset log,
/// so recovery restores the checkpoint before it and replays the batch (a sink that already
/// committed its output is not written again).
pub struct CheckpointWriter {
    mode: Writing,
    /// A checkpoint failed: no later one is taken (the thread stops too).
    failed: bool,
}

enum Writing {
    Thread {
        jobs: Option<std::sync::mpsc::SyncSender<Checkpoint>>,
        results: std::sync::mpsc::Receiver<Result<(), CheckpointError>>,
        in_flight: bool,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    Caller {
        store: std::sync::Arc<CheckpointStore>,
        deferred: bool,
        pending: Option<Checkpoint>,
    },
}

impl CheckpointWriter {
    /// Start the writer thread for `store`.
    pub fn start(store: std::sync::Arc<CheckpointStore>) -> Self {
        Self::new(store, WriteMode::Background)
    }

    /// A writer for `store` that writes as `mode` says.
    pub fn new(store: std::sync::Arc<CheckpointStore>, mode: WriteMode) -> Self {
        let mode = match mode {
            WriteMode::Background => {
                let (jobs, inbox) = std::sync::mpsc::sync_channel::<Checkpoint>(1);
                let (report, results) = std::sync::mpsc::sync_channel(1);
                let thread = std::thread::Builder::new()
                    .name("sluice-checkpoint".into())
                    .spawn(move || {
                        for checkpoint in inbox {
                            let result = store.commit(&checkpoint);
                            let failed = result.is_err();
                            if report.send(result).is_err() || failed {
                                return;
                            }
                        }
                    })
                    .expect("spawn the checkpoint thread");
                Writing::Thread { jobs: Some(jobs), results, in_flight: false, thread: Some(thread) }
            }
            WriteMode::Inline => Writing::Caller { store, deferred: false, pending: None },
            WriteMode::Deferred => Writing::Caller { store, deferred: true, pending: None },
        };
        Self { mode, failed: false }
    }

    /// Wait for the checkpoint handed over before (failing with its error), then hand
    /// over `checkpoint`.
    pub fn commit(&mut self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        self.flush()?;
        if self.failed {
            return Err(CheckpointError::WriterGone);
        }
        match &mut self.mode {
            Writing::Thread { jobs, in_flight, .. } => {
                let jobs = jobs.as_ref().expect("jobs close only on drop");
                jobs.send(checkpoint).map_err(|_| CheckpointError::WriterGone)?;
                *in_flight = true;
            }
            Writing::Caller { pending, deferred: true, .. } => *pending = Some(checkpoint),
            Writing::Caller { store, deferred: false, .. } => {
                let result = store.commit(&checkpoint);
                self.failed = result.is_err();
                result?;
            }
        }
        Ok(())
    }

    /// Wait until the checkpoint handed over last is committed.
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        let result = match &mut self.mode {
            Writing::Thread { results, in_flight, .. } => {
                if !std::mem::take(in_flight) {
                    return Ok(());
                }
                results.recv().unwrap_or(Err(CheckpointError::WriterGone))
            }
            Writing::Caller { store, pending, .. } => match pending.take() {
                Some(checkpoint) => store.commit(&checkpoint),
                None => return Ok(()),
            },
        };
        self.failed = result.is_err();
        result
    }
}

impl Drop for CheckpointWriter {
    /// Let the checkpoint in flight finish (a deferred one is dropped, as a crash would).
    fn drop(&mut self) {
        if let Writing::Thread { jobs, thread, .. } = &mut self.mode {
            *jobs = None;
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A checkpoint location.
pub struct CheckpointStore {
    location: Location,
    retain: usize,
}

impl CheckpointStore {
    /// Open the location (a local directory is created if missing).
    pub fn open(config: &Checkpointing) -> Result<Self, CheckpointError> {
        Ok(Self::at(Location::open(&config.location, &config.options)?, config.retain))
    }

    /// Checkpoints in `location`, keeping the newest `retain`.
    pub fn at(location: Location, retain: usize) -> Self {
        Self { location, retain: retain.max(1) }
    }

    /// The location as configured.
    pub fn shown(&self) -> &str {
        self.location.shown()
    }

    fn unusable(&self, message: String) -> CheckpointError {
        CheckpointError::Unusable { location: self.location.shown().to_string(), message }
    }

    fn ids(&self, dir: &str) -> Result<Vec<u64>, CheckpointError> {
        Ok(self.location.list(dir)?.into_iter().filter_map(|(n, _)| n.parse().ok()).collect())
    }

    /// Read the location's metadata.
    pub fn metadata(&self) -> Result<Option<Metadata>, CheckpointError> {
        match self.location.get(METADATA)? {
            None => Ok(None),
            Some(bytes) => decode_json(&bytes).map(Some).map_err(|why| self.unusable(format!("`metadata` cannot be read: {why}"))),
        }
    }

    /// Write the metadata of a new location.
    pub fn create(&self, metadata: &Metadata) -> Result<(), CheckpointError> {
        Ok(self.location.put(METADATA, encode_json(metadata))?)
    }

    /// Find where to resume: the newest checkpoint whose commit entry and checksum agree,
    /// and the batches planned after it.
    pub fn recover(&self) -> Result<Recovered, CheckpointError> {
        let Some(metadata) = self.metadata()? else {
            if !self.ids(OFFSETS)?.is_empty() || !self.ids(CHECKPOINTS)?.is_empty() {
                return Err(self.unusable(
                    "`metadata` is missing but batches are recorded; this is not a complete sluice checkpoint (restore it, or point checkpoint.location at an empty place to start over)".into(),
                ));
            }
            return Ok(Recovered::default());
        };
        if metadata.format_version != FORMAT_VERSION {
            return Err(self.unusable(format!(
                "written in checkpoint format {}; this sluice reads format {FORMAT_VERSION}",
                metadata.format_version
            )));
        }
        let mut warnings = Vec::new();
        let committed: Vec<u64> = self.ids(COMMITS)?;
        let mut checkpoint = None;
        for id in self.ids(CHECKPOINTS)?.into_iter().rev() {
            if !committed.contains(&id) {
                continue; // written, but the batch did not commit: it is replayed
            }
            match self.read_committed(id) {
                Ok(c) => {
                    checkpoint = Some(c);
                    break;
                }
                Err(why) => warnings.push(format!("checkpoint of batch {id} is unusable ({why}); trying the one before it")),
            }
        }
        let start = checkpoint.as_ref().map_or(metadata.first_batch_id, |c: &Checkpoint| c.batch_id + 1);
        if let (Some(w), Some(c)) = (warnings.last_mut(), &checkpoint) {
            w.push_str(&format!("; resuming from the checkpoint of batch {}", c.batch_id));
        }
        let planned: Vec<u64> = self.ids(OFFSETS)?.into_iter().filter(|&id| id >= start).collect();
        let last_committed = committed.iter().copied().max();
        if checkpoint.is_none() && last_committed.is_some() && planned.first() != Some(&start) {
            return Err(self.unusable(format!(
                "no usable checkpoint is left and the offset log no longer starts at batch {start}, so the state cannot be rebuilt; {}restore the location from a backup, or point checkpoint.location at an empty place to start over from startingOffsets",
                warnings.iter().map(|w| format!("{w}; ")).collect::<String>()
            )));
        }
        let mut replay = Vec::new();
        for (i, &id) in planned.iter().enumerate() {
            let newest = i + 1 == planned.len();
            if id != start + i as u64 {
                return Err(self.unusable(format!("the offset log has no entry for batch {} (it jumps to {id}); the batches cannot be replayed in order", start + i as u64)));
            }
            let entry = self.location.get(&name(OFFSETS, id))?.ok_or_else(|| self.unusable(format!("offset log entry {id} disappeared")))?;
            match decode_json::<PlannedBatch>(&entry) {
                Ok(p) if p.batch_id == id => replay.push(p),
                result => {
                    let why = result.map(|p| format!("it holds batch {}", p.batch_id)).unwrap_or_else(|e| e);
                    if newest && last_committed.is_none_or(|c| c < id) {
                        warnings.push(format!("offset log entry of batch {id} is unusable ({why}); that batch never committed, so it is planned again"));
                    } else {
                        return Err(self.unusable(format!(
                            "offset log entry of batch {id} is unusable ({why}) and that batch must be replayed with its recorded ranges; restore the location from a backup"
                        )));
                    }
                }
            }
        }
        Ok(Recovered { metadata: Some(metadata), checkpoint, replay, warnings })
    }

    fn read_committed(&self, id: u64) -> Result<Checkpoint, String> {
        let commit = self.location.get(&name(COMMITS, id)).map_err(|e| e.to_string())?.ok_or("its commit entry disappeared")?;
        let commit: CommitEntry = decode_json(&commit).map_err(|e| format!("commit entry: {e}"))?;
        let bytes = self.location.get(&name(CHECKPOINTS, id)).map_err(|e| e.to_string())?.ok_or("it disappeared")?;
        let c = decode_checkpoint(&bytes)?;
        if hex::encode(Sha256::digest(&bytes)) != commit.checkpoint_sha256 || c.batch_id != id {
            return Err("it is not the checkpoint its commit entry names".into());
        }
        Ok(c)
    }

    /// Record batch N's plan before it is fetched (the offset log).
    pub fn plan(&self, planned: &PlannedBatch) -> Result<(), CheckpointError> {
        Ok(self.location.put(&name(OFFSETS, planned.batch_id), encode_json(planned))?)
    }

    /// Write batch N's checkpoint, then its commit entry, then drop what retention no
    /// longer keeps.
    pub fn commit(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let bytes = encode_checkpoint(checkpoint);
        let entry = CommitEntry { batch_id: checkpoint.batch_id, checkpoint_sha256: hex::encode(Sha256::digest(&bytes)) };
        self.location.put(&name(CHECKPOINTS, checkpoint.batch_id), bytes)?;
        self.location.put(&name(COMMITS, checkpoint.batch_id), encode_json(&entry))?;
        self.prune()
    }

    /// Keep the newest `retain` checkpoints; delete older checkpoints, commit entries and
    /// offset log entries.
    pub fn prune(&self) -> Result<(), CheckpointError> {
        let checkpoints = self.ids(CHECKPOINTS)?;
        let Some(&oldest_kept) = checkpoints.iter().rev().nth(self.retain - 1) else { return Ok(()) };
        for dir in [COMMITS, CHECKPOINTS, OFFSETS] {
            for id in self.ids(dir)?.into_iter().filter(|&id| id < oldest_kept) {
                self.location.delete(&name(dir, id))?;
            }
        }
        Ok(())
    }

    /// Every checkpoint, oldest first, and the planned batch ids without one.
    pub fn list(&self) -> Result<(Vec<Listed>, Vec<u64>), CheckpointError> {
        let committed = self.ids(COMMITS)?;
        let mut listed = Vec::new();
        for (name_, bytes) in self.location.list(CHECKPOINTS)? {
            let Ok(id) = name_.parse::<u64>() else { continue };
            let content = match self.location.get(&name(CHECKPOINTS, id))? {
                Some(b) => decode_checkpoint(&b),
                None => Err("it disappeared".into()),
            };
            let committed = committed.contains(&id) && self.read_committed(id).is_ok();
            listed.push(Listed { batch_id: id, bytes, committed, content });
        }
        let pending = self.ids(OFFSETS)?.into_iter().filter(|id| !committed.contains(id)).collect();
        Ok((listed, pending))
    }

    /// The id of the newest batch in the commit log.
    pub fn last_committed(&self) -> Result<Option<u64>, CheckpointError> {
        Ok(self.ids(COMMITS)?.into_iter().max())
    }

    /// Read one offset log entry.
    pub fn planned(&self, batch_id: u64) -> Result<Option<PlannedBatch>, CheckpointError> {
        match self.location.get(&name(OFFSETS, batch_id))? {
            None => Ok(None),
            Some(b) => decode_json(&b).map(Some).map_err(|why| self.unusable(format!("offset log entry {batch_id}: {why}"))),
        }
    }
}

/// Positions by (topic, partition), from a task's checkpoint.
pub fn positions(task: &TaskState) -> BTreeMap<(String, i32), i64> {
    task.positions.iter().map(|p| ((p.topic.clone(), p.partition), p.next)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(location: &str, retain: usize) -> CheckpointStore {
        CheckpointStore::open(&Checkpointing { location: location.into(), options: BTreeMap::new(), retain }).unwrap()
    }

    fn identity(name: &str) -> PluginIdentity {
        PluginIdentity { name: name.into(), version: "1.0.0".into(), content_hash: "ab".repeat(32), state_version: 2 }
    }

    fn planned(id: u64) -> PlannedBatch {
        PlannedBatch {
            batch_id: id,
            processing_time_ms: 1_000 + id as i64,
            tasks: vec![TaskPlan { task: 0, ranges: vec![SavedRange { topic: "t".into(), partition: 0, from: id as i64 * 10, until: id as i64 * 10 + 10 }], watermark_ms: Some(5) }],
        }
    }

    fn checkpoint(id: u64) -> Checkpoint {
        Checkpoint {
            batch_id: id,
            created_ms: 7,
            tasks: vec![TaskState {
                task: 0,
                positions: vec![Position { topic: "t".into(), partition: 0, next: id as i64 * 10 + 10 }],
                plugins: vec![SavedPlugin { identity: identity("filter"), state: None }, SavedPlugin { identity: identity("agg"), state: Some(vec![id as u8; 100]) }],
                watermark_ms: Some(id as i64),
            }],
            rate_controller: None,
        }
    }

    fn metadata() -> Metadata {
        Metadata { format_version: FORMAT_VERSION, pipeline: "p".into(), topics: vec!["t".into()], first_batch_id: 0 }
    }

    /// Run batches `0..n` through the store the way the pipeline loop does.
    fn run(store: &CheckpointStore, n: u64) {
        store.create(&metadata()).unwrap();
        for id in 0..n {
            store.plan(&planned(id)).unwrap();
            store.commit(&checkpoint(id)).unwrap();
        }
    }

    #[test]
    fn the_writer_commits_checkpoints_in_order_while_the_caller_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(dir.path().to_str().unwrap(), 3));
        s.create(&metadata()).unwrap();
        let mut writer = CheckpointWriter::start(s.clone());
        for id in 0..5 {
            s.plan(&planned(id)).unwrap();
            writer.commit(checkpoint(id)).unwrap();
        }
        writer.flush().unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.checkpoint, Some(checkpoint(4)));
        assert!(r.replay.is_empty() && r.warnings.is_empty());
        assert_eq!(s.ids(CHECKPOINTS).unwrap(), vec![2, 3, 4], "retention pruned on the writer's thread");
    }

    #[test]
    fn a_checkpoint_the_writer_cannot_write_fails_the_next_commit_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(dir.path().to_str().unwrap(), 10));
        s.create(&metadata()).unwrap();
        // A file where the checkpoints directory belongs: no checkpoint can be written.
        std::fs::write(dir.path().join(CHECKPOINTS), b"in the way").unwrap();
        let mut writer = CheckpointWriter::start(s.clone());
        s.plan(&planned(0)).unwrap();
        writer.commit(checkpoint(0)).unwrap();
        let e = writer.commit(checkpoint(1)).unwrap_err().to_string();
        assert!(e.contains("cannot write checkpoints/"), "{e}");
        assert!(writer.flush().is_ok() && writer.commit(checkpoint(2)).is_err(), "the writer takes no checkpoint after a failed one");
        let r = s.recover().unwrap();
        assert_eq!((r.checkpoint, r.replay), (None, vec![planned(0)]), "the batch whose checkpoint failed is replayed");
    }

    #[test]
    fn seal_detects_every_truncation_and_every_flipped_byte() {
        let sealed = encode_checkpoint(&checkpoint(3));
        assert_eq!(decode_checkpoint(&sealed).unwrap(), checkpoint(3));
        for cut in 0..sealed.len() {
            assert!(decode_checkpoint(&sealed[..cut]).is_err(), "a cut at {cut} went unnoticed");
        }
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x20;
            assert!(decode_checkpoint(&bad).is_err(), "a flipped byte at {at} went unnoticed");
        }
    }

    #[test]
    fn a_new_location_recovers_nothing_and_a_committed_run_resumes_after_its_last_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path().to_str().unwrap(), 10);
        let r = s.recover().unwrap();
        assert!(r.metadata.is_none() && r.checkpoint.is_none() && r.replay.is_empty());
        assert_eq!(r.next_batch_id(), None);
        run(&s, 3);
        let r = s.recover().unwrap();
        assert_eq!(r.checkpoint, Some(checkpoint(2)));
        assert!(r.replay.is_empty() && r.warnings.is_empty());
        assert_eq!(r.next_batch_id(), Some(3));
    }

    #[test]
    fn a_planned_batch_without_a_commit_is_replayed_with_its_recorded_plan() {
        let s = store("memory://", 10);
        run(&s, 2);
        s.plan(&planned(2)).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.checkpoint.unwrap().batch_id, 1);
        assert_eq!(r.replay, vec![planned(2)]);
        // A checkpoint written without its commit entry does not count either.
        s.location.put(&name(CHECKPOINTS, 2), encode_checkpoint(&checkpoint(2))).unwrap();
        let r = s.recover().unwrap();
        assert_eq!((r.checkpoint.unwrap().batch_id, r.replay.len()), (1, 1));
    }

    #[test]
    fn a_corrupt_newest_checkpoint_falls_back_to_the_one_before_and_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path().to_str().unwrap(), 10);
        run(&s, 4);
        let file = dir.path().join(name(CHECKPOINTS, 3));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.checkpoint.unwrap().batch_id, 2);
        assert_eq!(r.replay, vec![planned(3)], "the batch of the damaged checkpoint is replayed");
        assert_eq!(r.warnings.len(), 1);
        let w = &r.warnings[0];
        assert!(w.contains("checkpoint of batch 3") && w.contains("truncated") && w.contains("resuming from the checkpoint of batch 2"), "{w}");
    }

    #[test]
    fn retention_keeps_the_newest_checkpoints_and_the_log_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path().to_str().unwrap(), 3);
        run(&s, 8);
        assert_eq!(s.ids(CHECKPOINTS).unwrap(), vec![5, 6, 7]);
        assert_eq!(s.ids(COMMITS).unwrap(), vec![5, 6, 7]);
        assert_eq!(s.ids(OFFSETS).unwrap(), vec![5, 6, 7]);
        // With every kept checkpoint damaged, the state cannot be rebuilt: a clear error.
        for id in 5..8 {
            std::fs::write(dir.path().join(name(CHECKPOINTS, id)), b"garbage").unwrap();
        }
        let error = s.recover().unwrap_err().to_string();
        assert!(error.contains("no usable checkpoint is left") && error.contains("checkpoint of batch 7 is unusable"), "{error}");
    }

    #[test]
    fn an_unreadable_plan_of_an_uncommitted_batch_is_planned_again_but_a_needed_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path().to_str().unwrap(), 10);
        run(&s, 2);
        std::fs::write(dir.path().join(name(OFFSETS, 2)), b"half").unwrap();
        let r = s.recover().unwrap();
        assert!(r.replay.is_empty());
        assert!(r.warnings[0].contains("batch 2") && r.warnings[0].contains("planned again"), "{:?}", r.warnings);
        assert_eq!(r.next_batch_id(), Some(2));
        std::fs::write(dir.path().join(name(CHECKPOINTS, 1)), b"bad").unwrap();
        std::fs::write(dir.path().join(name(OFFSETS, 1)), b"bad").unwrap();
        let error = s.recover().unwrap_err().to_string();
        assert!(error.contains("offset log entry of batch 1 is unusable"), "{error}");
    }

    #[test]
    fn a_location_without_metadata_but_with_batches_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path().to_str().unwrap(), 10);
        run(&s, 1);
        std::fs::remove_file(dir.path().join(METADATA)).unwrap();
        let error = s.recover().unwrap_err().to_string();
        assert!(error.contains("`metadata` is missing"), "{error}");
    }
}
