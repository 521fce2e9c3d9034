use std::sync::Arc;

use arrow_array::{Int64Array, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::*;
use crate::config::ParquetCompression;

fn rows(names: &[&str], counts: &[i64]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("campaign_id", DataType::Utf8, false), Field::new("clicks", DataType::Int64, false)]));
    RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(names.to_vec())), Arc::new(Int64Array::from(counts.to_vec()))]).unwrap()
}

fn read(sink: &FileSink, batch_id: u64) -> Vec<RecordBatch> {
    let bytes = sink.location.get(&sink.batch_file(batch_id)).unwrap().expect("the batch file is visible");
    ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap().build().unwrap().collect::<Result<_, _>>().unwrap()
}

fn parquet(location: &str) -> FileSink {
    FileSink::open(location, FileFormat::Parquet(ParquetCompression::Snappy), &BTreeMap::new()).unwrap()
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn every_compression_round_trips_and_empty_batches_commit_without_a_file() {
    for compression in [ParquetCompression::Snappy, ParquetCompression::Zstd, ParquetCompression::None] {
        let mut sink = FileSink::open("memory://", FileFormat::Parquet(compression), &BTreeMap::new()).unwrap();
        assert_eq!(sink.last_batch_id().unwrap(), None);
        sink.write(3, &[rows(&["a", "b"], &[1, 2]), rows(&["c"], &[3])]).unwrap();
        sink.commit(3).unwrap();
        sink.write(4, &[rows(&[], &[])]).unwrap();
        sink.commit(4).unwrap();
        assert_eq!(read(&sink, 3), vec![rows(&["a", "b", "c"], &[1, 2, 3])], "{compression:?}");
        assert_eq!(sink.location.get(&sink.batch_file(4)).unwrap(), None, "an empty batch writes no file");
        assert_eq!(sink.manifest_entry(4).unwrap(), ManifestEntry { batch_id: 4, files: vec![], rows: 0 });
        assert_eq!(sink.last_batch_id().unwrap(), Some(4));
        assert!(sink.is_committed(3) && sink.is_committed(4) && !sink.is_committed(5));
    }
}

#[test]
fn a_batch_is_visible_only_after_its_commit_and_an_uncommitted_one_is_dropped_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/out");
    let mut sink = parquet(out.to_str().unwrap());
    sink.write(12, &[rows(&["x"], &[1])]).unwrap();
    assert_eq!(names(&out), vec![STAGING_DIR], "nothing visible before the commit");
    sink.commit(12).unwrap();
    sink.write(13, &[rows(&["y"], &[2])]).unwrap();
    drop(sink); // a crash before batch 13 commits
    let again = parquet(&format!("file://{}", out.display()));
    assert_eq!(again.last_batch_id().unwrap(), Some(12));
    assert_eq!(names(&out), vec![MANIFEST_DIR, STAGING_DIR, "batch-000000000012.parquet"]);
    assert_eq!(names(&out.join(STAGING_DIR)), Vec::<String>::new(), "the uncommitted batch's file is gone");
    assert_eq!(read(&again, 12), vec![rows(&["x"], &[1])]);
}

#[test]
fn a_commit_interrupted_after_its_manifest_entry_is_finished_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = FileSink::open(dir.path().to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap();
    sink.write(0, &[rows(&["x"], &[1])]).unwrap();
    // What commit does, stopped between the entry and the move.
    let entry = ManifestEntry { batch_id: 0, files: vec![sink.batch_file(0)], rows: 1 };
    sink.location.put(&FileSink::manifest_name(0), serde_json::to_vec(&entry).unwrap()).unwrap();
    drop(sink);
    let again = FileSink::open(dir.path().to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap();
    assert!(again.is_committed(0));
    let text = std::fs::read_to_string(dir.path().join("batch-000000000000.jsonl")).unwrap();
    assert_eq!(text, "{\"campaign_id\":\"x\",\"clicks\":1}\n");
}

#[test]
fn a_commit_without_a_write_of_that_batch_is_refused() {
    let mut sink = parquet("memory://");
    sink.write(1, &[rows(&["x"], &[1])]).unwrap();
    let error = sink.commit(2).unwrap_err().to_string();
    assert!(error.contains("commit without a write"), "{error}");
}

#[test]
fn a_directory_that_cannot_be_created_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let error = parquet_err(file.join("out").to_str().unwrap());
    assert!(error.contains("cannot create the directory"), "{error}");
}

fn parquet_err(location: &str) -> String {
    FileSink::open(location, FileFormat::Parquet(ParquetCompression::Snappy), &BTreeMap::new()).err().unwrap().to_string()
}

#[test]
fn a_jsonl_sink_writes_every_column_type_json_can_hold_and_refuses_others_without_committing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = FileSink::open(dir.path().to_str().unwrap(), FileFormat::Jsonl, &BTreeMap::new()).unwrap();
    let dated = RecordBatch::try_from_iter(vec![
        ("day", Arc::new(arrow_array::Date32Array::from(vec![19_700])) as arrow_array::ArrayRef),
        ("amount", Arc::new(arrow_array::Decimal128Array::from(vec![12_345]).with_precision_and_scale(10, 2).unwrap()) as _),
    ])
    .unwrap();
    sink.write(0, std::slice::from_ref(&dated)).unwrap();
    sink.commit(0).unwrap();
    let text = std::fs::read_to_string(dir.path().join("batch-000000000000.jsonl")).unwrap();
    assert_eq!(text, "{\"day\":\"2023-12-09\",\"amount\":123.45}\n");

    let fields = arrow_schema::UnionFields::try_new(vec![0], vec![Field::new("i", DataType::Int32, false)]).unwrap();
    let union = arrow_array::UnionArray::try_new(fields, vec![0].into(), None, vec![Arc::new(arrow_array::Int32Array::from(vec![1])) as _]).unwrap();
    let odd = RecordBatch::try_from_iter(vec![("u", Arc::new(union) as arrow_array::ArrayRef)]).unwrap();
    let error = sink.write(1, &[odd]).unwrap_err();
    assert!(matches!(error, SinkError::Json { batch_id: 1, .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("Union") && message.contains("parquet sink"), "says which type and what to do: {message}");
    assert!(!sink.is_committed(1));
    assert_eq!(names(&dir.path().join(STAGING_DIR)), Vec::<String>::new(), "nothing staged for the refused batch");
}

#[test]
fn record_schema_output_is_one_line_per_record_value() {
    let mut records = sluice_sdk::RecordsBuilder::with_capacity(3, 16);
    for value in [&b"{\"a\":  [1, 2.5]}"[..], b"not json", &[0xff, 0x01]] {
        records.append(sluice_sdk::RecordParts { topic: "t", partition: 0, offset: 0, timestamp: None, key: None, value: Some(value) }, []);
    }
    records.append(sluice_sdk::RecordParts { topic: "t", partition: 0, offset: 0, timestamp: None, key: None, value: None }, []);
    let rows = json_lines(&records.finish()).unwrap();
    assert_eq!(std::str::from_utf8(rows.text()).unwrap(), "{\"a\":[1,2.5]}\n\"not json\"\n[255,1]\nnull\n");
}
