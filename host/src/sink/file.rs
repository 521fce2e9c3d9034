//! File sinks (Parquet, JSON lines) on a local directory or an object store, exactly once
//! through a manifest of committed batches.

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{jsonl_bytes, Sink, SinkError};
use crate::config::ParquetCompression;
use crate::store::{Location, StoreError};

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
    pub(super) location: Location,
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

    pub(super) fn manifest_name(batch_id: u64) -> String {
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
            FileFormat::Jsonl => jsonl_bytes(self.location.shown(), batch_id, &batches)?,
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
