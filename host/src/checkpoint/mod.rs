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

mod format;
mod writer;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use format::*;
pub use format::{Checkpoint, Metadata, PlannedBatch, PluginIdentity, Position, SavedPlugin, SavedRange, TaskPlan, TaskState, UpstreamMark, FORMAT_VERSION};
pub use writer::{CheckpointWriter, WriteMode};

use crate::config::{Assignment, Checkpointing};
use crate::store::{Location, StoreError};

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
    /// Another process took the task over: this one must stop working on it.
    #[error("checkpoint location {location}: another process took this task over at batch {batch_id} (its epoch {theirs} is newer than this process's {ours}); this process stops working on the task and writes nothing more for it")]
    Fenced {
        /// The task's location.
        location: String,
        /// Where the newer owner was found.
        batch_id: u64,
        /// This process's epoch.
        ours: u64,
        /// The newer owner's epoch.
        theirs: u64,
    },
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The location's identity; `None` for a new location.
    pub metadata: Option<Metadata>,
    /// The newest usable checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// Batches planned after it, to run again in order with their recorded plans (claims
    /// are not among them: they plan nothing).
    pub replay: Vec<PlannedBatch>,
    /// The newest offset log entry taken into account (a claim, a replayed batch), if any
    /// after the checkpoint.
    pub planned_until: Option<u64>,
    /// What was skipped and why (damaged checkpoints, an unreadable last plan).
    pub warnings: Vec<String>,
}

