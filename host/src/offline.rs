//! Run a plugin over a JSON-lines file without Kafka: each line is one record value, fed
//! in batches of N, then a final flush (watermark at +∞). This is `sluice plugin test`.

use std::io::BufRead;

use arrow_schema::ArrowError;
use sluice_sdk::json::JsonRows;
use sluice_sdk::{Context, OffsetRange, RecordParts, RecordsBuilder};

use crate::runtime::{CallError, PluginInstance};
use crate::sink::json_lines;

/// Topic name given to records read from a file.
pub const TOPIC: &str = "input";

/// Counts of one offline run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records fed to the plugin.
    pub records: u64,
    /// Batches, not counting the final flush.
    pub batches: u64,
    /// Output rows.
    pub output_rows: u64,
    /// Records the plugin rejected.
    pub rejected: u64,
    /// Records dropped as late.
    pub late: u64,
    /// Blank lines skipped.
    pub blank_lines: u64,
}

/// Why an offline run stopped.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// Reading the input failed.
    #[error("cannot read the input at line {line}: {error}")]
    Read {
        /// 1-based line number.
        line: u64,
        /// The OS error.
        error: std::io::Error,
    },
    /// A plugin call failed.
    #[error("{what}: {error}")]
    Call {
        /// Which batch.
        what: String,
        /// The failure.
        error: CallError,
    },
    /// The plugin's output has a column JSON cannot hold.
    #[error("{what}: the output cannot be shown as JSON lines: {error}; cast the column to a type JSON can hold in the plugin")]
    Output {
        /// Which batch.
        what: String,
        /// What arrow-json said (it names the type).
        error: ArrowError,
    },
}

/// What the run reports as it goes.
pub trait Sink {
    /// Output rows of one batch, as JSON lines.
    fn rows(&mut self, rows: &JsonRows);
    /// A record the plugin rejected: its 1-based line number and the reason.
    fn rejected(&mut self, line: u64, reason: &str);
}

/// Feed `input` to `instance` in batches of `batch_size` lines, then flush.
pub fn run(instance: &mut PluginInstance, input: impl BufRead, batch_size: usize, sink: &mut dyn Sink) -> Result<Summary, OfflineError> {
    let batch_size = batch_size.max(1);
    let mut summary = Summary::default();
    let mut watermark = None;
    let mut lines: Vec<(u64, Vec<u8>)> = Vec::with_capacity(batch_size);
    let mut reader = input;
    let mut line_no = 0u64;
    loop {
        let mut buf = Vec::new();
        let n = reader.read_until(b'\n', &mut buf).map_err(|error| OfflineError::Read { line: line_no + 1, error })?;
        let eof = n == 0;
        if !eof {
            line_no += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                summary.blank_lines += 1;
            } else {
                lines.push((line_no, buf));
            }
        }
        if lines.len() >= batch_size || (eof && !lines.is_empty()) {
            let batch = std::mem::take(&mut lines);
            watermark = feed(instance, &batch, watermark, &mut summary, sink)?;
        }
        if eof {
            break;
        }
    }
    feed(instance, &[], Some(i64::MAX), &mut summary, sink)?;
    Ok(summary)
}

fn feed(instance: &mut PluginInstance, lines: &[(u64, Vec<u8>)], watermark: Option<i64>, summary: &mut Summary, sink: &mut dyn Sink) -> Result<Option<i64>, OfflineError> {
    let flush = lines.is_empty();
    let mut builder = RecordsBuilder::with_capacity(lines.len(), lines.iter().map(|(_, l)| l.len()).sum());
    for (line, value) in lines {
        let parts = RecordParts { topic: TOPIC, partition: 0, offset: *line as i64 - 1, timestamp: None, key: None, value: Some(value) };
        builder.append(parts, []);
    }
    let batch = builder.finish();
    let ctx = Context {
        batch_id: summary.batches,
        offset_ranges: match (lines.first(), lines.last()) {
            (Some((first, _)), Some((last, _))) => {
                vec![OffsetRange { topic: TOPIC.into(), partition: 0, from: *first as i64 - 1, until: *last as i64 }]
            }
            _ => Vec::new(),
        },
        processing_time_ms: 0,
        watermark_ms: watermark,
    };
    let what = match (lines.first(), lines.last()) {
        (Some((a, _)), Some((b, _))) => format!("batch {} (lines {a}-{b})", summary.batches),
        _ => "final flush".to_string(),
    };
    let out = instance.process(&batch, &ctx).map_err(|error| OfflineError::Call { what: what.clone(), error })?;
    if !flush {
        summary.batches += 1;
        summary.records += lines.len() as u64;
    }
    for e in &out.record_errors {
        summary.rejected += 1;
        sink.rejected(lines[e.row as usize].0, &e.reason);
    }
    summary.late += out.late_records;
    for b in &out.batches {
        summary.output_rows += b.num_rows() as u64;
        sink.rows(&json_lines(b).map_err(|error| OfflineError::Output { what: what.clone(), error })?);
    }
    Ok(out.watermark_ms.or(watermark))
}
