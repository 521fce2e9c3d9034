//! A consumer group's repartition topic (`[source.repartition]`), for input that is not
//! keyed by what the aggregate groups by.
//!
//! The steps before the aggregate run in the tasks of the source partitions; their output
//! is keyed anew ([`KeyStage`]) and produced to the repartition topic ([`RepartitionSink`]),
//! each record tagged with where it comes from: the source topic and partition, the
//! source task's batch id and the record's place in that batch's output. The aggregate
//! runs in the tasks of the repartition topic's partitions, so one task sees every record
//! of a key.
//!
//! The first stage is at least once: a batch replayed after a crash (or run by a new
//! owner while a fenced one still produces) is produced again. The second stage counts
//! each record once: a source task's batches are produced in order, one after the other,
//! by an idempotent producer, so in each repartition partition the tags of one source
//! partition only go up, except where a batch was produced again; a repartition task keeps
//! the highest tag it counted per source partition in its checkpoint ([`Counted`]) and
//! drops any record at or below it. A replayed batch's output is the same records in the
//! same order (its plan is recorded, the steps are deterministic), so what it drops is
//! exactly what was counted before.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::BinaryBuilder;
use arrow_array::{ArrayRef, BooleanArray, RecordBatch};
use arrow_schema::SchemaRef;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::Producer as _;
use rdkafka::ClientConfig;
use serde_json::Value;
use sluice_sdk::{columns, record_schema, Batch, Context, Finished, PluginKind, RecordError};

use crate::chain::Stage;
use crate::checkpoint::{PluginIdentity, UpstreamMark};
use crate::kafka::{Loader, Outgoing, SourceError};
use crate::runtime::CallError;
use crate::sink::{Sink, SinkError};

/// Header: the source topic of a repartitioned record.
pub const SOURCE_TOPIC: &str = "sluice.source.topic";
/// Header: its source partition.
pub const SOURCE_PARTITION: &str = "sluice.source.partition";
/// Header: its source offset (for people and tools; counting uses batch and seq).
pub const SOURCE_OFFSET: &str = "sluice.source.offset";
/// Header: the source task's batch id.
pub const SOURCE_BATCH: &str = "sluice.source.batch";
/// Header: the record's place in that batch's output.
pub const SOURCE_SEQ: &str = "sluice.source.seq";

const TAGS: [&str; 5] = [SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, SOURCE_BATCH, SOURCE_SEQ];

/// The name the key step has in checkpoints, progress and dead letters.
pub const KEY_STEP: &str = "repartition-key";

/// The last step of a source task before the repartition topic: sets each record's key to
/// the value at a dotted path of its JSON value, or (without a path) keeps the key the
/// steps before it set. A record without a key is rejected (a dead letter), never sent to
/// a partition at random, where its key's task would not see it.
pub struct KeyStage {
    path: Option<String>,
    schema: SchemaRef,
}

impl KeyStage {
    /// Key by the JSON value at `path`, or by the key the records have.
    pub fn new(path: Option<String>) -> Self {
        Self { path, schema: record_schema() }
    }

    fn key_of(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let Some(path) = &self.path else {
            return key.map(<[u8]>::to_vec).ok_or_else(|| {
                "the record has no key, and source.repartition.key is not given: set the key in a step before the aggregate, or name the JSON field to key by in source.repartition.key".into()
            });
        };
        let value = value.ok_or_else(|| format!("the record has no value to read the repartition key `{path}` from"))?;
        let json: Value = sluice_sdk::json::parse(value).map_err(|e| format!("{e}; the repartition key `{path}` is read from the record's JSON value"))?;
        match sluice_sdk::json::lookup(&json, path) {
            None | Some(Value::Null) => Err(format!("the value has no `{path}` to key the record by for the repartition topic")),
            Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
            Some(other) => Ok(other.to_string().into_bytes()),
        }
    }
}

