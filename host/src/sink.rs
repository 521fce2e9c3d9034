//! Sinks: where a batch's output goes. Output is named by batch id, so re-running a batch
//! replaces what it wrote instead of adding to it; file sinks keep a manifest of committed
//! batches and never write a committed batch twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sluice_sdk::is_record_schema;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::{Delivery, ParquetCompression, Sink as SinkConfig};
use crate::kafka::{DeliveryTracker, Loader, Outgoing, SourceError, TUNED_DEFAULTS};
use crate::offline::json_lines;
use crate::store::{Location, StoreError};

/// How long a Kafka sink waits for the brokers to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// A sink that could not take a batch; the batch's offsets are not committed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing failed.
    #[error("sink {target}: cannot write batch {batch_id}: {error}")]
    Write {
        /// Where.
        target: String,
        /// Which batch.
        batch_id: u64,
        /// The OS error.
        error: std::io::Error,
    },
    /// The Kafka sink could not deliver a batch.
    #[error("sink kafka topic `{topic}`: batch {batch_id}: {error}")]
    Kafka {
        /// Output topic.
        topic: String,
        /// Which batch.
        batch_id: u64,
        /// What went wrong.
        error: SourceError,
    },
    /// A transactional request of an exactly-once Kafka sink failed.
    #[error("sink kafka topic `{topic}`: batch {batch_id}: {what}: {error}")]
    Transaction {
        /// Output topic.
        topic: String,
        /// Which batch (0 while opening).
        batch_id: u64,
        /// What was being done.
        what: String,
        /// What went wrong, and what to do.
        error: String,
    },
    /// The object store refused a write, or the output could not be encoded.
    #[error("sink {target}: cannot write batch {batch_id}: {error}")]
    Store {
        /// Where.
        target: String,
        /// Which batch.
        batch_id: u64,
        /// What the store or the encoder said.
        error: String,
    },
    /// The sink cannot be opened.
    #[error("sink {target}: {error}")]
    Open {
        /// Where.
        target: String,
        /// The OS error.
        error: std::io::Error,
    },
}

impl SinkError {
    /// A location that cannot be opened or prepared.
    fn opening(e: StoreError) -> Self {
        SinkError::Open { target: e.location, error: std::io::Error::other(format!("{}: {}", e.what, e.reason)) }
    }

    /// A store operation of batch `batch_id` that failed.
    fn storing(batch_id: u64, e: StoreError) -> Self {
        SinkError::Store { target: e.location, batch_id, error: format!("{}: {}", e.what, e.reason) }
    }
}

/// Takes the output of each batch.
pub trait Sink {
    /// Write the output of batch `batch_id`. Called once per batch, in order; a batch that
    /// is re-run is written again under the same id and replaces the earlier output.
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError>;

    /// Make batch `batch_id`'s output final. A sink with a manifest records the batch there
    /// and only then shows its files to readers; others have nothing left to do.
    fn commit(&mut self, _batch_id: u64) -> Result<(), SinkError> {
        Ok(())
    }

    /// True when batch `batch_id` is already committed here, so a batch that is replayed
    /// after a failure (to rebuild plugin state) must not be written again.
    fn is_committed(&self, _batch_id: u64) -> bool {
        false
    }

    /// The highest batch id this sink already holds output for, if it keeps output by
    /// batch id. A new run numbers its batches after it, so it never replaces output of
    /// an earlier run. An error when the sink cannot be listed: starting at batch 0
    /// instead could replace earlier output.
    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        Ok(None)
    }
}

/// JSON lines to standard output, one row a line. A batch that is re-run is printed again
/// (at least once).
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let text = jsonl_bytes(batches);
        let mut out = std::io::stdout().lock();
        out.write_all(&text)
            .and_then(|()| out.flush())
            .map_err(|error| SinkError::Write { target: "stdout".into(), batch_id, error })
    }
}

