//! The Kafka sink: at least once, or exactly once with Kafka transactions and a marker of
//! the last committed batch.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_sdk::is_record_schema;

use super::{json_lines, Sink, SinkError, ACK_TIMEOUT};
use crate::config::Delivery;
use crate::kafka::{DeliveryTracker, Loader, Outgoing, SourceError};

/// Writes output rows to a Kafka topic. Record-schema output keeps its key, value and
/// headers; other output is written one JSON row per record, without a key.
///
/// At least once by default: every record of a batch is acknowledged by the brokers before
/// the batch's checkpoint is written, so a crash in between repeats the batch.
///
/// Exactly once with [`Delivery::ExactlyOnce`]: one transactional producer, and batch N's
/// records are written in one transaction together with a marker of batch N: an offset
/// commit of `N + 1` (metadata `sluice batch N`) by the consumer group named like the
/// transactional id, on partition 0 of the output topic. Opening the sink fences any older
/// producer with the same id and aborts its open transaction, then reads the marker: the
/// newest batch whose transaction committed. A batch the pipeline replays after a crash is
/// written again only if its transaction did not commit, so `read_committed` consumers see
/// each record once.
pub struct KafkaSink {
    loader: Loader,
    topic: String,
    transactions: Option<Transactions>,
    /// A consumer-group task's sink: a newer producer with its transactional id is the
    /// task's new owner, and the fencing is a hand-over, not a misconfiguration.
    task: bool,
}

/// The exactly-once state of a [`KafkaSink`].
struct Transactions {
    /// The producer's `transactional.id`, also the marker's consumer group.
    id: String,
    /// A client of the marker group: its group metadata goes into each transaction, and it
    /// reads the marker when the sink opens.
    marker: BaseConsumer,
    /// The newest batch whose transaction committed.
    committed: Option<u64>,
    /// The batch whose transaction is open (written, not yet committed).
    open: Option<u64>,
}

/// How long one transactional request (init, begin, offsets, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request is tried again while librdkafka says it may succeed (brokers away).
const TXN_RETRY_FOR: Duration = Duration::from_secs(300);

/// The metadata of a batch marker: sluice reads back only markers it wrote.
const MARKER_PREFIX: &str = "sluice batch ";

