//! The Kafka record schema every batch arrives in, and Arrow IPC encoding.
//!
//! Owns the one definition of the record schema shared by the host and plugins, a builder
//! for batches in that schema, and the IPC stream encode/decode used on both sides of the
//! WebAssembly boundary. It knows nothing about plugins.

use std::sync::{Arc, OnceLock};

use arrow_array::builder::{BinaryBuilder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StructArray};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef};

/// Column names of the record schema, in order.
pub mod columns {
    /// Source topic (utf8).
    pub const TOPIC: &str = "topic";
    /// Source partition (int32).
    pub const PARTITION: &str = "partition";
    /// Offset within the partition (int64).
    pub const OFFSET: &str = "offset";
    /// Broker or producer timestamp, epoch milliseconds (int64, nullable).
    pub const TIMESTAMP: &str = "timestamp";
    /// Record key (binary, nullable).
    pub const KEY: &str = "key";
    /// Record value (binary, nullable).
    pub const VALUE: &str = "value";
    /// Record headers (list of struct {key: utf8, value: binary}).
    pub const HEADERS: &str = "headers";
}

fn header_struct_fields() -> Fields {
    Fields::from(vec![Field::new("key", DataType::Utf8, false), Field::new("value", DataType::Binary, true)])
}

fn header_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(header_struct_fields()), false))
}

/// The schema of a batch of Kafka records as the host hands it to plugins:
/// `topic, partition, offset, timestamp, key, value, headers`.
pub fn record_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new(columns::TOPIC, DataType::Utf8, false),
                Field::new(columns::PARTITION, DataType::Int32, false),
                Field::new(columns::OFFSET, DataType::Int64, false),
                Field::new(columns::TIMESTAMP, DataType::Int64, true),
                Field::new(columns::KEY, DataType::Binary, true),
                Field::new(columns::VALUE, DataType::Binary, true),
                Field::new(columns::HEADERS, DataType::List(header_item_field()), false),
            ]))
        })
        .clone()
}

/// True when `schema` has the record schema's column names and types, in order
/// (nullability and metadata are not compared).
pub fn is_record_schema(schema: &Schema) -> bool {
    same_columns(schema, &record_schema())
}

/// True when both schemas have the same column names and data types, in order.
pub fn same_columns(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len() && a.fields().iter().zip(b.fields().iter()).all(|(x, y)| x.name() == y.name() && types_match(x.data_type(), y.data_type()))
}

fn types_match(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => types_match(x.data_type(), y.data_type()),
        (DataType::Struct(x), DataType::Struct(y)) => x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| p.name() == q.name() && types_match(p.data_type(), q.data_type())),
        _ => a == b,
    }
}

/// One Kafka record to append to a [`RecordsBuilder`], borrowed from wherever it lives.
#[derive(Debug, Clone, Copy)]
pub struct RecordParts<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Partition number.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Timestamp, epoch milliseconds.
    pub timestamp: Option<i64>,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Value bytes.
    pub value: Option<&'a [u8]>,
}

/// Builds a [`RecordBatch`] in the [`record_schema`], one record at a time.
#[derive(Debug)]
pub struct RecordsBuilder {
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: Int64Builder,
    key: BinaryBuilder,
    value: BinaryBuilder,
    header_offsets: Vec<i32>,
    header_keys: StringBuilder,
    header_values: BinaryBuilder,
}

impl Default for RecordsBuilder {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl RecordsBuilder {
    /// A builder with room for `records` records holding about `value_bytes` value bytes.
    pub fn with_capacity(records: usize, value_bytes: usize) -> Self {
        Self {
            topic: StringBuilder::with_capacity(records, records * 8),
            partition: Int32Builder::with_capacity(records),
            offset: Int64Builder::with_capacity(records),
            timestamp: Int64Builder::with_capacity(records),
            key: BinaryBuilder::with_capacity(records, records * 8),
            value: BinaryBuilder::with_capacity(records, value_bytes),
            header_offsets: {
                let mut v = Vec::with_capacity(records + 1);
                v.push(0);
                v
            },
            header_keys: StringBuilder::new(),
            header_values: BinaryBuilder::new(),
        }
    }

    /// Number of records appended so far.
    pub fn len(&self) -> usize {
        self.header_offsets.len() - 1
    }

