//! Output rows written as JSON and read back: by arrow-json's reader into the same schema
//! where our encoding is its own, and against literal JSON (the expected text written by
//! hand) where it is one of ours (timestamps, binary, non-finite floats).

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder, MapBuilder, StringBuilder, StringDictionaryBuilder, StructBuilder};
use arrow_array::types::{ArrowPrimitiveType, Float16Type, Int32Type};
use arrow_array::*;
use arrow_buffer::{i256, IntervalDayTime};
use arrow_schema::{DataType, Field, Fields, Schema, UnionFields};
use serde_json::{json, Value};

use super::*;
use crate::schema::{record_schema, RecordParts, RecordsBuilder};

fn one_column(name: &str, array: ArrayRef) -> RecordBatch {
    let schema = Schema::new(vec![Field::new(name, array.data_type().clone(), true)]);
    RecordBatch::try_new(Arc::new(schema), vec![array]).unwrap()
}

fn lines(batch: &RecordBatch) -> Vec<Value> {
    let rows = encode_rows(batch).unwrap();
    let text = rows.text();
    assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), batch.num_rows(), "one line per row");
    rows.iter().map(|r| serde_json::from_slice(r).unwrap()).collect()
}

/// Written, then read back by arrow-json into the batch's own schema: the same batch.
fn assert_round_trips(batch: &RecordBatch) {
    let text = encode_rows(batch).unwrap().text().to_vec();
    let mut reader = arrow_json::ReaderBuilder::new(batch.schema()).build(Cursor::new(&text)).unwrap();
    let back = reader.next().expect("one batch").unwrap();
    assert_eq!(&back, batch, "{}", String::from_utf8_lossy(&text));
}

#[test]
fn every_column_type_of_the_sdks_row_builder_round_trips() {
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("boolean", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))),
        ("int8", Arc::new(Int8Array::from(vec![Some(i8::MIN), None, Some(i8::MAX)]))),
        ("int16", Arc::new(Int16Array::from(vec![Some(i16::MIN), None, Some(i16::MAX)]))),
        ("int32", Arc::new(Int32Array::from(vec![Some(i32::MIN), None, Some(i32::MAX)]))),
        ("int64", Arc::new(Int64Array::from(vec![Some(i64::MIN), None, Some(i64::MAX)]))),
        ("uint8", Arc::new(UInt8Array::from(vec![Some(0), None, Some(u8::MAX)]))),
        ("uint16", Arc::new(UInt16Array::from(vec![Some(0), None, Some(u16::MAX)]))),
        ("uint32", Arc::new(UInt32Array::from(vec![Some(0), None, Some(u32::MAX)]))),
        ("uint64", Arc::new(UInt64Array::from(vec![Some(0), None, Some(u64::MAX)]))),
        ("float32", Arc::new(Float32Array::from(vec![Some(0.1), None, Some(-3.4e38)]))),
        ("float64", Arc::new(Float64Array::from(vec![Some(0.1), None, Some(f64::MIN_POSITIVE)]))),
        ("timestamp_ms", Arc::new(TimestampMillisecondArray::from(vec![Some(1_700_000_000_123), None, Some(-1)]))),
        ("timestamp_ms_utc", Arc::new(TimestampMillisecondArray::from(vec![Some(1_700_000_000_123), None, Some(0)]).with_timezone("+00:00"))),
        ("utf8", Arc::new(StringArray::from(vec![Some("a \"quoted\"\nline ü 日本"), None, Some("")]))),
    ];
    for (name, array) in columns {
        let batch = one_column(name, array);
        assert_round_trips(&batch);
        assert_eq!(lines(&batch)[1], json!({ name: null }), "a null is written as null");
    }
}