impl Stage for KeyStage {
    fn name(&self) -> &str {
        KEY_STEP
    }
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
    fn kind(&self) -> PluginKind {
        PluginKind::Transform
    }
    fn output_schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn process(&mut self, batch: &RecordBatch, _ctx: &Context) -> Result<Finished, CallError> {
        let bad = |message: String| CallError::Plugin { plugin: KEY_STEP.into(), call: "process", kind: sluice_sdk::ErrorKind::BatchFailed, message };
        let records = Batch::new(batch.clone()).map_err(|e| bad(e.to_string()))?;
        let mut keys = BinaryBuilder::new();
        let mut keep = Vec::with_capacity(records.len());
        let mut record_errors = Vec::new();
        for r in records.records() {
            match self.key_of(r.key(), r.value()) {
                Ok(key) => {
                    keys.append_value(key);
                    keep.push(true);
                }
                Err(reason) => {
                    keys.append_null();
                    keep.push(false);
                    record_errors.push(RecordError { row: r.index() as u32, reason });
                }
            }
        }
        let at = batch.schema().index_of(columns::KEY).map_err(|e| bad(e.to_string()))?;
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns[at] = Arc::new(keys.finish());
        let keyed = RecordBatch::try_new(batch.schema(), columns).map_err(|e| bad(e.to_string()))?;
        let kept = if record_errors.is_empty() { keyed } else { arrow_select::filter::filter_record_batch(&keyed, &BooleanArray::from(keep)).map_err(|e| bad(e.to_string()))? };
        Ok(Finished { batches: vec![kept], record_errors, watermark_ms: None, late_records: 0 })
    }
    fn identity(&self) -> PluginIdentity {
        PluginIdentity { name: KEY_STEP.into(), version: env!("CARGO_PKG_VERSION").into(), content_hash: String::new(), state_version: 0 }
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        Ok(Vec::new())
    }
    fn restore(&mut self, _state: &[u8], _state_version: u32) -> Result<(), CallError> {
        Ok(())
    }
    fn rebuild(&mut self) -> Result<(), CallError> {
        Ok(())
    }
}

/// The sink of a source task: its output, tagged, to the repartition topic, each record to
/// the partition of its key as Kafka's Java clients choose it (murmur2). Every record of
/// a batch is acknowledged before the batch's checkpoint (at least once; [`Counted`] makes
/// the second stage exactly once). The producer is idempotent, so a retried request cannot
/// land behind a later one and the tags of one source partition go up in every partition.
pub struct RepartitionSink {
    loader: Loader,
    topic: String,
    /// The source task's topic and partition, as header values.
    source_topic: String,
    source_partition: String,
}

impl RepartitionSink {
    /// Connect with the pipeline's librdkafka table for the task of `source_topic`
    /// partition `source_partition`.
    pub fn open(topic: &str, kafka: &BTreeMap<String, String>, source_topic: &str, source_partition: i32) -> Result<Self, SinkError> {
        let fail = |error| SinkError::Kafka { topic: topic.to_string(), batch_id: 0, error };
        let properties = crate::kafka::producer_properties(kafka);
        // Keys go to the partitions Kafka's Java clients (and Kafka Streams) pick for them,
        // unless the pipeline's [kafka] table names a partitioner.
        let partitioner = (!kafka.contains_key("partitioner")).then_some(("partitioner", "murmur2_random"));
        let loader = Loader::with_properties(partitioner.into_iter().chain(properties).chain([("enable.idempotence", "true")])).map_err(fail)?;
        Ok(Self { loader, topic: topic.to_string(), source_topic: source_topic.to_string(), source_partition: source_partition.to_string() })
    }
}

impl Sink for RepartitionSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let fail = |error| SinkError::Kafka { topic: self.topic.clone(), batch_id, error };
        let batch_text = batch_id.to_string();
        let mut seq = 0u64;
        for b in batches {
            let records = Batch::new(b.clone()).map_err(|e| SinkError::Store {
                target: format!("repartition topic `{}`", self.topic),
                batch_id,
                error: format!("the steps before the aggregate must output records (the record schema): {e}"),
            })?;
            for r in records.records() {
                let offset = r.offset().to_string();
                let seq_text = seq.to_string();
                let mut headers: Vec<(&str, Option<&[u8]>)> = r.headers().filter(|(k, _)| !TAGS.contains(k)).collect();
                headers.extend([
                    (SOURCE_TOPIC, Some(self.source_topic.as_bytes())),
                    (SOURCE_PARTITION, Some(self.source_partition.as_bytes())),
                    (SOURCE_OFFSET, Some(offset.as_bytes())),
                    (SOURCE_BATCH, Some(batch_text.as_bytes())),
                    (SOURCE_SEQ, Some(seq_text.as_bytes())),
                ]);
                let out = Outgoing { partition: None, key: r.key(), value: r.value(), headers: &headers };
                self.loader.send_at(&self.topic, out, r.timestamp()).map_err(fail)?;
                seq += 1;
            }
        }
        self.loader.flush(crate::sink::ACK_TIMEOUT).map_err(fail)?;
        kill_point(batch_id);
        Ok(())
    }
}

/// Test hook for the repartition suite: with `SLUICE_KILL_AT=repartition-produced:N` the
/// process kills itself (SIGKILL) once a source task's batch N is acknowledged by the
/// brokers and before its checkpoint, so that its records are in the repartition topic
/// and will be produced again by the replay.
fn kill_point(batch_id: u64) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("SLUICE_KILL_AT").ok()?.strip_prefix("repartition-produced:")?.parse().ok());
    if *at == Some(batch_id) {
        tracing::warn!("SLUICE_KILL_AT: killing this process after the repartition records of batch {batch_id} were acknowledged");
        // SAFETY: kill(2) on our own PID has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// What a repartition task counted: per source partition, the tag (source batch, seq) of
/// the last record. Kept in the task's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted(BTreeMap<(String, i32), (u64, u64)>);

/// What [`Counted::filter`] dropped and let through untagged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Records at or below what was counted: produced again by a replay.
    pub duplicates: usize,
    /// Records without sluice's tags (not written by a source task): counted as they come.
    pub untagged: usize,
}