    /// True when no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append one record with its headers.
    pub fn append<'h>(&mut self, record: RecordParts<'_>, headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>) {
        self.topic.append_value(record.topic);
        self.partition.append_value(record.partition);
        self.offset.append_value(record.offset);
        self.timestamp.append_option(record.timestamp);
        self.key.append_option(record.key);
        self.value.append_option(record.value);
        let mut count = 0;
        for (k, v) in headers {
            self.header_keys.append_value(k);
            self.header_values.append_option(v);
            count += 1;
        }
        let last = *self.header_offsets.last().expect("offsets start with 0");
        self.header_offsets.push(last + count);
    }

    /// Finish the batch and reset the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let offsets = std::mem::replace(&mut self.header_offsets, vec![0]);
        let headers_struct =
            StructArray::new(header_struct_fields(), vec![Arc::new(self.header_keys.finish()) as ArrayRef, Arc::new(self.header_values.finish()) as ArrayRef], None);
        let headers = ListArray::new(header_item_field(), OffsetBuffer::new(offsets.into()), Arc::new(headers_struct), None);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.value.finish()),
            Arc::new(headers),
        ];
        RecordBatch::try_new(record_schema(), columns).expect("columns follow the record schema")
    }
}

/// Encode batches as one Arrow IPC stream (a schema message, the batches, end of stream).
pub fn encode_ipc(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    encode_ipc_into(schema, batches, &mut out)?;
    Ok(out)
}

/// [`encode_ipc`] into `out`, replacing what it held. A caller that encodes batch after
/// batch keeps one buffer: its memory is reused instead of allocated (and, for large
/// batches, faulted in from the OS) each time.
pub fn encode_ipc_into(schema: &Schema, batches: &[RecordBatch], out: &mut Vec<u8>) -> Result<(), ArrowError> {
    out.clear();
    out.reserve(batches.iter().map(|b| b.get_array_memory_size()).sum::<usize>() + 1024);
    let mut writer = StreamWriter::try_new(out, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()
}

/// Decode an Arrow IPC stream into its schema and batches. The batches share the input
/// buffer where alignment allows (no copy).
pub fn decode_ipc(bytes: Vec<u8>) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let mut buffer = Buffer::from_vec(bytes);
    let mut decoder = StreamDecoder::new();
    let mut batches = Vec::new();
    while !buffer.is_empty() {
        if let Some(batch) = decoder.decode(&mut buffer)? {
            batches.push(batch);
        }
    }
    decoder.finish()?;
    let schema = decoder.schema().ok_or_else(|| ArrowError::IpcError("the IPC stream holds no schema message".into()))?;
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_into_a_used_buffer_gives_the_same_bytes_as_a_fresh_one() {
        let batch = |n: i64| {
            let mut b = RecordsBuilder::default();
            for o in 0..n {
                b.append(RecordParts { topic: "t", partition: 0, offset: o, timestamp: None, key: None, value: Some(b"{}") }, []);
            }
            b.finish()
        };
        let mut buffer = Vec::new();
        encode_ipc_into(&record_schema(), &[batch(1000)], &mut buffer).unwrap();
        encode_ipc_into(&record_schema(), &[batch(3)], &mut buffer).unwrap();
        assert_eq!(buffer, encode_ipc(&record_schema(), &[batch(3)]).unwrap());
        let (_, batches) = decode_ipc(buffer).unwrap();
        assert_eq!(batches[0].num_rows(), 3);
    }

    #[test]
    fn builder_round_trips_through_ipc() {
        let mut b = RecordsBuilder::default();
        b.append(RecordParts { topic: "t", partition: 2, offset: 7, timestamp: Some(5), key: Some(b"k"), value: Some(b"{}") }, [("h", Some(&b"v"[..])), ("n", None)]);
        b.append(RecordParts { topic: "t", partition: 2, offset: 8, timestamp: None, key: None, value: None }, []);
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 2);
        let bytes = encode_ipc(&record_schema(), std::slice::from_ref(&batch)).unwrap();
        let (schema, batches) = decode_ipc(bytes).unwrap();
        assert!(is_record_schema(&schema));
        assert_eq!(batches, vec![batch]);
    }

    #[test]
    fn schema_only_stream_decodes_to_no_batches() {
        let bytes = encode_ipc(&record_schema(), &[]).unwrap();
        let (schema, batches) = decode_ipc(bytes).unwrap();
        assert!(is_record_schema(&schema));
        assert!(batches.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_ipc(b"definitely not arrow".to_vec()).is_err());
        assert!(decode_ipc(Vec::new()).is_err());
    }
}