/// Rows as JSON lines.
fn jsonl_bytes(batches: &[RecordBatch]) -> Vec<u8> {
    let mut text = Vec::new();
    for b in batches {
        for line in json_lines(b) {
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
        }
    }
    text
}
/// Open the sink a pipeline names; `kafka` is the pipeline's librdkafka table.
pub fn open(config: &SinkConfig, kafka: &BTreeMap<String, String>) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match config {
        SinkConfig::Jsonl { path } if path == "-" => Box::new(StdoutSink),
        SinkConfig::Jsonl { path } => Box::new(FileSink::open(path, FileFormat::Jsonl, &BTreeMap::new())?),
        SinkConfig::Kafka { topic, delivery } => Box::new(KafkaSink::open(topic, delivery, kafka)?),
        SinkConfig::Parquet { path, compression, options } => Box::new(FileSink::open(path, FileFormat::Parquet(*compression), options)?),
    })
}

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
        let properties: Vec<(&str, &str)> =
            kafka.iter().filter(|(k, _)| !TUNED_DEFAULTS.iter().any(|(d, _)| d == k)).map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let Delivery::ExactlyOnce { transactional_id: id } = delivery else {
            let loader = Loader::with_properties(properties.iter().copied()).map_err(fail)?;
            check_topic(&loader, topic)?;
            return Ok(Self { loader, topic: topic.to_string(), transactions: None });
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
        let mut sink = Self { loader, topic: topic.to_string(), transactions: Some(Transactions { id: id.clone(), marker, committed: None, open: None }) };
        sink.transactional(0, "starting transactions (this fences an older producer with the same id and aborts its open transaction)", |p| p.init_transactions(TXN_TIMEOUT))?;
        let committed = sink.read_marker()?;
        if let Some(t) = &mut sink.transactions {
            t.committed = committed;
        }
        tracing::info!(
            "kafka sink `{topic}`: exactly once with transactional.id `{id}`; newest committed batch: {}",
            committed.map_or("none".into(), |b| b.to_string())
        );
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
                for line in json_lines(b) {
                    let out = Outgoing { partition: None, key: None, value: Some(line.as_bytes()), headers: &[] };
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

/// How a [`FileSink`] encodes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One Parquet file per batch.
    Parquet(ParquetCompression),
    /// One JSON-lines file per batch.
    Jsonl,
}

impl FileFormat {
    fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet(_) => "parquet",
            FileFormat::Jsonl => "jsonl",
        }
    }
}

/// Folder of a file sink where a batch's file waits until the batch is committed.
pub const STAGING_DIR: &str = "_sluice_staging";
/// Folder of a file sink that lists the committed batches, one entry per batch.
pub const MANIFEST_DIR: &str = "_sluice_manifest";

/// One manifest entry: a committed batch and the files it made visible.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// Batch id.
    pub batch_id: u64,
    /// Data files of the batch (none when it produced no rows), relative to the sink.
    pub files: Vec<String>,
    /// Rows in those files.
    pub rows: u64,
}

/// Files on a local directory or any object store, one per batch (`batch-<id>.parquet` or
/// `.jsonl`), exactly once: a batch's file is uploaded whole to [`STAGING_DIR`], and on
/// commit its entry is written to [`MANIFEST_DIR`] (the commit point) and the file moved
/// next to the others. Files of a batch that fails before its commit never appear among
/// them; a committed batch is never written again. A commit interrupted between its entry
/// and the move is finished when the sink is opened again.
pub struct FileSink {
    location: Location,
    format: FileFormat,
    committed: BTreeSet<u64>,
    staged: Option<(u64, u64)>,
}

impl FileSink {
    /// Open `location` (a local directory, created if missing, or an object-store URL
    /// configured by `options`), finish an interrupted commit and drop leftovers of
    /// batches that never committed.
    pub fn open(location: &str, format: FileFormat, options: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        Self::at(Location::open(location, options).map_err(SinkError::opening)?, format)
    }