impl Counted {
    /// From a checkpoint's marks.
    pub fn from_marks(marks: &[UpstreamMark]) -> Self {
        Self(marks.iter().map(|m| ((m.topic.clone(), m.partition), (m.batch_id, m.seq))).collect())
    }

    /// For a checkpoint.
    pub fn marks(&self) -> Vec<UpstreamMark> {
        self.0.iter().map(|((topic, partition), &(batch_id, seq))| UpstreamMark { topic: topic.clone(), partition: *partition, batch_id, seq }).collect()
    }

    /// The records of `batch` not counted yet, in order; what is new is counted.
    pub fn filter(&mut self, batch: RecordBatch) -> Result<(RecordBatch, Filtered), String> {
        if batch.num_rows() == 0 {
            return Ok((batch, Filtered::default()));
        }
        let records = Batch::new(batch.clone()).map_err(|e| e.to_string())?;
        let mut keep = Vec::with_capacity(records.len());
        let mut filtered = Filtered::default();
        for r in records.records() {
            let text = |name| r.header(name).flatten().and_then(|v| std::str::from_utf8(v).ok());
            let tag = (|| Some(((text(SOURCE_TOPIC)?.to_string(), text(SOURCE_PARTITION)?.parse().ok()?), (text(SOURCE_BATCH)?.parse().ok()?, text(SOURCE_SEQ)?.parse().ok()?))))();
            let new = match tag {
                None => {
                    filtered.untagged += 1;
                    true
                }
                Some((source, mark)) => match self.0.get_mut(&source) {
                    Some(last) if mark <= *last => false,
                    Some(last) => {
                        *last = mark;
                        true
                    }
                    None => {
                        self.0.insert(source, mark);
                        true
                    }
                },
            };
            if !new {
                filtered.duplicates += 1;
            }
            keep.push(new);
        }
        if filtered.duplicates == 0 {
            return Ok((batch, filtered));
        }
        let kept = arrow_select::filter::filter_record_batch(&batch, &BooleanArray::from(keep)).map_err(|e| e.to_string())?;
        Ok((kept, filtered))
    }
}

/// How long creating the repartition topic may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Make sure the repartition `topic` exists: when it does not, create it with as many
/// partitions as the largest of `sources` and as many replicas as that topic has.
pub fn ensure_topic(kafka: &BTreeMap<String, String>, topic: &str, sources: &[String]) -> Result<(), SourceError> {
    let properties = crate::kafka::producer_properties(kafka);
    let loader = Loader::with_properties(properties.iter().copied())?;
    let metadata = loader
        .producer()
        .client()
        .fetch_metadata(None, ADMIN_TIMEOUT)
        .map_err(|error| SourceError::Kafka { what: format!("reading the brokers' topics to check the repartition topic `{topic}`"), error })?;
    let found = |name: &str| metadata.topics().iter().find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
    if let Some(existing) = found(topic) {
        tracing::info!("repartition topic `{topic}`: {} partitions", existing.partitions().len());
        return Ok(());
    }
    let Some(like) = sources.iter().filter_map(|s| found(s)).max_by_key(|t| t.partitions().len()) else {
        return Err(SourceError::Topics(format!(
            "none of the source topics {sources:?} exists on the brokers, so the repartition topic `{topic}` cannot be sized after them: create the source topics first"
        )));
    };
    let partitions = like.partitions().len() as i32;
    let replicas = like.partitions().iter().map(|p| p.replicas().len()).max().unwrap_or(1).max(1) as i32;
    let mut config = ClientConfig::new();
    for (k, v) in &properties {
        config.set(*k, *v);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(SourceError::Config)?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    let io = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| SourceError::Topics(format!("cannot start the admin client's runtime: {e}")))?;
    let results = io
        .block_on(admin.create_topics([&new], &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT))))
        .map_err(|error| SourceError::Kafka { what: format!("creating the repartition topic `{topic}`"), error })?;
    for result in results {
        match result {
            Ok(_) => tracing::info!("repartition topic `{topic}` created with {partitions} partitions and {replicas} replicas (like `{}`)", like.name()),
            // Another process of the group created it first.
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(SourceError::Topics(format!(
                    "cannot create the repartition topic `{topic}` ({code}): create it yourself with {partitions} partitions (as many as `{}`), or give the client the right to create topics",
                    like.name()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
