//! Sinks: where a batch's output goes. Output is named by batch id, so re-running a batch
//! replaces what it wrote instead of adding to it; file sinks keep a manifest of committed
//! batches and never write a committed batch twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::RecordBatch;
use arrow_schema::ArrowError;
use serde_json::Value;
use sluice_sdk::json::{self, JsonRows};
use sluice_sdk::{columns, is_record_schema};

use crate::config::Sink as SinkConfig;
use crate::kafka::SourceError;
use crate::store::StoreError;

mod file;
mod kafka;

pub use file::{FileFormat, FileSink, ManifestEntry, SinkTask, MANIFEST_DIR, STAGING_DIR};
pub use kafka::KafkaSink;

/// How long a Kafka sink waits for the brokers to acknowledge a batch.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The output has a column of a type JSON cannot hold (a JSON-lines or Kafka sink).
    #[error("sink {target}: cannot write batch {batch_id} as JSON: {error}; write it with the parquet sink, or cast the column to a type JSON can hold in the plugin")]
    Json {
        /// Where.
        target: String,
        /// Which batch.
        batch_id: u64,
        /// What arrow-json said (it names the type).
        error: ArrowError,
    },
    /// A newer owner of the task committed this batch: this process was taken over.
    #[error("sink {target}: batch {batch_id} was committed by a newer owner of this task (this process was taken over); nothing of this process's was made visible")]
    Fenced {
        /// Where.
        target: String,
        /// Which batch.
        batch_id: u64,
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
        let text = jsonl_bytes("stdout", batch_id, batches)?;
        let mut out = std::io::stdout().lock();
        out.write_all(&text).and_then(|()| out.flush()).map_err(|error| SinkError::Write { target: "stdout".into(), batch_id, error })
    }
}

/// Output rows as JSON lines, the form of the JSON-lines and Kafka sinks and of `sluice plugin
/// test`. For record-schema output each line is the record's value (as JSON when it parses,
/// else as text, else as bytes); otherwise each line is the row's columns (see
/// [`json::encode_rows`]). Fails, naming the type, for a column JSON cannot hold.
pub fn json_lines(batch: &RecordBatch) -> Result<JsonRows, ArrowError> {
    if !is_record_schema(batch.schema_ref()) {
        return json::encode_rows(batch);
    }
    let values = batch.column_by_name(columns::VALUE).expect("the record schema has a value column").as_binary::<i32>();
    let mut rows = JsonRows::default();
    for value in values {
        let line = match value {
            None => Value::Null,
            Some(bytes) => json::utf8(bytes).and_then(|text| serde_json::from_str(text).ok()).unwrap_or_else(|| json::bytes_value(bytes)),
        };
        rows.push(&serde_json::to_vec(&line).expect("a JSON value serializes"));
    }
    Ok(rows)
}

/// Every row of `batches` as one JSON-lines document.
fn jsonl_bytes(target: &str, batch_id: u64, batches: &[RecordBatch]) -> Result<Vec<u8>, SinkError> {
    let mut text = Vec::new();
    for b in batches {
        let rows = json_lines(b).map_err(|error| SinkError::Json { target: target.to_string(), batch_id, error })?;
        text.extend_from_slice(rows.text());
    }
    Ok(text)
}
/// Open the sink a pipeline names for one task of a consumer-group run: a file sink's view
/// of the task ([`FileSink::for_task`]), a Kafka topic with the task's own transactions
/// when exactly once ([`KafkaSink::open_task`]); stdout and an at-least-once Kafka topic as
/// for a whole run.
pub fn open_task(config: &SinkConfig, kafka: &BTreeMap<String, String>, task: SinkTask) -> Result<Box<dyn Sink>, SinkError> {
    let at = |path: &str, options: &BTreeMap<String, String>| crate::store::Location::open(path, options).map_err(SinkError::opening);
    Ok(match config {
        SinkConfig::Kafka { topic, delivery } => Box::new(KafkaSink::open_task(topic, delivery, kafka, &task)?),
        SinkConfig::Jsonl { path } if path != "-" => Box::new(FileSink::for_task(at(path, &BTreeMap::new())?, FileFormat::Jsonl, task)?),
        SinkConfig::Parquet { path, compression, options } => Box::new(FileSink::for_task(at(path, options)?, FileFormat::Parquet(*compression), task)?),
        other => open(other, kafka)?,
    })
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

#[cfg(test)]
mod tests;