#[test]
fn other_arrow_types_a_plugin_can_build_round_trip() {
    let mut dictionary = StringDictionaryBuilder::<Int32Type>::new();
    dictionary.append_value("red");
    dictionary.append_null();
    dictionary.append_value("red");
    let mut list = ListBuilder::new(Int64Builder::new());
    list.append_value([Some(1), None]);
    list.append_null();
    list.append_value([]);
    let mut map = MapBuilder::new(None, StringBuilder::new(), Int64Builder::new());
    map.keys().append_value("a");
    map.values().append_value(1);
    map.append(true).unwrap();
    map.append(false).unwrap();
    map.append(true).unwrap();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("large_utf8", Arc::new(LargeStringArray::from(vec![Some("x"), None, Some("y")]))),
        ("utf8_view", Arc::new(StringViewArray::from(vec![Some("a string longer than twelve bytes"), None, Some("s")]))),
        ("timestamp_us", Arc::new(TimestampMicrosecondArray::from(vec![Some(1_700_000_000_123_456), None, Some(0)]))),
        ("timestamp_ns_tz", Arc::new(TimestampNanosecondArray::from(vec![Some(1_700_000_000_123_456_789), None, Some(0)]).with_timezone("+09:00"))),
        ("timestamp_s", Arc::new(TimestampSecondArray::from(vec![Some(1_700_000_000), None, Some(0)]))),
        ("date32", Arc::new(Date32Array::from(vec![Some(19_700), None, Some(0)]))),
        ("time64_us", Arc::new(Time64MicrosecondArray::from(vec![Some(3_600_000_001), None, Some(0)]))),
        ("decimal128", Arc::new(Decimal128Array::from(vec![Some(12_345), None, Some(-1)]).with_precision_and_scale(10, 2).unwrap())),
        ("decimal256", Arc::new(Decimal256Array::from(vec![Some(i256::from_i128(-5)), None, Some(i256::from_i128(7))]).with_precision_and_scale(20, 1).unwrap())),
        ("list", Arc::new(list.finish())),
        ("map", Arc::new(map.finish())),
    ];
    for (name, array) in columns {
        assert_round_trips(&one_column(name, array));
    }
    // arrow-json reads no dictionaries back; their values are written as themselves.
    assert_eq!(lines(&one_column("d", Arc::new(dictionary.finish()))), vec![json!({"d": "red"}), json!({"d": null}), json!({"d": "red"})]);
}

#[test]
fn the_record_schema_round_trips_with_its_binary_written_as_text_or_bytes() {
    let mut records = RecordsBuilder::with_capacity(2, 16);
    let headers: Vec<(&str, Option<&[u8]>)> = vec![("trace", Some(b"t-1")), ("raw", Some(&[0xff, 0x00])), ("empty", None)];
    records.append(RecordParts { topic: "in", partition: 3, offset: 7, timestamp: Some(1_700_000_000_000), key: Some(b"k"), value: Some(b"{\"a\": 1}") }, headers);
    records.append(RecordParts { topic: "in", partition: 3, offset: 8, timestamp: None, key: None, value: Some(&[0xc3, 0x28]) }, []);
    let batch = records.finish();
    assert!(crate::is_record_schema(&batch.schema()) && batch.schema() == record_schema());
    assert_eq!(
        lines(&batch),
        vec![
            json!({"topic": "in", "partition": 3, "offset": 7, "timestamp": 1_700_000_000_000_i64, "key": "k", "value": "{\"a\": 1}",
                   "headers": [{"key": "trace", "value": "t-1"}, {"key": "raw", "value": [255, 0]}, {"key": "empty", "value": null}]}),
            json!({"topic": "in", "partition": 3, "offset": 8, "timestamp": null, "key": null, "value": [0xc3, 0x28], "headers": []}),
        ]
    );
}

#[test]
fn every_binary_type_is_text_when_utf8_and_bytes_otherwise() {
    let values: Vec<Option<&[u8]>> = vec![Some(b"plain"), None, Some(&[0xff, 0x00, 0x41])];
    let expected = |name: &str| vec![json!({ name: "plain" }), json!({ name: null }), json!({ name: [255, 0, 65] })];
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("binary", Arc::new(BinaryArray::from(values.clone()))),
        ("large_binary", Arc::new(LargeBinaryArray::from(values.clone()))),
        ("binary_view", Arc::new(BinaryViewArray::from(values.clone()))),
    ];
    for (name, array) in columns {
        assert_eq!(lines(&one_column(name, array)), expected(name));
    }
    let fixed = FixedSizeBinaryArray::try_from_sparse_iter_with_size(vec![Some(*b"ab"), None, Some([0x80, 0x81])].into_iter(), 2).unwrap();
    assert_eq!(lines(&one_column("fixed", Arc::new(fixed))), vec![json!({"fixed": "ab"}), json!({"fixed": null}), json!({"fixed": [128, 129]})]);
}

