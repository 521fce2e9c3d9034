//! Sinks: where a batch's output goes. Output is named by batch id, so re-running a batch
//! replaces what it wrote instead of adding to it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow_array::RecordBatch;
use sluice_sdk::is_record_schema;

use crate::config::Sink as SinkConfig;
use crate::kafka::{Loader, Outgoing, SourceError, TUNED_DEFAULTS};
use crate::offline::json_lines;

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
    /// A sink format this version cannot write yet.
    #[error("sink format `{0}` is not implemented yet; use format = \"jsonl\" or \"kafka\"")]
    Unsupported(&'static str),
    /// The sink cannot be opened.
    #[error("sink {target}: {error}")]
    Open {
        /// Where.
        target: String,
        /// The OS error.
        error: std::io::Error,
    },
}

/// Takes the output of each batch.
pub trait Sink {
    /// Write the output of batch `batch_id`. Called once per batch, in order; a batch that
    /// is re-run is written again under the same id and replaces the earlier output.
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError>;

    /// The highest batch id this sink already holds output for, if it keeps output by
    /// batch id. A new run numbers its batches after it, so it never replaces output of
    /// an earlier run.
    fn last_batch_id(&self) -> Option<u64> {
        None
    }
}

/// JSON lines, one row a line: to stdout, or one file per batch in a directory
/// (`batch-<id>.jsonl`, written to a temporary name and renamed, so a reader never sees
/// half a batch).
pub enum JsonlSink {
    /// Standard output (a re-run batch is printed again).
    Stdout,
    /// A directory.
    Dir(PathBuf),
}

impl JsonlSink {
    /// `-` for stdout, else a directory (created if missing).
    pub fn open(path: &str) -> Result<Self, SinkError> {
        if path == "-" {
            return Ok(Self::Stdout);
        }
        let dir = PathBuf::from(path);
        std::fs::create_dir_all(&dir).map_err(|error| SinkError::Open {
            target: dir.display().to_string(),
            error: std::io::Error::new(error.kind(), format!("cannot create the output directory: {error}")),
        })?;
        Ok(Self::Dir(dir))
    }

    /// The file batch `batch_id` goes to.
    pub fn batch_file(dir: &Path, batch_id: u64) -> PathBuf {
        dir.join(format!("batch-{batch_id:012}.jsonl"))
    }
}

/// The batch id of a file named by [`JsonlSink::batch_file`].
fn batch_id_of(name: &str) -> Option<u64> {
    name.strip_prefix("batch-")?.strip_suffix(".jsonl")?.parse().ok()
}

impl Sink for JsonlSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let mut text = Vec::new();
        for b in batches {
            for line in json_lines(b) {
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
            }
        }
        match self {
            JsonlSink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&text)
                    .and_then(|()| out.flush())
                    .map_err(|error| SinkError::Write { target: "stdout".into(), batch_id, error })
            }
            JsonlSink::Dir(dir) => {
                if text.is_empty() {
                    return Ok(());
                }
                let file = Self::batch_file(dir, batch_id);
                let tmp = file.with_extension("jsonl.tmp");
                std::fs::write(&tmp, &text)
                    .and_then(|()| std::fs::rename(&tmp, &file))
                    .map_err(|error| SinkError::Write { target: dir.display().to_string(), batch_id, error })
            }
        }
    }

    fn last_batch_id(&self) -> Option<u64> {
        let JsonlSink::Dir(dir) = self else { return None };
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().and_then(batch_id_of)))
            .max()
    }
}

/// Open the sink a pipeline names; `kafka` is the pipeline's librdkafka table.
pub fn open(config: &SinkConfig, kafka: &BTreeMap<String, String>) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match config {
        SinkConfig::Jsonl { path } => Box::new(JsonlSink::open(path)?),
        SinkConfig::Kafka { topic } => Box::new(KafkaSink::open(topic, kafka)?),
        SinkConfig::Parquet { .. } => return Err(SinkError::Unsupported("parquet")),
    })
}

/// Writes output rows to a Kafka topic, at least once: every record of a batch is
/// acknowledged by the brokers before the batch's input offsets are committed, so a crash
/// in between repeats the batch. Record-schema output keeps its key, value and headers;
/// other output is written one JSON row per record, without a key.
pub struct KafkaSink {
    loader: Loader,
    topic: String,
}

impl KafkaSink {
    /// Connect with the pipeline's librdkafka table (consumer-only fetch defaults left out).
    pub fn open(topic: &str, kafka: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        let properties = kafka
            .iter()
            .filter(|(k, _)| !TUNED_DEFAULTS.iter().any(|(d, _)| d == k))
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let loader = Loader::with_properties(properties)
            .map_err(|error| SinkError::Kafka { topic: topic.to_string(), batch_id: 0, error })?;
        Ok(Self { loader, topic: topic.to_string() })
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let fail = |error| SinkError::Kafka { topic: self.topic.clone(), batch_id, error };
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
        self.loader.flush(ACK_TIMEOUT).map_err(fail)
    }
}
