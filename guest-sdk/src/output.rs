//! What a plugin produces for one batch: rows in its declared schema, rejected records,
//! and its watermark.
//!
//! Rows can be given three ways, freely mixed and kept in order: whole Arrow batches
//! ([`Output::push_batch`]), `serde::Serialize` values ([`Output::push_row`]), or input
//! records forwarded with an optional new value ([`Output::forward`], record schema only).

use std::sync::Arc;

use arrow_array::builder::*;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, SchemaRef, TimeUnit};
use serde::Serialize;
use serde_json::Value;

use crate::schema::{is_record_schema, same_columns, RecordParts, RecordsBuilder};
use crate::{Error, Record};

/// One input record the plugin rejected, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Index of the record in the input batch.
    pub row: u32,
    /// Human-readable reason.
    pub reason: String,
}

/// The finished output of one batch.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// Output rows, in the declared schema.
    pub batches: Vec<RecordBatch>,
    /// Rejected input records.
    pub record_errors: Vec<RecordError>,
    /// The plugin's watermark after the batch.
    pub watermark_ms: Option<i64>,
    /// Records dropped as late in this batch.
    pub late_records: u64,
}

#[expect(clippy::large_enum_variant, reason = "one per Output, which lives for one batch: its size does not matter, and boxing would add an allocation per batch")]
enum Pending {
    None,
    Rows(Vec<Value>),
    Records(RecordsBuilder),
}

/// The output of one batch, in the schema the plugin declared.
pub struct Output {
    schema: SchemaRef,
    forwardable: bool,
    /// Rows and value bytes of the input batch: forwarded records rarely need more.
    capacity_hint: (usize, usize),
    batches: Vec<RecordBatch>,
    pending: Pending,
    record_errors: Vec<RecordError>,
    watermark_ms: Option<i64>,
    late_records: u64,
}

impl Output {
    /// An empty output in `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        Self {
            forwardable: is_record_schema(&schema),
            capacity_hint: (0, 0),
            schema,
            batches: Vec::new(),
            pending: Pending::None,
            record_errors: Vec::new(),
            watermark_ms: None,
            late_records: 0,
        }
    }

    /// An empty output for a batch of `rows` records with `value_bytes` of values, so that
    /// forwarding records does not grow buffers record by record.
    pub fn for_batch(schema: SchemaRef, rows: usize, value_bytes: usize) -> Self {
        Self { capacity_hint: (rows, value_bytes), ..Self::new(schema) }
    }

    /// The declared output schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Append a whole Arrow batch; its columns must match the declared schema.
    pub fn push_batch(&mut self, batch: RecordBatch) -> Result<(), Error> {
        if !same_columns(batch.schema_ref(), &self.schema) {
            return Err(Error::batch(format!("output batch columns {:?} do not match the declared output schema {:?}", names(batch.schema_ref()), names(&self.schema))));
        }
        self.flush()?;
        self.batches.push(batch);
        Ok(())
    }

    /// Append one row from any `Serialize` value whose fields are named after the output
    /// columns. Missing fields become nulls where the column is nullable.
    pub fn push_row<T: Serialize + ?Sized>(&mut self, row: &T) -> Result<(), Error> {
        let value = serde_json::to_value(row).map_err(|e| Error::batch(format!("output row cannot be serialized: {e}")))?;
        if !value.is_object() {
            return Err(Error::batch(format!("output row must serialize to a struct/map with one entry per column, got {value}")));
        }
        if !matches!(self.pending, Pending::Rows(_)) {
            self.flush()?;
            self.pending = Pending::Rows(Vec::new());
        }
        if let Pending::Rows(rows) = &mut self.pending {
            rows.push(value);
        }
        Ok(())
    }

    /// Forward an input record, optionally with a new value (`Some(None)` for a null
    /// value). Only for plugins whose output schema is the record schema.
    pub fn forward(&mut self, record: &Record<'_>, new_value: Option<Option<&[u8]>>) -> Result<(), Error> {
        if !self.forwardable {
            return Err(Error::batch("forward() needs the record schema as output schema; use push_row or push_batch"));
        }
        if !matches!(self.pending, Pending::Records(_)) {
            self.flush()?;
            let (rows, bytes) = self.capacity_hint;
            self.pending = Pending::Records(RecordsBuilder::with_capacity(rows, bytes));
        }
        if let Pending::Records(builder) = &mut self.pending {
            builder.append(
                RecordParts {
                    topic: record.topic(),
                    partition: record.partition(),
                    offset: record.offset(),
                    timestamp: record.timestamp(),
                    key: record.key(),
                    value: new_value.unwrap_or_else(|| record.value()),
                },
                record.headers(),
            );
        }
        Ok(())
    }

    /// Reject input record `row` (see [`Record::index`]); it goes to the dead-letter
    /// policy with `reason` and is left out of the output.
    pub fn reject(&mut self, row: usize, reason: impl Into<String>) {
        self.record_errors.push(RecordError { row: row as u32, reason: reason.into() });
    }

    /// Report the plugin's event-time watermark after this batch.
    pub fn set_watermark(&mut self, watermark_ms: Option<i64>) {
        self.watermark_ms = watermark_ms;
    }

    /// Count records dropped as late in this batch.
    pub fn add_late(&mut self, n: u64) {
        self.late_records += n;
    }

    /// Number of rows output so far.
    pub fn rows(&self) -> usize {
        let pending = match &self.pending {
            Pending::None => 0,
            Pending::Rows(r) => r.len(),
            Pending::Records(b) => b.len(),
        };
        self.batches.iter().map(|b| b.num_rows()).sum::<usize>() + pending
    }

    fn flush(&mut self) -> Result<(), Error> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => {}
            Pending::Rows(rows) => self.batches.push(rows_to_batch(&self.schema, &rows)?),
            Pending::Records(mut b) => self.batches.push(b.finish()),
        }
        Ok(())
    }

    /// Finish the output.
    pub fn finish(mut self) -> Result<Finished, Error> {
        self.flush()?;
        self.batches.retain(|b| b.num_rows() > 0);
        Ok(Finished { batches: self.batches, record_errors: self.record_errors, watermark_ms: self.watermark_ms, late_records: self.late_records })
    }
}