#[test]
fn timestamps_are_integers_in_their_unit_and_floats_keep_nan_and_infinities_apart_from_null() {
    let batch = RecordBatch::try_from_iter(vec![
        ("ms", Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_123, 5]).with_timezone("UTC")) as ArrayRef),
        ("ns", Arc::new(TimestampNanosecondArray::from(vec![1, 2])) as ArrayRef),
        ("f64", Arc::new(Float64Array::from(vec![f64::NAN, f64::NEG_INFINITY])) as ArrayRef),
        ("f32", Arc::new(Float32Array::from(vec![f32::INFINITY, 0.1])) as ArrayRef),
        ("f16", Arc::new(Float16Array::from(vec![half_of(1.5), half_of(f32::NAN)])) as ArrayRef),
    ])
    .unwrap();
    assert_eq!(
        lines(&batch),
        vec![json!({"ms": 1_700_000_000_123_i64, "ns": 1, "f64": "NaN", "f32": "inf", "f16": 1.5}), json!({"ms": 5, "ns": 2, "f64": "-inf", "f32": 0.1, "f16": "NaN"})]
    );
    let text = String::from_utf8(encode_rows(&batch).unwrap().text().to_vec()).unwrap();
    assert!(text.contains("\"f32\":0.1,"), "a float32 is written with its own shortest digits: {text}");
}

fn half_of(x: f32) -> <Float16Type as ArrowPrimitiveType>::Native {
    <Float16Type as ArrowPrimitiveType>::Native::from_f32(x)
}

#[test]
fn nested_structs_and_lists_are_objects_and_arrays_in_column_order() {
    let inner = Fields::from(vec![Field::new("z", DataType::Int64, true), Field::new("a", DataType::Utf8, true)]);
    let mut s = StructBuilder::from_fields(inner.clone(), 2);
    s.field_builder::<Int64Builder>(0).unwrap().append_value(1);
    s.field_builder::<StringBuilder>(1).unwrap().append_null();
    s.append(true);
    s.field_builder::<Int64Builder>(0).unwrap().append_null();
    s.field_builder::<StringBuilder>(1).unwrap().append_null();
    s.append(false);
    let batch = RecordBatch::try_from_iter(vec![("s", Arc::new(s.finish()) as ArrayRef), ("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef)]).unwrap();
    let rows = encode_rows(&batch).unwrap();
    let text: Vec<&[u8]> = rows.iter().collect();
    assert_eq!(text, vec![&br#"{"s":{"z":1,"a":null},"n":1}"#[..], &br#"{"s":null,"n":2}"#[..]]);
    assert_round_trips(&batch);
    let maps = batch_to_rows(&batch);
    assert_eq!(maps[0].keys().collect::<Vec<_>>(), vec!["s", "n"], "columns in schema order");
}

#[test]
fn a_type_without_a_json_form_is_an_error_that_names_it() {
    let fields = UnionFields::try_new(vec![0], vec![Field::new("i", DataType::Int32, false)]).unwrap();
    let union = UnionArray::try_new(fields, vec![0].into(), None, vec![Arc::new(Int32Array::from(vec![1])) as ArrayRef]).unwrap();
    let error = encode_rows(&one_column("u", Arc::new(union))).unwrap_err().to_string();
    assert!(error.contains("Union"), "{error}");
    let interval = IntervalDayTimeArray::from(vec![IntervalDayTime::new(1, 2)]);
    let written = encode_rows(&one_column("i", Arc::new(interval)));
    assert!(written.is_ok_and(|r| r.len() == 1), "intervals have a text form");
}

#[test]
fn an_empty_batch_has_no_rows_and_rows_split_at_their_newlines() {
    let empty = one_column("x", Arc::new(Int64Array::from(Vec::<i64>::new())));
    assert!(encode_rows(&empty).unwrap().is_empty());
    let batch = one_column("x", Arc::new(StringArray::from(vec!["a\nb", "c"])));
    let rows = encode_rows(&batch).unwrap();
    assert_eq!(rows.iter().collect::<Vec<_>>(), vec![&br#"{"x":"a\nb"}"#[..], &br#"{"x":"c"}"#[..]]);
    assert_eq!(rows.text(), b"{\"x\":\"a\\nb\"}\n{\"x\":\"c\"}\n");
}
