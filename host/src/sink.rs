//! Sinks: where a batch's output goes. Output is named by batch id, so re-running a batch
//! replaces what it wrote instead of adding to it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow_array::RecordBatch;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sluice_sdk::is_record_schema;

use crate::config::{ParquetCompression, Sink as SinkConfig};
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

/// Takes the output of each batch.
pub trait Sink {
    /// Write the output of batch `batch_id`. Called once per batch, in order; a batch that
    /// is re-run is written again under the same id and replaces the earlier output.
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError>;

    /// The highest batch id this sink already holds output for, if it keeps output by
    /// batch id. A new run numbers its batches after it, so it never replaces output of
    /// an earlier run. An error when the sink cannot be listed: starting at batch 0
    /// instead could replace earlier output.
    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        Ok(None)
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
        create_output_dir(&dir)?;
        Ok(Self::Dir(dir))
    }

    /// The file batch `batch_id` goes to.
    pub fn batch_file(dir: &Path, batch_id: u64) -> PathBuf {
        dir.join(format!("batch-{batch_id:012}.jsonl"))
    }
}

/// Create a sink's output directory (and its parents) if missing.
fn create_output_dir(dir: &Path) -> Result<(), SinkError> {
    std::fs::create_dir_all(dir).map_err(|error| SinkError::Open {
        target: dir.display().to_string(),
        error: std::io::Error::new(error.kind(), format!("cannot create the output directory: {error}")),
    })
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

    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        let JsonlSink::Dir(dir) = self else { return Ok(None) };
        let entries = std::fs::read_dir(dir).map_err(|error| SinkError::Open {
            target: dir.display().to_string(),
            error: std::io::Error::new(error.kind(), format!("cannot list the output directory: {error}")),
        })?;
        Ok(entries.filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().and_then(batch_id_of))).max())
    }
}

