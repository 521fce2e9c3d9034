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
pub use format::{Checkpoint, Metadata, PlannedBatch, PluginIdentity, Position, SavedPlugin, SavedRange, TaskPlan, TaskState, FORMAT_VERSION};
pub use writer::{CheckpointWriter, WriteMode};

use crate::config::Checkpointing;
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
mod tests;
