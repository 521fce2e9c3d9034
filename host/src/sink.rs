//! Sinks: where a batch's output goes. Output is named by batch id, so re-running a batch
//! replaces what it wrote instead of adding to it.

use std::io::Write;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;

use crate::offline::json_lines;

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
}
