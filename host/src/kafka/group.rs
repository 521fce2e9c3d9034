//! Membership of a consumer group, for a run with `source.assignment = "group"`: a consumer
//! of its own that subscribes with the pipeline's group id (cooperative-sticky by default)
//! and only takes part in the group. It reads no records — the partitions it is given are
//! paused at once; the source's consumer reads them with exact positions — so its thread
//! serves the group's events whatever the batch loop does, however throttled the source is.
//!
//! The batch loop learns what moved at its next batch boundary ([`Membership::changes`]).
//! A partition revoked in a cooperative move or a shutdown is released gracefully: the
//! group waits (at most [`RELEASE_WAIT`]) until the loop has finished the task's batch in
//! flight and its checkpoint and called [`Membership::released`]. A partition lost
//! (this process was stalled past the session timeout) is not waited for: its new owner's
//! claim fences this process off the task's checkpoints.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::TopicPartitionList;
use sluice_sdk::OffsetRange;

use super::{failed, SourceError};

/// A partition: (topic, partition).
pub type Key = (String, i32);

/// How long a graceful revoke waits for the batch loop to release a partition.
pub const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// What moved since the batch loop last looked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Partitions this process was given.
    pub assigned: Vec<Key>,
    /// Partitions taken from it; `true` when lost (no graceful release).
    pub revoked: Vec<(Key, bool)>,
}

#[derive(Default)]
struct State {
    changes: Changes,
    /// Revoked partitions the group waits for the loop to release.
    releasing: BTreeSet<Key>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    released: Condvar,
    /// Set when the process leaves: revokes no longer wait.
    leaving: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn keys(tpl: &TopicPartitionList) -> Vec<Key> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

/// The membership consumer's context: it records what the group assigns and revokes.
struct GroupContext {
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let revoked = keys(tpl);
        let lost = consumer.assignment_lost();
        let mut state = self.shared.lock();
        // Given and taken again before the loop looked: nothing to release.
        state.changes.assigned.retain(|k| !revoked.contains(k));
        state.changes.revoked.extend(revoked.iter().map(|k| (k.clone(), lost)));
        if self.shared.leaving.load(Ordering::SeqCst) {
            tracing::info!("leaving the consumer group: {} go to the other processes", shown(&revoked));
            return;
        }
        if lost {
            tracing::warn!("the consumer group took {} from this process without a release (it was away longer than the session timeout)", shown(&revoked));
            return;
        }
        state.releasing.extend(revoked.iter().cloned());
        tracing::info!("the consumer group moves {} to another process: finishing their batch in flight and checkpoint first", shown(&revoked));
        let deadline = Instant::now() + RELEASE_WAIT;
        while revoked.iter().any(|k| state.releasing.contains(k)) && !self.shared.leaving.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!("{} not released within {} s; the group moves them anyway (their new owner fences this process)", shown(&revoked), RELEASE_WAIT.as_secs());
                break;
            }
            state = self.shared.released.wait_timeout(state, (deadline - now).min(Duration::from_millis(200))).map(|(s, _)| s).unwrap_or_else(|p| p.into_inner().0);
        }
        for k in &revoked {
            state.releasing.remove(k);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else { return };
        if tpl.count() == 0 {
            return;
        }
        // This consumer only holds the membership; the source's consumer reads the records.
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!("pausing the membership consumer's new partitions failed ({e}); what it fetches is dropped");
        }
        let assigned = keys(tpl);
        tracing::info!("the consumer group gives this process {}", shown(&assigned));
        self.shared.lock().changes.assigned.extend(assigned);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!("committing the consumer group's offsets failed ({e}); they serve lag tools only, the checkpoints keep the tasks' positions");
        }
    }
}

fn shown(keys: &[Key]) -> String {
    keys.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(", ")
}

/// This process's membership of the pipeline's consumer group.
pub struct Membership {
    consumer: Arc<BaseConsumer<GroupContext>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Membership {
    /// Join `group_id` for `topics` with `properties` (the pipeline's `[kafka]` table and
    /// sluice's settings), and serve the group's events on a thread of its own.
    pub fn join(group_id: &str, topics: &[String], properties: &[(String, String)]) -> Result<Self, SourceError> {
        let mut config = ClientConfig::new();
        config.set("partition.assignment.strategy", "cooperative-sticky");
        for (k, v) in properties {
            config.set(k, v);
        }
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // It reads nothing: keep what it may fetch before a pause small.
            .set("queued.max.messages.kbytes", "64");
        let shared = Arc::new(Shared::default());
        let consumer: BaseConsumer<GroupContext> = config.create_with_context(GroupContext { shared: shared.clone() }).map_err(SourceError::Config)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(failed(format!("joining consumer group `{group_id}`")))?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("sluice-group".into())
            .spawn({
                let (consumer, stop) = (consumer.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::SeqCst) {
                        // Records are not wanted (the partitions are paused); errors are
                        // librdkafka's to retry, and are logged by it.
                        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                            tracing::debug!("consumer group: {e}");
                        }
                    }
                }
            })
            .expect("spawn the consumer group thread");
        Ok(Self { consumer, shared, stop, thread: Some(thread) })
    }

    /// What the group assigned and revoked since the last call.
    pub fn changes(&self) -> Changes {
        std::mem::take(&mut self.shared.lock().changes)
    }

    /// The loop is done with these revoked partitions (batch finished and checkpointed):
    /// the group may move them.
    pub fn released(&self, keys: &[Key]) {
        let mut state = self.shared.lock();
        for k in keys {
            state.releasing.remove(k);
        }
        drop(state);
        self.shared.released.notify_all();
    }

    /// How many partitions `topics` have together (what the group shares).
    pub fn partitions(&self, topics: &[String]) -> Result<usize, SourceError> {
        let mut total = 0;
        for topic in topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(failed(format!("reading the partitions of `{topic}`")))?;
            total += metadata.topics().iter().filter(|t| t.name() == topic).map(|t| t.partitions().len()).sum::<usize>();
        }
        Ok(total)
    }

    /// Commit the group's offsets to the ends of `ranges` (for lag tools), asynchronously.
    pub fn commit(&self, ranges: &[OffsetRange]) -> Result<(), SourceError> {
        super::commit_group_offsets(self.consumer.as_ref(), ranges)
    }
}

impl Drop for Membership {
    /// Leave the group: partitions still held are revoked without waiting (the loop has
    /// finished with them, or is gone).
    fn drop(&mut self) {
        self.shared.leaving.store(true, Ordering::SeqCst);
        self.shared.released.notify_all();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.consumer.unsubscribe();
    }
}
