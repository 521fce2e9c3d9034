//! Read access to one micro-batch: per record (row view) or per column (Arrow).
//!
//! A [`Batch`] is an Arrow [`RecordBatch`] in the [record schema](crate::record_schema)
//! whose columns have been checked and downcast once, so that row access is cheap.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{Array, BinaryArray, Int32Array, Int64Array, ListArray, RecordBatch, StringArray};
use serde::Deserialize;

use crate::schema::{columns, is_record_schema};
use crate::Error;

/// One micro-batch of Kafka records.
#[derive(Debug, Clone)]
pub struct Batch {
    batch: RecordBatch,
    topic: StringArray,
    partition: Int32Array,
    offset: Int64Array,
    timestamp: Int64Array,
    key: BinaryArray,
    value: BinaryArray,
    headers: ListArray,
    header_keys: StringArray,
    header_values: BinaryArray,
}

impl Batch {
    /// Wrap a record batch, checking that it is in the record schema.
    pub fn new(batch: RecordBatch) -> Result<Self, Error> {
        if !is_record_schema(batch.schema_ref()) {
            return Err(Error::batch(format!(
                "input batch is not in the Kafka record schema; got columns [{}]",
                batch.schema_ref().fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
            )));
        }
        let col = |name: &str| batch.column_by_name(name).expect("checked by is_record_schema");
        let headers = col(columns::HEADERS).as_list::<i32>().clone();
        let entries = headers.values().as_struct();
        Ok(Self {
            topic: col(columns::TOPIC).as_string::<i32>().clone(),
            partition: col(columns::PARTITION).as_primitive::<Int32Type>().clone(),
            offset: col(columns::OFFSET).as_primitive::<Int64Type>().clone(),
            timestamp: col(columns::TIMESTAMP).as_primitive::<Int64Type>().clone(),
            key: col(columns::KEY).as_binary::<i32>().clone(),
            value: col(columns::VALUE).as_binary::<i32>().clone(),
            header_keys: entries.column(0).as_string::<i32>().clone(),
            header_values: entries.column(1).as_binary::<i32>().clone(),
            headers,
            batch,
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// True when the batch holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record at `row` (0-based). Panics if `row >= len()`.
    pub fn record(&self, row: usize) -> Record<'_> {
        assert!(row < self.len(), "row {row} out of range for a batch of {}", self.len());
        Record { batch: self, row }
    }

    /// All records, in offset order per partition.
    pub fn records(&self) -> impl ExactSizeIterator<Item = Record<'_>> + '_ {
        (0..self.len()).map(move |row| Record { batch: self, row })
    }

    /// The underlying Arrow batch, for columnar processing.
    pub fn arrow(&self) -> &RecordBatch {
        &self.batch
    }

    /// The `value` column.
    pub fn values(&self) -> &BinaryArray {
        &self.value
    }

    /// The `key` column.
    pub fn keys(&self) -> &BinaryArray {
        &self.key
    }

    /// The `timestamp` column (epoch milliseconds).
    pub fn timestamps(&self) -> &Int64Array {
        &self.timestamp
    }
}

/// A view of one record of a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    batch: &'a Batch,
    row: usize,
}

impl<'a> Record<'a> {
    /// Position of the record in its batch; use it to [reject](crate::Output::reject) it.
    pub fn index(&self) -> usize {
        self.row
    }

    /// Source topic.
    pub fn topic(&self) -> &'a str {
        self.batch.topic.value(self.row)
    }

    /// Source partition.
    pub fn partition(&self) -> i32 {
        self.batch.partition.value(self.row)
    }

    /// Offset in the source partition.
    pub fn offset(&self) -> i64 {
        self.batch.offset.value(self.row)
    }

    /// Kafka timestamp in epoch milliseconds, if the broker gave one.
    pub fn timestamp(&self) -> Option<i64> {
        let ts = &self.batch.timestamp;
        ts.is_valid(self.row).then(|| ts.value(self.row))
    }

    /// Key bytes, `None` for a null key.
    pub fn key(&self) -> Option<&'a [u8]> {
        let key = &self.batch.key;
        key.is_valid(self.row).then(|| key.value(self.row))
    }

    /// Value bytes, `None` for a null value (a tombstone).
    pub fn value(&self) -> Option<&'a [u8]> {
        let value = &self.batch.value;
        value.is_valid(self.row).then(|| value.value(self.row))
    }

    /// Value as UTF-8 text; the error says why it is not.
    pub fn value_str(&self) -> Result<&'a str, String> {
        let bytes = self.value().ok_or_else(|| "value is null".to_string())?;
        std::str::from_utf8(bytes).map_err(|e| format!("value is not valid UTF-8: {e}"))
    }

    /// Value parsed as JSON into `T` (which may borrow strings from the value); the error
    /// names the problem and its position.
    pub fn json<T: Deserialize<'a>>(&self) -> Result<T, String> {
        let bytes = self.value().ok_or_else(|| "value is null".to_string())?;
        crate::json::parse(bytes)
    }

    /// Headers in the order the producer wrote them.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let batch = self.batch;
        let range = batch.headers.value_offsets()[self.row] as usize..batch.headers.value_offsets()[self.row + 1] as usize;
        range.map(move |i| {
            let v = &batch.header_values;
            (batch.header_keys.value(i), v.is_valid(i).then(|| v.value(i)))
        })
    }

    /// The first header named `name`: `None` if absent, `Some(None)` if its value is null.
    pub fn header(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}