/// Open the sink a pipeline names; `kafka` is the pipeline's librdkafka table.
pub fn open(config: &SinkConfig, kafka: &BTreeMap<String, String>) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match config {
        SinkConfig::Jsonl { path } => Box::new(JsonlSink::open(path)?),
        SinkConfig::Kafka { topic } => Box::new(KafkaSink::open(topic, kafka)?),
        SinkConfig::Parquet { path, compression, options } => Box::new(ParquetSink::open(path, *compression, options)?),
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

/// Parquet files on a local directory or any object store, one file per batch
/// (`batch-<id>.parquet`). Each file is uploaded whole in one put, which the stores make
/// atomic (a local file is written under a temporary name and renamed), so a reader never
/// sees part of a batch, and a re-run batch replaces its file.
pub struct ParquetSink {
    store: Box<dyn ObjectStore>,
    prefix: ObjectPath,
    target: String,
    compression: ParquetCompression,
    io: tokio::runtime::Runtime,
}

impl ParquetSink {
    /// Open `location`: a local directory (created if missing) or an object-store URL;
    /// `options` configure the store (credentials, region, endpoint …; see the README).
    pub fn open(location: &str, compression: ParquetCompression, options: &BTreeMap<String, String>) -> Result<Self, SinkError> {
        let open_error = |message: String| SinkError::Open { target: location.to_string(), error: std::io::Error::other(message) };
        let url = match location.split_once("://") {
            None => None,
            Some(_) => Some(url::Url::parse(location).map_err(|e| open_error(format!("not a valid URL: {e}")))?),
        };
        let local_dir = match &url {
            None => Some(PathBuf::from(location)),
            Some(u) if u.scheme() == "file" => {
                Some(u.to_file_path().map_err(|()| open_error("a file:// URL needs an absolute path, like file:///data/out".into()))?)
            }
            Some(_) => None,
        };
        let (store, prefix): (Box<dyn ObjectStore>, ObjectPath) = match (local_dir, url) {
            (Some(dir), _) => {
                create_output_dir(&dir)?;
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| open_error(e.to_string()))?;
                (Box::new(store), ObjectPath::default())
            }
            (None, Some(url)) => open_store(&url, options).map_err(open_error)?,
            (None, None) => unreachable!("a location is a local directory or a URL"),
        };
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| SinkError::Open { target: location.to_string(), error })?;
        Ok(Self { store, prefix, target: location.to_string(), compression, io })
    }

    /// The object batch `batch_id` goes to, under `prefix`.
    fn batch_object(&self, batch_id: u64) -> ObjectPath {
        self.prefix.clone().join(format!("batch-{batch_id:012}.parquet"))
    }

    /// Encode `batches` (one schema) as one Parquet file.
    pub fn encode(batches: &[RecordBatch], compression: ParquetCompression) -> Result<Vec<u8>, String> {
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

/// The store behind an object-store URL, configured from the environment (the variables
/// each cloud's own tools read, e.g. `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`,
/// `AZURE_STORAGE_ACCOUNT_NAME`) and then `options`, and the path under it.
fn open_store(url: &url::Url, options: &BTreeMap<String, String>) -> Result<(Box<dyn ObjectStore>, ObjectPath), String> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    use object_store::ObjectStoreScheme;

    fn keys<K: std::str::FromStr>(options: &BTreeMap<String, String>, store: &str) -> Result<Vec<(K, String)>, String> {
        options
            .iter()
            .map(|(k, v)| {
                k.to_ascii_lowercase().parse().map(|key| (key, v.clone())).map_err(|_| format!("`{k}` is not an option of the {store} store (see the README for examples)"))
            })
            .collect()
    }
    let (scheme, path) = ObjectStoreScheme::parse(url).map_err(|e| e.to_string())?;
    let path = ObjectPath::parse(path).map_err(|e| e.to_string())?;
    let built = |e: object_store::Error| format!("cannot open the object store: {e}");
    let store: Box<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Memory if options.is_empty() => Box::new(object_store::memory::InMemory::new()),
        ObjectStoreScheme::Memory => return Err("the memory:// store takes no options".into()),
        ObjectStoreScheme::AmazonS3 => {
            let builder = keys::<AmazonS3ConfigKey>(options, "S3")?.into_iter().fold(AmazonS3Builder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let builder = keys::<GoogleConfigKey>(options, "Google Cloud Storage")?
                .into_iter()
                .fold(GoogleCloudStorageBuilder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let builder = keys::<AzureConfigKey>(options, "Azure")?.into_iter().fold(MicrosoftAzureBuilder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        other => return Err(format!("{other:?} URLs are not supported by the Parquet sink")),
    };
    Ok((store, path))
}

/// The batch id of an object named by [`ParquetSink::batch_object`].
fn parquet_batch_id(name: &str) -> Option<u64> {
    name.strip_prefix("batch-")?.strip_suffix(".parquet")?.parse().ok()
}

impl Sink for ParquetSink {
    fn write(&mut self, batch_id: u64, batches: &[RecordBatch]) -> Result<(), SinkError> {
        let batches: Vec<RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).cloned().collect();
        if batches.is_empty() {
            return Ok(());
        }
        let fail = |error: String| SinkError::Store { target: self.target.clone(), batch_id, error };
        let bytes = Self::encode(&batches, self.compression).map_err(fail)?;
        let object = self.batch_object(batch_id);
        self.io
            .block_on(self.store.put(&object, PutPayload::from(bytes)))
            .map(drop)
            .map_err(|e| fail(e.to_string()))
    }

    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        let listing = self.io.block_on(self.store.list_with_delimiter(Some(&self.prefix))).map_err(|e| SinkError::Open {
            target: self.target.clone(),
            error: std::io::Error::other(format!("cannot list existing output: {e}")),
        })?;
        Ok(listing.objects.iter().filter_map(|o| o.location.filename().and_then(parquet_batch_id)).max())
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

    fn read(sink: &ParquetSink, batch_id: u64) -> Vec<RecordBatch> {
        let bytes = sink.io.block_on(async { sink.store.get(&sink.batch_object(batch_id)).await?.bytes().await }).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn memory_store_round_trips_and_a_rerun_replaces_the_batch() {
        for compression in [ParquetCompression::Snappy, ParquetCompression::Zstd, ParquetCompression::None] {
            let mut sink = ParquetSink::open("memory://", compression, &BTreeMap::new()).unwrap();
            assert_eq!(sink.last_batch_id().unwrap(), None);
            sink.write(3, &[rows(&["a", "b"], &[1, 2]), rows(&["c"], &[3])]).unwrap();
            sink.write(3, &[rows(&["a"], &[7])]).unwrap();
            sink.write(4, &[rows(&[], &[])]).unwrap();
            assert_eq!(read(&sink, 3), vec![rows(&["a"], &[7])], "{compression:?}");
            assert_eq!(sink.last_batch_id().unwrap(), Some(3), "an empty batch writes no file");
        }
    }

    #[test]
    fn local_directory_and_file_url_name_files_by_batch() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/out");
        let mut sink = ParquetSink::open(out.to_str().unwrap(), ParquetCompression::Snappy, &BTreeMap::new()).unwrap();
        sink.write(12, &[rows(&["x"], &[1])]).unwrap();
        assert!(out.join("batch-000000000012.parquet").is_file());
        let url = format!("file://{}", out.display());
        let mut again = ParquetSink::open(&url, ParquetCompression::Snappy, &BTreeMap::new()).unwrap();
        assert_eq!(again.last_batch_id().unwrap(), Some(12));
        again.write(13, &[rows(&["y"], &[2])]).unwrap();
        assert_eq!(read(&again, 13), vec![rows(&["y"], &[2])]);
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "only the batch files, no temporary leftovers: {names:?}");
    }

    #[test]
    fn cloud_urls_take_their_own_options_and_name_a_wrong_one() {
        let options = BTreeMap::from([
            ("aws_endpoint".to_string(), "http://127.0.0.1:1".to_string()),
            ("aws_allow_http".to_string(), "true".to_string()),
            ("aws_region".to_string(), "eu-west-1".to_string()),
        ]);
        assert!(ParquetSink::open("s3://bucket/out", ParquetCompression::Snappy, &options).is_ok());
        let wrong = BTreeMap::from([("aws_regoin".to_string(), "eu-west-1".to_string())]);
        let error = ParquetSink::open("s3://bucket/out", ParquetCompression::Snappy, &wrong).err().unwrap().to_string();
        assert!(error.contains("`aws_regoin` is not an option of the S3 store"), "{error}");
        let error = ParquetSink::open("gs://bucket/out", ParquetCompression::Snappy, &options).err().unwrap().to_string();
        assert!(error.contains("`aws_allow_http` is not an option of the Google Cloud Storage store"), "{error}");
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let error = ParquetSink::open(file.join("out").to_str().unwrap(), ParquetCompression::Snappy, &BTreeMap::new()).err().unwrap();
        assert!(error.to_string().contains("cannot create the output directory"), "{error}");
    }
}