fn names(schema: &SchemaRef) -> Vec<String> {
    schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect()
}

/// Convert JSON objects into a batch in `schema`, column by column.
fn rows_to_batch(schema: &SchemaRef, rows: &[Value]) -> Result<RecordBatch, Error> {
    let columns = schema.fields().iter().map(|field| column(field, rows)).collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(Error::from)
}

fn column(field: &Field, rows: &[Value]) -> Result<ArrayRef, Error> {
    let name = field.name();
    fn get<'a>(row: &'a Value, name: &str) -> Option<&'a Value> {
        row.get(name).filter(|v| !v.is_null())
    }
    fn as_bytes(v: &Value) -> Option<&[u8]> {
        v.as_str().map(str::as_bytes)
    }
    let missing = |i: usize| -> Error { Error::batch(format!("output row {i}: column `{name}` is not nullable but the row has no value for it")) };
    let wrong = |i: usize, v: &Value| -> Error { Error::batch(format!("output row {i}: column `{name}` is {} but the row has {v}", field.data_type())) };
    macro_rules! build {
        ($builder:expr, $conv:expr) => {{
            let mut b = $builder;
            for (i, row) in rows.iter().enumerate() {
                match get(row, name) {
                    None if field.is_nullable() => b.append_null(),
                    None => return Err(missing(i)),
                    Some(v) => match $conv(v) {
                        Some(x) => b.append_value(x),
                        None => return Err(wrong(i, v)),
                    },
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
        v.as_i64().and_then(|x| T::try_from(x).ok()).or_else(|| v.as_u64().and_then(|x| T::try_from(x).ok()))
    }
    Ok(match field.data_type() {
        DataType::Boolean => build!(BooleanBuilder::new(), |v: &Value| v.as_bool()),
        DataType::Int8 => build!(Int8Builder::new(), int::<i8>),
        DataType::Int16 => build!(Int16Builder::new(), int::<i16>),
        DataType::Int32 => build!(Int32Builder::new(), int::<i32>),
        DataType::Int64 => build!(Int64Builder::new(), int::<i64>),
        DataType::UInt8 => build!(UInt8Builder::new(), int::<u8>),
        DataType::UInt16 => build!(UInt16Builder::new(), int::<u16>),
        DataType::UInt32 => build!(UInt32Builder::new(), int::<u32>),
        DataType::UInt64 => build!(UInt64Builder::new(), int::<u64>),
        DataType::Float32 => build!(Float32Builder::new(), |v: &Value| v.as_f64().map(|x| x as f32)),
        DataType::Float64 => build!(Float64Builder::new(), |v: &Value| v.as_f64()),
        DataType::Timestamp(TimeUnit::Millisecond, tz) => {
            let b = build!(TimestampMillisecondBuilder::new(), int::<i64>);
            let arr = b.as_any().downcast_ref::<arrow_array::TimestampMillisecondArray>().cloned();
            Arc::new(arr.expect("built above").with_timezone_opt(tz.clone()))
        }
        DataType::Utf8 => build!(StringBuilder::new(), Value::as_str),
        DataType::Binary => build!(BinaryBuilder::new(), as_bytes),
        other => return Err(Error::batch(format!("push_row cannot fill column `{name}` of type {other}; build it with push_batch"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::Schema;
    use serde_json::json;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false), Field::new("n", DataType::Int64, false), Field::new("x", DataType::Float64, true)]))
    }

    #[test]
    fn rows_become_typed_columns() {
        let mut out = Output::new(schema());
        out.push_row(&json!({"id": "a", "n": 1, "x": 0.5})).unwrap();
        out.push_row(&json!({"id": "b", "n": 2})).unwrap();
        let f = out.finish().unwrap();
        let rows = crate::json::batch_to_rows(&f.batches[0]);
        assert_eq!(serde_json::to_value(rows).unwrap(), json!([{"id": "a", "n": 1, "x": 0.5}, {"id": "b", "n": 2, "x": null}]));
    }

    #[test]
    fn wrong_types_and_missing_columns_are_reported_by_name() {
        let mut out = Output::new(schema());
        out.push_row(&json!({"id": "a", "n": "one"})).unwrap();
        let e = out.finish().unwrap_err();
        assert!(e.message().contains("column `n` is Int64") && e.message().contains("\"one\""), "{e}");

        let mut out = Output::new(schema());
        out.push_row(&json!({"n": 1})).unwrap();
        let e = out.finish().unwrap_err();
        assert!(e.message().contains("column `id` is not nullable"), "{e}");
    }

    #[test]
    fn forward_needs_the_record_schema() {
        let mut b = RecordsBuilder::default();
        b.append(RecordParts { topic: "t", partition: 0, offset: 0, timestamp: None, key: None, value: None }, []);
        let batch = crate::Batch::new(b.finish()).unwrap();
        let mut out = Output::new(schema());
        assert!(out.forward(&batch.record(0), None).is_err());
        let mut out = Output::new(crate::record_schema());
        out.forward(&batch.record(0), Some(Some(b"new"))).unwrap();
        let f = out.finish().unwrap();
        let rows = crate::json::batch_to_rows(&f.batches[0]);
        assert_eq!(rows[0]["value"], json!("new"));
    }
}