impl Recovered {
    /// The id of the first batch to plan after the replayed ones.
    pub fn next_batch_id(&self) -> Option<u64> {
        match (self.planned_until, &self.checkpoint, &self.metadata) {
            (Some(p), _, _) => Some(p + 1),
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

/// How often [`CheckpointStore::claim`] tries for the next free entry while others take it.
const CLAIM_ATTEMPTS: usize = 50;

/// Where the tasks of a consumer-group run keep their checkpoints, under the location.
pub const TASKS: &str = "tasks";

/// A checkpoint location: of a whole run, or of one task of a consumer-group run.
///
/// Offset log and commit log entries are created, never replaced (object_store's
/// create-only put), so two processes never both write batch N's plan or commit. Outside
/// a consumer group a second run on the same location is refused that way; inside one,
/// each owner of a task holds an epoch, taken with [`CheckpointStore::claim`], and an owner
/// that finds a newer epoch where it writes is fenced ([`CheckpointError::Fenced`]).
pub struct CheckpointStore {
    location: Location,
    retain: usize,
    /// The epoch this process owns the location in (0 outside a consumer group).
    epoch: u64,
}

impl CheckpointStore {
    /// Open the location (a local directory is created if missing).
    pub fn open(config: &Checkpointing) -> Result<Self, CheckpointError> {
        Ok(Self::at(Location::open(&config.location, &config.options)?, config.retain))
    }

    /// Checkpoints in `location`, keeping the newest `retain`.
    pub fn at(location: Location, retain: usize) -> Self {
        Self { location, retain: retain.max(1), epoch: 0 }
    }

    /// The checkpoints of one task (a source partition) of a consumer-group run, under
    /// `tasks/<topic>/<partition>`; not claimed yet.
    pub fn task(&self, topic: &str, partition: i32) -> Self {
        Self { location: self.location.sub(&format!("{TASKS}/{topic}/{partition}")), retain: self.retain, epoch: 0 }
    }

    /// The tasks that have checkpoints here, as (topic, partition).
    pub fn tasks(&self) -> Result<Vec<(String, i32)>, CheckpointError> {
        let mut tasks = Vec::new();
        for topic in self.location.dirs(TASKS)? {
            for partition in self.location.dirs(&format!("{TASKS}/{topic}"))? {
                if let Ok(p) = partition.parse() {
                    tasks.push((topic.clone(), p));
                }
            }
        }
        Ok(tasks)
    }

    /// The location as configured.
    pub fn shown(&self) -> &str {
        self.location.shown()
    }

    /// The epoch this process holds the location in (0 outside a consumer group).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn unusable(&self, message: String) -> CheckpointError {
        CheckpointError::Unusable { location: self.location.shown().to_string(), message }
    }

    fn fenced(&self, batch_id: u64, theirs: u64) -> CheckpointError {
        CheckpointError::Fenced { location: self.location.shown().to_string(), batch_id, ours: self.epoch, theirs }
    }

    /// Batch ids with an object in `dir`, sorted, each once.
    fn ids(&self, dir: &str) -> Result<Vec<u64>, CheckpointError> {
        let mut ids: Vec<u64> = self.location.list(dir)?.into_iter().filter_map(|(n, _)| batch_of(&n)).collect();
        ids.dedup();
        Ok(ids)
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

    /// Write the metadata of a new location unless a process wrote it first.
    pub fn create_once(&self, metadata: &Metadata) -> Result<(), CheckpointError> {
        self.location.create(METADATA, encode_json(metadata))?;
        Ok(())
    }

    /// Refuse a location written in another assignment mode than `assignment`.
    pub fn check_assignment(&self, assignment: Assignment) -> Result<(), CheckpointError> {
        let written = match self.metadata()? {
            Some(m) => m.assignment,
            None if !self.location.dirs(TASKS)?.is_empty() => Assignment::Group,
            None if !self.ids(OFFSETS)?.is_empty() => Assignment::All,
            None => return Ok(()),
        };
        let named = |a: Assignment| match a {
            Assignment::All => "source.assignment = \"all\" (one process reads every partition)",
            Assignment::Group => "source.assignment = \"group\" (the processes of a consumer group share the partitions)",
        };
        if written != assignment {
            return Err(self.unusable(format!(
                "it was written with {}, and this run has {}; their checkpoints are laid out differently. Use the mode it was written with, or a new checkpoint.location",
                named(written),
                named(assignment)
            )));
        }
        Ok(())
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
            return Err(self.unusable(format!("written in checkpoint format {}; this sluice reads format {FORMAT_VERSION}", metadata.format_version)));
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
        let mut planned_until = None;
        for (i, &id) in planned.iter().enumerate() {
            let newest = i + 1 == planned.len();
            if id != start + i as u64 {
                return Err(self.unusable(format!("the offset log has no entry for batch {} (it jumps to {id}); the batches cannot be replayed in order", start + i as u64)));
            }
            let entry = self.location.get(&name(OFFSETS, id))?.ok_or_else(|| self.unusable(format!("offset log entry {id} disappeared")))?;
            match decode_json::<PlannedBatch>(&entry) {
                Ok(p) if p.batch_id == id => {
                    planned_until = Some(id);
                    if !p.claim {
                        replay.push(p);
                    }
                }
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
        Ok(Recovered { metadata: Some(metadata), checkpoint, replay, planned_until, warnings })
    }

    fn commit_entry(&self, id: u64) -> Result<CommitEntry, String> {
        let commit = self.location.get(&name(COMMITS, id)).map_err(|e| e.to_string())?.ok_or("its commit entry disappeared")?;
        decode_json(&commit).map_err(|e| format!("commit entry: {e}"))
    }

    fn read_committed(&self, id: u64) -> Result<Checkpoint, String> {
        let commit = self.commit_entry(id)?;
        let bytes = self.location.get(&checkpoint_name(id, commit.epoch)).map_err(|e| e.to_string())?.ok_or("it disappeared")?;
        let c = decode_checkpoint(&bytes)?;
        if hex::encode(Sha256::digest(&bytes)) != commit.checkpoint_sha256 || c.batch_id != id {
            return Err("it is not the checkpoint its commit entry names".into());
        }
        Ok(c)
    }

    /// The epoch of the newest readable offset log entry (0 when there is none).
    fn newest_epoch(&self) -> Result<(Option<u64>, u64), CheckpointError> {
        let ids = self.ids(OFFSETS)?;
        for &id in ids.iter().rev() {
            if let Some(Ok(p)) = self.location.get(&name(OFFSETS, id))?.map(|b| decode_json::<PlannedBatch>(&b)) {
                return Ok((ids.last().copied(), p.epoch));
            }
        }
        Ok((ids.last().copied(), 0))
    }

    /// The epoch of the task's newest owner (0 outside a consumer group or before a claim).
    pub fn owner_epoch(&self) -> Result<u64, CheckpointError> {
        Ok(self.newest_epoch()?.1)
    }

    /// Take the location over (a task of a consumer-group run): create the next offset
    /// log entry as a claim with an epoch above every owner's before, and own the location
    /// in that epoch. An earlier owner that still runs is fenced at its next plan, commit
    /// or pruning. Returns the claim's batch id; recovery comes after it.
    pub fn claim(&mut self, pipeline: &str, topics: &[String]) -> Result<u64, CheckpointError> {
        self.create_once(&Metadata { format_version: FORMAT_VERSION, pipeline: pipeline.to_string(), topics: topics.to_vec(), first_batch_id: 0, assignment: Assignment::Group })?;
        for _ in 0..CLAIM_ATTEMPTS {
            let (newest, epoch) = self.newest_epoch()?;
            // Without an offset log entry nothing ran yet (retention keeps the entry of
            // every kept checkpoint).
            let batch_id = match newest {
                Some(id) => id + 1,
                None => self.metadata()?.map_or(0, |m| m.first_batch_id),
            };
            let claim = PlannedBatch {
                batch_id,
                processing_time_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
                tasks: Vec::new(),
                epoch: epoch + 1,
                claim: true,
            };
            if self.location.create(&name(OFFSETS, batch_id), encode_json(&claim))? {
                self.epoch = claim.epoch;
                return Ok(batch_id);
            }
        }
        Err(self.unusable(format!("no free offset log entry to claim the task with after {CLAIM_ATTEMPTS} attempts: other processes keep writing it; check that only one consumer group uses this location")))
    }

    /// Record batch N's plan before it is fetched (the offset log), in this owner's epoch.
    /// Fails with [`CheckpointError::Fenced`] when a newer owner holds the entry, and as
    /// unusable when another run of the same epoch wrote it (two runs on one location).
    ///
    /// In a consumer group the entries before and after matter too (both found by the crash
    /// simulation with several processes). Before the create, the entry before N and the
    /// newest must not be a newer owner's: a newer owner may have claimed the task just
    /// below N while this owner recovered. After it, the newest must not be either: a newer
    /// owner may have claimed the task at N and pruned its claim since (retention deletes
    /// entries below its checkpoints), so that this owner's create of N succeeds although
    /// the task is not its own any more. A newer owner's newest entry is never pruned.
    pub fn plan(&self, planned: &PlannedBatch) -> Result<(), CheckpointError> {
        let entry_name = name(OFFSETS, planned.batch_id);
        let entry = PlannedBatch { epoch: self.epoch, ..planned.clone() };
        let bytes = encode_json(&entry);
        if self.epoch > 0 {
            if let Some(before) = planned.batch_id.checked_sub(1) {
                if let Some(Ok(there)) = self.location.get(&name(OFFSETS, before))?.map(|b| decode_json::<PlannedBatch>(&b)) {
                    if there.epoch > self.epoch {
                        return Err(self.fenced(before, there.epoch));
                    }
                }
            }
            self.check_newest(planned.batch_id)?;
        }
        if self.location.create(&entry_name, bytes.clone())? {
            if self.epoch > 0 {
                self.check_newest(planned.batch_id)?;
            }
            return Ok(());
        }
        match self.location.get(&entry_name)?.map(|b| decode_json::<PlannedBatch>(&b)) {
            Some(Ok(there)) if there.epoch > self.epoch => Err(self.fenced(planned.batch_id, there.epoch)),
            Some(Ok(there)) if there == entry => Ok(()),
            Some(Ok(there)) => Err(self.unusable(format!(
                "the offset log already holds a different plan for batch {} (epoch {}): another run uses this checkpoint location at the same time. Stop it, or give each run its own checkpoint.location",
                planned.batch_id, there.epoch
            ))),
            // A damaged entry of a batch that never committed (recovery said so): replaced.
            Some(Err(_)) => Ok(self.location.put(&entry_name, bytes)?),
            None => Err(self.unusable(format!("offset log entry {} disappeared while it was written", planned.batch_id))),
        }
    }

    /// Fenced when the offset log's newest entry is a newer owner's.
    fn check_newest(&self, batch_id: u64) -> Result<(), CheckpointError> {
        match self.newest_epoch()? {
            (Some(newest), theirs) if theirs > self.epoch => Err(self.fenced(newest.max(batch_id), theirs)),
            _ => Ok(()),
        }
    }

    /// Write batch N's checkpoint, then create its commit entry, then drop what retention
    /// no longer keeps. When the batch has a commit entry already: a newer owner's fences
    /// this one, another run's of the same epoch is refused, an earlier owner's (it finished
    /// the batch this one replayed) stands, and a damaged one (recovery replayed the batch
    /// because of it) is replaced.
    pub fn commit(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let id = checkpoint.batch_id;
        let bytes = encode_checkpoint(checkpoint);
        let watermark_ms = if self.epoch > 0 { checkpoint.tasks.iter().filter_map(|t| t.watermark_ms).max() } else { None };
        let entry = CommitEntry { batch_id: id, checkpoint_sha256: hex::encode(Sha256::digest(&bytes)), epoch: self.epoch, watermark_ms };
        // Looked at before the checkpoint object is written: outside a group, another
        // run's object has the same name.
        if self.commit_stands(id, &entry)? {
            return Ok(());
        }
        self.location.put(&checkpoint_name(id, self.epoch), bytes)?;
        let commit_name = name(COMMITS, id);
        if !self.location.create(&commit_name, encode_json(&entry))? {
            if self.commit_stands(id, &entry)? {
                if self.epoch > 0 {
                    self.location.delete(&checkpoint_name(id, self.epoch))?;
                }
                return Ok(());
            }
            self.location.put(&commit_name, encode_json(&entry))?;
        }
        self.prune()
    }

    /// Whether batch `id` has a commit entry that stands instead of `ours`: ours already,
    /// or an earlier owner's; `false` when there is none or its checkpoint is damaged.
    fn commit_stands(&self, id: u64, ours: &CommitEntry) -> Result<bool, CheckpointError> {
        let Ok(there) = self.commit_entry(id) else { return Ok(false) };
        if there.epoch > self.epoch {
            return Err(self.fenced(id, there.epoch));
        }
        if self.read_committed(id).is_err() {
            return Ok(false);
        }
        if there == *ours {
            return Ok(true);
        }
        if there.epoch < self.epoch {
            tracing::info!(
                "{}: batch {id} was committed by the task's previous owner (epoch {}) while this process replayed it; that checkpoint stands",
                self.shown(),
                there.epoch
            );
            return Ok(true);
        }
        Err(self.unusable(format!(
            "the commit log already holds batch {id}, committed by another run: two runs use this checkpoint location at the same time. Stop one, or give each its own checkpoint.location"
        )))
    }

    /// Keep the newest `retain` checkpoints; delete older checkpoints, commit entries and
    /// offset log entries. An owner that a newer one took over from prunes nothing (and
    /// learns it is fenced).
    pub fn prune(&self) -> Result<(), CheckpointError> {
        if self.epoch > 0 {
            if let (Some(newest), theirs) = self.newest_epoch()? {
                if theirs > self.epoch {
                    return Err(self.fenced(newest, theirs));
                }
            }
        }
        let checkpoints = self.ids(CHECKPOINTS)?;
        let Some(&oldest_kept) = checkpoints.iter().rev().nth(self.retain - 1) else { return Ok(()) };
        for dir in [COMMITS, CHECKPOINTS, OFFSETS] {
            for (object, _) in self.location.list(dir)? {
                if batch_of(&object).is_some_and(|id| id < oldest_kept) {
                    self.location.delete(&format!("{dir}/{object}"))?;
                }
            }
        }
        Ok(())
    }

    /// Every checkpoint, oldest first, and the planned batch ids without one.
    pub fn list(&self) -> Result<(Vec<Listed>, Vec<u64>), CheckpointError> {
        let committed = self.ids(COMMITS)?;
        let mut listed = Vec::new();
        for (object, bytes) in self.location.list(CHECKPOINTS)? {
            let Some(id) = batch_of(&object) else { continue };
            let content = match self.location.get(&format!("{CHECKPOINTS}/{object}"))? {
                Some(b) => decode_checkpoint(&b),
                None => Err("it disappeared".into()),
            };
            let named = self.commit_entry(id).is_ok_and(|c| format!("{CHECKPOINTS}/{object}") == checkpoint_name(id, c.epoch));
            let committed = named && committed.contains(&id) && self.read_committed(id).is_ok();
            listed.push(Listed { batch_id: id, bytes, committed, content });
        }
        // Claims plan nothing: they are not batches waiting for a commit.
        let pending = self.ids(OFFSETS)?.into_iter().filter(|id| !committed.contains(id) && !self.planned(*id).is_ok_and(|p| p.is_some_and(|p| p.claim))).collect();
        Ok((listed, pending))
    }

    /// The watermark after the newest committed batch of a consumer-group task.
    pub fn committed_watermark(&self) -> Result<Option<i64>, CheckpointError> {
        let Some(id) = self.last_committed()? else { return Ok(None) };
        Ok(self.commit_entry(id).ok().and_then(|c| c.watermark_ms))
    }

    /// The highest committed watermark of all tasks of a consumer-group run (its global
    /// watermark).
    pub fn group_watermark(&self) -> Result<Option<i64>, CheckpointError> {
        let mut highest = None;
        for (topic, partition) in self.tasks()? {
            highest = highest.max(self.task(&topic, partition).committed_watermark()?);
        }
        Ok(highest)
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
mod tests;
