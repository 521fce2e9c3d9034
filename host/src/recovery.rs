//! Recovery: what a run continues from. It reads the checkpoint location (the newest
//! usable checkpoint and the batches planned after it), restores the plugins' state from
//! that checkpoint, decides where each partition continues and which batch id comes next,
//! and refuses a sink that holds output the checkpoint does not know. Replaying the
//! planned batches is the batch loop's job ([`crate::pipeline`]): it runs them with their
//! recorded plans before it plans anything new.

use std::collections::BTreeMap;

use crate::chain::Chain;
use crate::checkpoint::{self, CheckpointStore, Metadata, PlannedBatch, Recovered};
use crate::config::Pipeline;
use crate::error::RunError;
use crate::sink::Sink;

/// The one task over all partitions (see DESIGN.md: state is kept per task so that one
/// task per partition can be added later).
pub const TASK: u32 = 0;

/// Where a run continues.
#[derive(Debug, Default)]
pub struct Resume {
    /// Where each partition continues: after the checkpoint, or where the first replayed
    /// batch starts when no checkpoint was committed yet; `None` for a new run (the
    /// source's group offsets, else `startingOffsets`).
    pub positions: Option<BTreeMap<(String, i32), i64>>,
    /// Batches planned after the checkpoint, to run again with their recorded plans.
    pub replay: Vec<PlannedBatch>,
    /// The id of the first batch planned anew.
    pub next_batch_id: u64,
    /// The watermark after the checkpoint's batch.
    pub watermark_ms: Option<i64>,
    /// The rate controller's saved state.
    pub rate_controller: Option<serde_json::Value>,
    /// A repartition task's marks of what it counted (empty for other tasks).
    pub upstream: Vec<checkpoint::UpstreamMark>,
}

/// Read the checkpoint location, restore the chain's state (unless `ignore_state`), and
/// say where the run continues. Without checkpointing a run starts at the source's group
/// offsets (else `startingOffsets`), numbering its batches after what `sink` holds.
pub fn recover(pipeline: &Pipeline, checkpoints: Option<&CheckpointStore>, chain: &mut Chain, sink: &dyn Sink, ignore_state: bool) -> Result<Resume, RunError> {
    let Some(store) = checkpoints else {
        let next_batch_id = sink.last_batch_id()?.map_or(0, |last| last + 1);
        return Ok(Resume { next_batch_id, ..Resume::default() });
    };
    let recovered = store.recover()?;
    for w in &recovered.warnings {
        tracing::warn!("{w}");
    }
    match (&recovered.checkpoint, recovered.replay.len()) {
        (Some(ck), n) => tracing::info!("checkpoint {}: resuming after batch {}, {n} planned batches to replay", store.shown(), ck.batch_id),
        (None, 0) => tracing::debug!("checkpoint {}: no checkpoint yet, starting at the consumer group's committed offsets, else at source.startingOffsets", store.shown()),
        (None, n) => tracing::info!("checkpoint {}: no batch committed yet, {n} planned batches to replay", store.shown()),
    }
    if let Some(m) = &recovered.metadata {
        if m.topics != pipeline.source.topics {
            tracing::warn!("the checkpoint was written for topics {:?}; the pipeline now reads {:?}", m.topics, pipeline.source.topics);
        }
    }
    let task = recovered.checkpoint.as_ref().and_then(|c| c.tasks.iter().find(|t| t.task == TASK));
    if let Some(task) = task {
        if ignore_state {
            tracing::warn!("--ignore-state: the plugins start with fresh state at the checkpoint's offsets");
        } else {
            chain.restore(&task.plugins)?;
        }
    }
    let positions = match (task, recovered.replay.first()) {
        (Some(task), _) => Some(checkpoint::positions(task)),
        (None, Some(plan)) => Some(plan.tasks.iter().flat_map(|t| &t.ranges).map(|r| ((r.topic.clone(), r.partition), r.from)).collect()),
        (None, None) => None,
    };
    let next_batch_id = match recovered.next_batch_id() {
        Some(id) => id,
        None => sink.last_batch_id()?.map_or(0, |last| last + 1),
    };
    if recovered.metadata.is_none() {
        store.create(&Metadata {
            format_version: checkpoint::FORMAT_VERSION,
            pipeline: pipeline.name.clone(),
            topics: pipeline.source.topics.clone(),
            first_batch_id: next_batch_id,
            assignment: crate::config::Assignment::All,
        })?;
    }
    if let Some(last) = sink.last_batch_id()?.filter(|&last| last >= next_batch_id) {
        return Err(RunError::Inconsistent(format!(
            "the sink already holds committed output of batch {last}, but checkpoint {} continues at batch {next_batch_id}: they were not used together. Point checkpoint.location at the checkpoint this output was written with, or write to a new sink location",
            store.shown()
        )));
    }
    let watermark_ms = task.and_then(|t| t.watermark_ms);
    // Kept with --ignore-state too: they say which records were counted, like positions.
    let upstream = task.map(|t| t.upstream.clone()).unwrap_or_default();
    let Recovered { checkpoint, replay, .. } = recovered;
    Ok(Resume { positions, replay, next_batch_id, watermark_ms, rate_controller: checkpoint.and_then(|c| c.rate_controller), upstream })
}
