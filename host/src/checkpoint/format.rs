//! How checkpoint objects are laid out: the stored types, sealing (magic, length, SHA-256)
//! and the encodings of checkpoints and log entries.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Assignment;

/// Layout version of the objects; a reader refuses others.
pub const FORMAT_VERSION: u32 = 1;
pub(super) const MAGIC: &[u8; 8] = b"SLUICE\x00\x01";
pub(super) const METADATA: &str = "metadata";
pub(super) const OFFSETS: &str = "offsets";
pub(super) const CHECKPOINTS: &str = "checkpoints";
pub(super) const COMMITS: &str = "commits";

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
    /// The owner's epoch: 0 for a run over all partitions; in a consumer group each new
    /// owner of a task writes above every epoch before it (see [`super::CheckpointStore::claim`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// A claim: the entry a new owner takes a task with. It plans nothing and is not run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub claim: bool,
}

impl PlannedBatch {
    /// A batch of `tasks` planned now-ish (epoch 0: the store stamps its own).
    pub fn new(batch_id: u64, processing_time_ms: i64, tasks: Vec<TaskPlan>) -> Self {
        Self { batch_id, processing_time_ms, tasks, epoch: 0, claim: false }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// A task of a repartition topic: per source partition, the last record it counted
    /// (see [`crate::repartition::Counted`]).
    pub upstream: Vec<UpstreamMark>,
}

/// The last record of one source partition a repartition task counted: the source task's
/// batch and the record's place in that batch's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamMark {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// The source task's batch.
    pub batch_id: u64,
    /// The record's place in that batch's output.
    pub seq: u64,
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
    /// How partitions are assigned; a location written in one mode is refused in the other.
    #[serde(default, skip_serializing_if = "is_all")]
    pub assignment: Assignment,
}

fn is_all(a: &Assignment) -> bool {
    *a == Assignment::All
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CommitEntry {
    pub(super) batch_id: u64,
    pub(super) checkpoint_sha256: String,
    /// The epoch of the owner that committed (0 outside a consumer group).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) epoch: u64,
    /// The watermark after the batch, for the group's global watermark (read without the
    /// checkpoint's state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) watermark_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Header {
    batch_id: u64,
    created_ms: i64,
    tasks: Vec<TaskHeader>,
    rate_controller: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct TaskHeader {
    task: u32,
    positions: Vec<Position>,
    plugins: Vec<PluginHeader>,
    watermark_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream: Vec<UpstreamMark>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct PluginHeader {
    #[serde(flatten)]
    identity: PluginIdentity,
    /// Offset and length of the state bytes after the header.
    state: Option<(u64, u64)>,
}

/// Wrap `body`: magic, body length, body, SHA-256 of the body.
pub(super) fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&Sha256::digest(body));
    out
}

/// The body of a sealed object, or why it cannot be trusted.
pub(super) fn unseal(bytes: &[u8]) -> Result<&[u8], String> {
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

pub(super) fn encode_checkpoint(c: &Checkpoint) -> Vec<u8> {
    let mut blobs = Vec::new();
    let tasks = c
        .tasks
        .iter()
        .map(|t| TaskHeader {
            task: t.task,
            positions: t.positions.clone(),
            watermark_ms: t.watermark_ms,
            upstream: t.upstream.clone(),
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

pub(super) fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, String> {
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
                        Some((at, len)) => Some(blobs.get(at as usize..(at + len) as usize).ok_or_else(|| format!("state of {} beyond the end", p.identity.name))?.to_vec()),
                    };
                    Ok(SavedPlugin { identity: p.identity, state })
                })
                .collect::<Result<_, String>>()?;
            Ok(TaskState { task: t.task, positions: t.positions, plugins, watermark_ms: t.watermark_ms, upstream: t.upstream })
        })
        .collect::<Result<_, String>>()?;
    Ok(Checkpoint { batch_id: header.batch_id, created_ms: header.created_ms, tasks, rate_controller: header.rate_controller })
}

pub(super) fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    seal(&serde_json::to_vec(value).expect("checkpoint entries serialize"))
}

pub(super) fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(unseal(bytes)?).map_err(|e| format!("unreadable: {e}"))
}

pub(super) fn name(dir: &str, batch_id: u64) -> String {
    format!("{dir}/{batch_id:020}")
}

/// The name of batch N's checkpoint object written by an owner in `epoch`: owners of one
/// task in different epochs never write the same object (epoch 0 keeps the plain name).
pub(super) fn checkpoint_name(batch_id: u64, epoch: u64) -> String {
    match epoch {
        0 => name(CHECKPOINTS, batch_id),
        e => format!("{}.{e}", name(CHECKPOINTS, batch_id)),
    }
}

/// The batch id in an object name of the logs (`<id>` or `<id>.<epoch>`).
pub(super) fn batch_of(object: &str) -> Option<u64> {
    object.split('.').next()?.parse().ok()
}