    /// [`FileSink::open`] on a location the caller opened.
    pub fn at(location: Location, format: FileFormat) -> Result<Self, SinkError> {
        let open_error = SinkError::opening;
        let mut sink = Self { location, format, committed: BTreeSet::new(), staged: None };
        for (name, _) in sink.location.list(MANIFEST_DIR).map_err(open_error)? {
            if let Some(id) = name.strip_prefix("batch-").and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()) {
                sink.committed.insert(id);
            }
        }
        if let Some(&last) = sink.committed.last() {
            let entry = sink.manifest_entry(last).map_err(open_error)?;
            let present: BTreeSet<String> = sink.location.list("").map_err(open_error)?.into_iter().map(|(n, _)| n).collect();
            for file in entry.files.iter().filter(|f| !present.contains(*f)) {
                sink.location.rename(&format!("{STAGING_DIR}/{file}"), file).map_err(open_error)?;
            }
        }
        for (name, _) in sink.location.list(STAGING_DIR).map_err(open_error)? {
            sink.location.delete(&format!("{STAGING_DIR}/{name}")).map_err(open_error)?;
        }
        Ok(sink)
    }

    /// The name of batch `batch_id`'s file.
    pub fn batch_file(&self, batch_id: u64) -> String {
        format!("batch-{batch_id:012}.{}", self.format.extension())
    }

    fn manifest_name(batch_id: u64) -> String {
        format!("{MANIFEST_DIR}/batch-{batch_id:012}.json")
    }

    /// The manifest entry of a committed batch.
    pub fn manifest_entry(&self, batch_id: u64) -> Result<ManifestEntry, StoreError> {
        let name = Self::manifest_name(batch_id);
        let bytes = self.location.get(&name)?.ok_or_else(|| StoreError {
            location: self.location.shown().to_string(),
            what: format!("cannot read {name}"),
            reason: "it disappeared".into(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError {
            location: self.location.shown().to_string(),
            what: format!("cannot read {name}"),
            reason: format!("not a manifest entry: {e}"),
        })
    }

    /// The batches committed so far, in order.
    pub fn committed_batches(&self) -> impl Iterator<Item = u64> + '_ {
        self.committed.iter().copied()
    }

    /// Encode `batches` (one schema) as one Parquet file.
    pub fn encode_parquet(batches: &[RecordBatch], compression: ParquetCompression) -> Result<Vec<u8>, String> {
        let schema = batches.first().map(|b| b.schema()).ok_or("no batches to encode")?;
        let codec = match compression {
            ParquetCompression::Snappy => Compression::SNAPPY,
            ParquetCompression::Zstd => Compression::ZSTD(ZstdLevel::default()),
            ParquetCompression::None => Compression::UNCOMPRESSED,
        };
        let properties = WriterProperties::builder().set_compression(codec).build();
        let mut writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(properties)).map_err(|e| e.to_string())?;
        for b in batches {
            if b.schema() != schema {
                return Err(format!("the plugin chain produced batches with different schemas: {} and {}", schema, b.schema()));
            }
            writer.write(b).map_err(|e| e.to_string())?;
        }
        writer.into_inner().map_err(|e| e.to_string())
    }
}