impl KafkaSink {
    /// Connect with the pipeline's librdkafka table (consumer-only fetch defaults left out).
    /// Exactly once, this also fences older producers with the same transactional id and
    /// reads which batch committed last.
    pub fn open(topic: &str, delivery: &Delivery, kafka: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        let fail = |error| SinkError::Kafka { topic: topic.to_string(), batch_id: 0, error };
        let properties = crate::kafka::producer_properties(kafka);
        let Delivery::ExactlyOnce { transactional_id: id } = delivery else {
            let loader = Loader::with_properties(properties.iter().copied()).map_err(fail)?;
            check_topic(&loader, topic)?;
            return Ok(Self { loader, topic: topic.to_string(), transactions: None, task: false });
        };
        let loader = Loader::with_properties(properties.iter().copied().chain([("transactional.id", id.as_str())])).map_err(fail)?;
        check_topic(&loader, topic)?;
        let mut marker = ClientConfig::new();
        for (k, v) in &properties {
            marker.set(*k, *v);
        }
        let marker: BaseConsumer = marker
            .set("group.id", id)
            .set("enable.auto.commit", "false")
            // Committed offsets of open transactions are not read (KIP-447's require_stable).
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| fail(SourceError::Config(e)))?;
        let mut sink = Self { loader, topic: topic.to_string(), transactions: Some(Transactions { id: id.clone(), marker, committed: None, open: None }), task: false };
        sink.transactional(0, "starting transactions (this fences an older producer with the same id and aborts its open transaction)", |p| p.init_transactions(TXN_TIMEOUT))?;
        let committed = sink.read_marker()?;
        if let Some(t) = &mut sink.transactions {
            t.committed = committed;
        }
        tracing::info!("kafka sink `{topic}`: exactly once with transactional.id `{id}`; newest committed batch: {}", committed.map_or("none".into(), |b| b.to_string()));
        Ok(sink)
    }

    /// [`KafkaSink::open`] for one task of a consumer-group run: exactly once with the
    /// transactional id `<id>-<topic>-<partition>`, so that each task has its own
    /// transactions and batch marker, and the task's next owner fences this sink (its
    /// writes then fail as [`SinkError::Fenced`]).
    pub fn open_task(topic: &str, delivery: &Delivery, kafka: &BTreeMap<String, String>, task: &super::SinkTask) -> Result<Self, SinkError> {
        let delivery = match delivery {
            Delivery::ExactlyOnce { transactional_id } => Delivery::ExactlyOnce { transactional_id: format!("{transactional_id}-{}-{}", task.topic, task.partition) },
            other => other.clone(),
        };
        let mut sink = Self::open(topic, &delivery, kafka)?;
        sink.task = true;
        Ok(sink)
    }

    /// The newest batch whose transaction committed, from the marker group's offset.
    fn read_marker(&self) -> Result<Option<u64>, SinkError> {
        let t = self.transactions.as_ref().expect("exactly once");
        let mut asked = TopicPartitionList::new();
        asked.add_partition(&self.topic, 0);
        let started = std::time::Instant::now();
        let answer = loop {
            match t.marker.committed_offsets(asked.clone(), TXN_TIMEOUT) {
                Ok(answer) => break answer,
                Err(e) if crate::kafka::is_transient(&e) && started.elapsed() < TXN_RETRY_FOR => {
                    tracing::warn!("kafka sink `{}`: reading the batch marker of group `{}`: {e}; trying again", self.topic, t.id);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(error) => return Err(self.txn_error(0, "reading the batch marker", error.to_string())),
            }
        };
        let Some(element) = answer.elements().into_iter().next() else { return Ok(None) };
        let Offset::Offset(next) = element.offset() else { return Ok(None) };
        match element.metadata().strip_prefix(MARKER_PREFIX).and_then(|b| b.parse::<u64>().ok()) {
            Some(batch) if next >= 1 && batch == next as u64 - 1 => Ok(Some(batch)),
            _ => Err(self.txn_error(
                0,
                "reading the batch marker",
                format!(
                    "consumer group `{}` has offset {next} (metadata `{}`) on `{}` partition 0, which sluice did not write; this group is sluice's record of committed batches, so give [sink] a `transactionalId` that no other client uses",
                    t.id,
                    element.metadata(),
                    self.topic
                ),
            )),
        }
    }

    /// Run a transactional request, trying again while librdkafka says it may succeed.
    fn transactional(&self, batch_id: u64, what: &str, request: impl Fn(&BaseProducer<DeliveryTracker>) -> rdkafka::error::KafkaResult<()>) -> Result<(), SinkError> {
        let started = std::time::Instant::now();
        loop {
            match request(self.loader.producer()) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && started.elapsed() < TXN_RETRY_FOR => {
                    tracing::warn!("kafka sink `{}`: batch {batch_id}: {what}: {e}; trying again", self.topic);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(self.fatal(batch_id, what).unwrap_or_else(|| self.txn_error(batch_id, what, e.to_string()))),
            }
        }
    }

    /// The producer's fatal error, if it has one: with transactions, another producer with
    /// the same transactional id fenced it.
    fn fatal(&self, batch_id: u64, what: &str) -> Option<SinkError> {
        let (code, reason) = self.loader.producer().client().fatal_error()?;
        let t = self.transactions.as_ref()?;
        if self.task {
            tracing::warn!("kafka sink `{}`: {reason} ({code:?}): the task's new owner opened transactional id `{}`", self.topic, t.id);
            return Some(SinkError::Fenced { target: format!("kafka topic `{}`", self.topic), batch_id });
        }
        Some(self.txn_error(
            batch_id,
            what,
            format!(
                "{reason} ({code:?}). Another producer with transactional.id `{}` has taken over (is a second process running this pipeline?); this one is fenced and stops: run one process per pipeline, or give each its own `transactionalId`",
                t.id
            ),
        ))
    }

    fn txn_error(&self, batch_id: u64, what: &str, error: String) -> SinkError {
        SinkError::Transaction { topic: self.topic.clone(), batch_id, what: what.to_string(), error }
    }
}

/// An error that says so if `topic` does not exist (on a broker that creates topics when
/// asked for their metadata, it then exists); an error too if the brokers cannot be reached.
fn check_topic(loader: &Loader, topic: &str) -> Result<(), SinkError> {
    let metadata = loader.producer().client().fetch_metadata(Some(topic), TXN_TIMEOUT).map_err(|error| SinkError::Kafka {
        topic: topic.to_string(),
        batch_id: 0,
        error: SourceError::Kafka { what: format!("reading metadata of topic `{topic}`"), error },
    })?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
        _ => Err(SinkError::Open {
            target: format!("kafka topic `{topic}`"),
            error: std::io::Error::other("the topic does not exist on the brokers; create it, or fix the topic in the pipeline file"),
        }),
    }
}

