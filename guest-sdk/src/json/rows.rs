//! Arrow rows as JSON objects, written by arrow-json with three choices of our own that
//! keep the output readable and lossless where JSON allows:
//!
//! * timestamps are integers in the column's unit (epoch milliseconds for the SDK's
//!   `Timestamp(Millisecond)`), as the record schema carries them, not ISO text;
//! * binary values that are valid UTF-8 are strings, others arrays of byte values;
//! * float NaN and infinities, which JSON cannot hold, are the strings `"NaN"`, `"inf"` and
//!   `"-inf"` instead of `null`, so they stay apart from missing values.
//!
//! Every other type is written the way arrow-json writes it (dates and times as ISO text,
//! decimals as numbers, dictionaries as their values, maps as objects); a type arrow-json
//! cannot write is an error naming it, never a placeholder.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Float64Type};
use arrow_array::{Array, ArrayAccessor, RecordBatch, StructArray};
use arrow_buffer::ScalarBuffer;
use arrow_json::writer::{make_encoder, Encoder, EncoderFactory, EncoderOptions, NullableEncoder};
use arrow_schema::{ArrowError, DataType, Field, FieldRef};
use serde_json::{Map, Value};

/// The rows of a batch as JSON objects, one per line: `text` holds every row followed by a
/// newline (a JSON-lines document), `ends` where each row ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonRows {
    text: Vec<u8>,
    ends: Vec<usize>,
}

impl JsonRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Each row's JSON text, without its newline.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|e| e + 1));
        starts.zip(&self.ends).map(|(s, &e)| &self.text[s..e])
    }

    /// Append one row's JSON text, which must not hold a raw newline (compact JSON never does).
    pub fn push(&mut self, row: &[u8]) {
        debug_assert!(!row.contains(&b'\n'), "a JSON row holds no raw newline");
        self.text.extend_from_slice(row);
        self.ends.push(self.text.len());
        self.text.push(b'\n');
    }

    /// The JSON-lines document: every row, each followed by `\n`.
    pub fn text(&self) -> &[u8] {
        &self.text
    }
}

/// Write every row of `batch` as a JSON object keyed by column name, in column order, with
/// nulls written as `null`. Fails, naming the type, when a column's type has no JSON form.
pub fn encode_rows(batch: &RecordBatch) -> Result<JsonRows, ArrowError> {
    let mut rows = JsonRows::default();
    if batch.num_rows() == 0 {
        return Ok(rows);
    }
    let options = EncoderOptions::default().with_explicit_nulls(true).with_encoder_factory(Arc::new(Choices));
    let array = StructArray::from(batch.clone());
    let field: FieldRef = Arc::new(Field::new_struct("", batch.schema().fields().clone(), false));
    let mut encoder = make_encoder(&field, &array, &options)?;
    rows.ends.reserve(batch.num_rows());
    for row in 0..batch.num_rows() {
        encoder.encode(row, &mut rows.text);
        rows.ends.push(rows.text.len());
        rows.text.push(b'\n');
    }
    Ok(rows)
}

/// Every row of `batch` as a JSON object (the native test harness's view of output rows).
///
/// # Panics
/// When a column has a type with no JSON form; the message names it.
pub fn batch_to_rows(batch: &RecordBatch) -> Vec<Map<String, Value>> {
    let rows = encode_rows(batch).unwrap_or_else(|e| panic!("output rows cannot be shown as JSON: {e}"));
    rows.iter().map(|r| serde_json::from_slice(r).expect("arrow-json writes JSON objects")).collect()
}

/// A binary value as JSON: a string when it is valid UTF-8, else an array of byte values.
pub fn bytes_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => Value::Array(bytes.iter().map(|x| Value::from(*x)).collect()),
    }
}

/// The encoders that differ from arrow-json's defaults (see the module documentation).
#[derive(Debug)]
struct Choices;

impl EncoderFactory for Choices {
    fn make_default_encoder<'a>(&self, _field: &'a FieldRef, array: &'a dyn Array, _options: &'a EncoderOptions) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        let nulls = array.nulls().cloned();
        let encoder: Box<dyn Encoder + 'a> = match array.data_type() {
            DataType::Timestamp(_, _) => Box::new(Integers(ScalarBuffer::<i64>::new(array.to_data().buffers()[0].clone(), array.offset(), array.len()))),
            DataType::Float16 => Box::new(Floats(array.as_primitive::<Float16Type>().values().iter().map(|v| v.to_f32()).collect::<ScalarBuffer<f32>>())),
            DataType::Float32 => Box::new(Floats(array.as_primitive::<Float32Type>().values().clone())),
            DataType::Float64 => Box::new(Floats(array.as_primitive::<Float64Type>().values().clone())),
            DataType::Binary => Box::new(Bytes(array.as_binary::<i32>())),
            DataType::LargeBinary => Box::new(Bytes(array.as_binary::<i64>())),
            DataType::BinaryView => Box::new(Bytes(array.as_binary_view())),
            DataType::FixedSizeBinary(_) => Box::new(Bytes(array.as_fixed_size_binary())),
            _ => return Ok(None),
        };
        Ok(Some(NullableEncoder::new(encoder, nulls)))
    }
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("writing JSON to memory cannot fail");
}

struct Integers(ScalarBuffer<i64>);

impl Encoder for Integers {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        write_json(out, &self.0[idx]);
    }
}

/// A float type written through serde_json (shortest text that reads back to the same value).
trait JsonFloat: Copy {
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! json_float {
    ($($t:ty),*) => {$(
        impl JsonFloat for $t {
            fn write(self, out: &mut Vec<u8>) {
                if self.is_finite() {
                    write_json(out, &self);
                } else {
                    write_json(out, &self.to_string());
                }
            }
        }
    )*};
}
json_float!(f32, f64);

struct Floats<T: arrow_buffer::ArrowNativeType>(ScalarBuffer<T>);

impl<T: arrow_buffer::ArrowNativeType + JsonFloat> Encoder for Floats<T> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        self.0[idx].write(out);
    }
}

struct Bytes<A>(A);

impl<'a, A: ArrayAccessor<Item = &'a [u8]>> Encoder for Bytes<A> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let bytes = self.0.value(idx);
        match std::str::from_utf8(bytes) {
            Ok(text) => write_json(out, text),
            Err(_) => write_json(out, &bytes),
        }
    }
}

#[cfg(test)]
mod tests;