impl Sink for FileSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let fail = |error: String| SinkError::Store { target: self.location.shown().to_string(), batch_id, error };
        let batches: Vec<RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).cloned().collect();
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        self.staged = Some((batch_id, rows));
        if batches.is_empty() {
            return Ok(());
        }
        let bytes = match self.format {
            FileFormat::Parquet(compression) => Self::encode_parquet(&batches, compression).map_err(fail)?,
            FileFormat::Jsonl => jsonl_bytes(&batches),
        };
        let staged = format!("{STAGING_DIR}/{}", self.batch_file(batch_id));
        self.location.put(&staged, bytes).map_err(|e| SinkError::storing(batch_id, e))
    }

    fn commit(&mut self, batch_id: u64) -> Result<(), SinkError> {
        let fail = |e| SinkError::storing(batch_id, e);
        let rows = match self.staged.take() {
            Some((id, rows)) if id == batch_id => rows,
            _ => {
                return Err(SinkError::Store {
                    target: self.location.shown().to_string(),
                    batch_id,
                    error: "commit without a write of this batch (a bug in the pipeline loop)".into(),
                })
            }
        };
        let file = self.batch_file(batch_id);
        let entry = ManifestEntry { batch_id, files: if rows > 0 { vec![file.clone()] } else { Vec::new() }, rows };
        let json = serde_json::to_vec(&entry).expect("a manifest entry serializes");
        self.location.put(&Self::manifest_name(batch_id), json).map_err(fail)?;
        self.committed.insert(batch_id);
        if rows > 0 {
            self.location.rename(&format!("{STAGING_DIR}/{file}"), &file).map_err(fail)?;
        }
        Ok(())
    }

    fn is_committed(&self, batch_id: u64) -> bool {
        self.committed.contains(&batch_id)
    }

    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        Ok(self.committed.last().copied())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    fn rows(names: &[&str], counts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("campaign_id", DataType::Utf8, false), Field::new("clicks", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(names.to_vec())), Arc::new(Int64Array::from(counts.to_vec()))]).unwrap()
    }

    fn read(sink: &FileSink, batch_id: u64) -> Vec<RecordBatch> {
        let bytes = sink.location.get(&sink.batch_file(batch_id)).unwrap().expect("the batch file is visible");
        ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap().build().unwrap().collect::<Result<_, _>>().unwrap()
    }

    fn parquet(location: &str) -> FileSink {
        FileSink::open(location, FileFormat::Parquet(ParquetCompression::Snappy), &BTreeMap::new()).unwrap()
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn every_compression_round_trips_and_empty_batches_commit_without_a_file() {
        for compression in [ParquetCompression::Snappy, ParquetCompression::Zstd, ParquetCompression::None] {
            let mut sink = FileSink::open("memory://", FileFormat::Parquet(compression), &BTreeMap::new()).unwrap();
            assert_eq!(sink.last_batch_id().unwrap(), None);
            sink.write(3, &[rows(&["a", "b"], &[1, 2]), rows(&["c"], &[3])]).unwrap();
            sink.commit(3).unwrap();
            sink.write(4, &[rows(&[], &[])]).unwrap();
            sink.commit(4).unwrap();
            assert_eq!(read(&sink, 3), vec![rows(&["a", "b", "c"], &[1, 2, 3])], "{compression:?}");
            assert_eq!(sink.location.get(&sink.batch_file(4)).unwrap(), None, "an empty batch writes no file");
            assert_eq!(sink.manifest_entry(4).unwrap(), ManifestEntry { batch_id: 4, files: vec![], rows: 0 });
            assert_eq!(sink.last_batch_id().unwrap(), Some(4));
            assert!(sink.is_committed(3) && sink.is_committed(4) && !sink.is_committed(5));
        }
    }

    #[test]
    fn a_batch_is_visible_only_after_its_commit_and_an_uncommitted_one_is_dropped_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/out");
        let mut sink = parquet(out.to_str().unwrap());
        sink.write(12, &[rows(&["x"], &[1])]).unwrap();
        assert_eq!(names(&out), vec![STAGING_DIR], "nothing visible before the commit");
        sink.commit(12).unwrap();
        sink.write(13, &[rows(&["y"], &[2])]).unwrap();
        drop(sink); // a crash before batch 13 commits
        let again = parquet(&format!("file://{}", out.display()));
        assert_eq!(again.last_batch_id().unwrap(), Some(12));
        assert_eq!(names(&out), vec![MANIFEST_DIR, STAGING_DIR, "batch-000000000012.parquet"]);
        assert_eq!(names(&out.join(STAGING_DIR)), Vec::<String>::new(), "the uncommitted batch's file is gone");
        assert_eq!(read(&again, 12), vec![rows(&["x"], &[1])]);
    }

    #[test]
    fn a_commit_interrupted_after_its_manifest_entry_is_finished_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::open(dir.path().to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap();
        sink.write(0, &[rows(&["x"], &[1])]).unwrap();
        // What commit does, stopped between the entry and the move.
        let entry = ManifestEntry { batch_id: 0, files: vec![sink.batch_file(0)], rows: 1 };
        sink.location.put(&FileSink::manifest_name(0), serde_json::to_vec(&entry).unwrap()).unwrap();
        drop(sink);
        let again = FileSink::open(dir.path().to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap();
        assert!(again.is_committed(0));
        let text = std::fs::read_to_string(dir.path().join("batch-000000000000.jsonl")).unwrap();
        assert_eq!(text, "{\"campaign_id\":\"x\",\"clicks\":1}\n");
    }

    #[test]
    fn a_commit_without_a_write_of_that_batch_is_refused() {
        let mut sink = parquet("memory://");
        sink.write(1, &[rows(&["x"], &[1])]).unwrap();
        let error = sink.commit(2).unwrap_err().to_string();
        assert!(error.contains("commit without a write"), "{error}");
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let error = parquet_err(file.join("out").to_str().unwrap());
        assert!(error.contains("cannot create the directory"), "{error}");
    }

    fn parquet_err(location: &str) -> String {
        FileSink::open(location, FileFormat::Parquet(ParquetCompression::Snappy), &BTreeMap::new()).err().unwrap().to_string()
    }
}