/// Test hook for the crash suite: with `SLUICE_KILL_AT=POINT:N` the process kills itself
/// (SIGKILL) at `POINT` of batch N: `sink-commit`, after the batch's records and marker are
/// sent and before its transaction commits, or `sink-committed`, after the commit and
/// before the batch's checkpoint: the two moments an exactly-once sink must recover from
/// without losing or repeating output.
fn kill_point(point: &str, batch_id: u64) {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let text = std::env::var("SLUICE_KILL_AT").ok()?;
        let (point, batch) = text.rsplit_once(':')?;
        Some((point.to_string(), batch.parse().ok()?))
    });
    if at.as_ref().is_some_and(|(p, b)| p == point && *b == batch_id) {
        tracing::warn!("SLUICE_KILL_AT: killing this process at {point} of batch {batch_id}");
        // SAFETY: kill(2) on our own PID has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        if let Some(open) = self.transactions.as_ref().map(|t| t.open) {
            if let Some(earlier) = open {
                // A batch written but never committed (its commit failed): drop it.
                self.transactional(earlier, "aborting the uncommitted transaction", |p| p.abort_transaction(TXN_TIMEOUT))?;
                let _ = self.loader.check_deliveries();
            }
            self.transactional(batch_id, "beginning the transaction", |p| p.begin_transaction())?;
            self.transactions.as_mut().expect("exactly once").open = Some(batch_id);
        }
        let fail = |error| self.fatal(batch_id, "sending the batch's records").unwrap_or_else(|| SinkError::Kafka { topic: self.topic.clone(), batch_id, error });
        for b in batches {
            if is_record_schema(b.schema_ref()) {
                let batch = sluice_sdk::Batch::new(b.clone()).expect("checked to be the record schema");
                for r in batch.records() {
                    let headers: Vec<(&str, Option<&[u8]>)> = r.headers().collect();
                    let out = Outgoing { partition: None, key: r.key(), value: r.value(), headers: &headers };
                    self.loader.send(&self.topic, out).map_err(fail)?;
                }
            } else {
                let rows = json_lines(b).map_err(|error| SinkError::Json { target: format!("kafka topic `{}`", self.topic), batch_id, error })?;
                for line in rows.iter() {
                    let out = Outgoing { partition: None, key: None, value: Some(line), headers: &[] };
                    self.loader.send(&self.topic, out).map_err(fail)?;
                }
            }
        }
        if self.transactions.is_some() {
            // Committing the transaction waits for the records.
            return Ok(());
        }
        self.loader.flush(ACK_TIMEOUT).map_err(fail)
    }

    fn commit(&mut self, batch_id: u64) -> Result<(), SinkError> {
        let Some(t) = &self.transactions else { return Ok(()) };
        if t.open != Some(batch_id) {
            return Err(self.txn_error(batch_id, "committing", "commit without a write of this batch (a bug in the pipeline loop)".into()));
        }
        let mut marker = TopicPartitionList::new();
        marker.add_partition_offset(&self.topic, 0, Offset::Offset(batch_id as i64 + 1)).expect("a valid offset");
        marker.elements_for_topic(&self.topic)[0].set_metadata(format!("{MARKER_PREFIX}{batch_id}"));
        let group = t.marker.group_metadata().ok_or_else(|| self.txn_error(batch_id, "committing", "the marker group has no metadata".into()))?;
        self.transactional(batch_id, "adding the batch marker to the transaction", |p| p.send_offsets_to_transaction(&marker, &group, TXN_TIMEOUT))?;
        kill_point("sink-commit", batch_id);
        let committed = self.transactional(batch_id, "committing the transaction", |p| p.commit_transaction(TXN_TIMEOUT));
        let delivered = self.loader.check_deliveries();
        committed?;
        delivered.map_err(|error| SinkError::Kafka { topic: self.topic.clone(), batch_id, error })?;
        let t = self.transactions.as_mut().expect("exactly once");
        t.open = None;
        t.committed = Some(batch_id);
        kill_point("sink-committed", batch_id);
        Ok(())
    }

    fn is_committed(&self, batch_id: u64) -> bool {
        self.transactions.as_ref().and_then(|t| t.committed).is_some_and(|c| batch_id <= c)
    }

    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        Ok(self.transactions.as_ref().and_then(|t| t.committed))
    }
}
