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
    /// The epoch of the task's owner that committed it (0 outside a consumer group).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The task a sink writes for in a consumer-group run: its batches, manifest entries and
/// files are the task's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTask {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// The epoch its owner holds it in.
    pub epoch: u64,
}

/// Files on a local directory or any object store, one per batch (`batch-<id>.parquet` or
/// `.jsonl`), exactly once: a batch's file is uploaded whole to [`STAGING_DIR`], and on
/// commit its entry is created in [`MANIFEST_DIR`] (the commit point; create-only, so of
/// two writers exactly one commits a batch) and the file moved next to the others. Files
/// of a batch that fails before its commit never appear among them; a committed batch is
/// never written again. A commit interrupted between its entry and the move is finished
/// when the sink is opened again.
///
/// In a consumer-group run each task has its own sink view ([`FileSink::for_task`]): a
/// manifest under `_sluice_manifest/<topic>/<partition>/` and files named
/// `<topic>-<partition>-batch-<id>-e<epoch>`, so owners of one task in different epochs
/// never write the same file, and a task touches no other task's files.
pub struct FileSink {
    pub(super) location: Location,
    format: FileFormat,
    committed: BTreeSet<u64>,
    staged: Option<(u64, u64)>,
    task: Option<SinkTask>,
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
        Self::opened(location, format, None)
    }

    /// The view of one task of a consumer-group run. It finishes the task's interrupted
    /// commit and drops the task's staged files of batches committed already; staged files
    /// of later batches may be an earlier owner's commit in progress, and stay.
    pub fn for_task(location: Location, format: FileFormat, task: SinkTask) -> Result<Self, SinkError> {
        Self::opened(location, format, Some(task))
    }

    fn opened(location: Location, format: FileFormat, task: Option<SinkTask>) -> Result<Self, SinkError> {
        let open_error = SinkError::opening;
        let mut sink = Self { location, format, committed: BTreeSet::new(), staged: None, task };
        for (name, _) in sink.location.list(&sink.manifest_dir()).map_err(open_error)? {
            if let Some(id) = name.strip_prefix("batch-").and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()) {
                sink.committed.insert(id);
            }
        }
        if let Some(&last) = sink.committed.last() {
            let entry = sink.manifest_entry(last).map_err(open_error)?;
            sink.show(&entry).map_err(open_error)?;
        }
        match &sink.task {
            None => {
                for (name, _) in sink.location.list(STAGING_DIR).map_err(open_error)? {
                    sink.location.delete(&format!("{STAGING_DIR}/{name}")).map_err(open_error)?;
                }
            }
            Some(_) => sink.drop_staged_garbage().map_err(open_error)?,
        }
        Ok(sink)
    }

    /// Move the files of a committed batch from staging next to the others, where they are
    /// not yet (another process may be moving them at the same time).
    fn show(&self, entry: &ManifestEntry) -> Result<(), StoreError> {
        for file in &entry.files {
            if let Err(e) = self.location.rename(&format!("{STAGING_DIR}/{file}"), file) {
                if !self.location.exists(file)? {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A task's staged files of batches with a manifest entry that does not list them:
    /// left by an owner that lost the batch's commit to another, or crashed. Deleted.
    fn drop_staged_garbage(&self) -> Result<(), StoreError> {
        let Some(task) = &self.task else { return Ok(()) };
        let prefix = format!("{}-{}-batch-", task.topic, task.partition);
        for (name, _) in self.location.list(STAGING_DIR)? {
            let Some(id) = name.strip_prefix(&prefix).and_then(|rest| rest.split('-').next()).and_then(|n| n.parse::<u64>().ok()) else { continue };
            if self.committed.contains(&id) && !self.manifest_entry(id)?.files.contains(&name) {
                self.location.delete(&format!("{STAGING_DIR}/{name}"))?;
            }
        }
        Ok(())
    }

    fn manifest_dir(&self) -> String {
        match &self.task {
            None => MANIFEST_DIR.to_string(),
            Some(t) => format!("{MANIFEST_DIR}/{}/{}", t.topic, t.partition),
        }
    }

    fn epoch(&self) -> u64 {
        self.task.as_ref().map_or(0, |t| t.epoch)
    }

    /// The name of the file this sink writes for batch `batch_id`.
    pub fn batch_file(&self, batch_id: u64) -> String {
        match &self.task {
            None => format!("batch-{batch_id:012}.{}", self.format.extension()),
            Some(t) => format!("{}-{}-batch-{batch_id:012}-e{}.{}", t.topic, t.partition, t.epoch, self.format.extension()),
        }
    }

    pub(super) fn manifest_name(&self, batch_id: u64) -> String {
        format!("{}/batch-{batch_id:012}.json", self.manifest_dir())
    }

    /// The manifest entry of a committed batch.
    pub fn manifest_entry(&self, batch_id: u64) -> Result<ManifestEntry, StoreError> {
        let name = self.manifest_name(batch_id);
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
        let entry = ManifestEntry { batch_id, files: if rows > 0 { vec![file.clone()] } else { Vec::new() }, rows, epoch: self.epoch() };
        let json = serde_json::to_vec(&entry).expect("a manifest entry serializes");
        let name = self.manifest_name(batch_id);
        if !self.location.create(&name, json).map_err(fail)? {
            let there = self.manifest_entry(batch_id).map_err(fail)?;
            if there != entry {
                if rows > 0 {
                    self.location.delete(&format!("{STAGING_DIR}/{file}")).map_err(fail)?;
                }
                if there.epoch > self.epoch() {
                    return Err(SinkError::Fenced { target: self.location.shown().to_string(), batch_id });
                }
                if self.task.is_none() {
                    return Err(SinkError::Store {
                        target: self.location.shown().to_string(),
                        batch_id,
                        error: format!("the sink's manifest already holds batch {batch_id}, committed by another run writing to the same sink at the same time; nothing of this run's was made visible. Stop the other run, or give each its own sink location"),
                    });
                }
                // An earlier owner of the task committed the batch this one replayed: the
                // same output, made visible by it.
                self.committed.insert(batch_id);
                return self.show(&there).map_err(fail);
            }
        }
        self.committed.insert(batch_id);
        self.show(&entry).map_err(fail)?;
        self.drop_staged_garbage().map_err(fail)
    }

    fn is_committed(&self, batch_id: u64) -> bool {
        self.committed.contains(&batch_id)
    }

    fn last_batch_id(&self) -> Result<Option<u64>, SinkError> {
        Ok(self.committed.last().copied())
    }
}
