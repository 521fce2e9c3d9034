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
        assert_eq!(sink.manifest_entry(4).unwrap(), ManifestEntry { batch_id: 4, files: vec![], rows: 0, epoch: 0 });
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
    let entry = ManifestEntry { batch_id: 0, files: vec![sink.batch_file(0)], rows: 1, epoch: 0 };
    sink.location.put(&sink.manifest_name(0), serde_json::to_vec(&entry).unwrap()).unwrap();
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

fn task_view(dir: &std::path::Path, partition: i32, epoch: u64) -> FileSink {
    let location = crate::store::Location::open(dir.to_str().unwrap(), &BTreeMap::new()).unwrap();
    FileSink::for_task(location, FileFormat::Jsonl, SinkTask { topic: "t".into(), partition, epoch }).unwrap()
}

fn visible(dir: &std::path::Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| !n.starts_with("_sluice")).collect()
}

#[test]
fn of_an_old_and_a_new_owner_of_a_task_exactly_one_commits_a_batch_and_only_its_file_shows() {
    // The new owner commits first: the old owner's commit is refused, its file never shows.
    let dir = tempfile::tempdir().unwrap();
    let (mut old, mut new) = (task_view(dir.path(), 0, 1), task_view(dir.path(), 0, 2));
    old.write(3, &[rows(&["a"], &[1])]).unwrap();
    new.write(3, &[rows(&["a"], &[1])]).unwrap();
    new.commit(3).unwrap();
    let error = old.commit(3).unwrap_err();
    assert!(matches!(error, SinkError::Fenced { batch_id: 3, .. }), "{error}");
    assert_eq!(visible(dir.path()), vec!["t-0-batch-000000000003-e2.jsonl"]);
    assert!(names(&dir.path().join(STAGING_DIR)).is_empty(), "the refused owner's staged file is deleted");

    // The old owner commits first (it finished the batch the new owner replays): its
    // commit stands, the new owner's copy is dropped, and the batch counts as committed.
    let dir = tempfile::tempdir().unwrap();
    let (mut old, mut new) = (task_view(dir.path(), 0, 1), task_view(dir.path(), 0, 2));
    old.write(3, &[rows(&["a"], &[1])]).unwrap();
    new.write(3, &[rows(&["a"], &[1])]).unwrap();
    old.commit(3).unwrap();
    new.commit(3).unwrap();
    assert!(new.is_committed(3));
    assert_eq!(visible(dir.path()), vec!["t-0-batch-000000000003-e1.jsonl"]);
    assert!(names(&dir.path().join(STAGING_DIR)).is_empty());
    assert_eq!(task_view(dir.path(), 0, 3).last_batch_id().unwrap(), Some(3));
    assert_eq!(task_view(dir.path(), 1, 1).last_batch_id().unwrap(), None, "another task has its own manifest");
}

#[test]
fn a_task_finishes_an_interrupted_commit_of_its_earlier_owner_and_never_touches_another_tasks_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut other_task = task_view(dir.path(), 1, 1);
    other_task.write(0, &[rows(&["x"], &[9])]).unwrap(); // staged, not committed
    let old = task_view(dir.path(), 0, 1);
    // The old owner created its manifest entry and stopped before moving its file.
    let file = old.batch_file(0);
    old.location.put(&format!("{STAGING_DIR}/{file}"), b"{\"campaign_id\":\"a\",\"clicks\":1}\n".to_vec()).unwrap();
    let entry = ManifestEntry { batch_id: 0, files: vec![file.clone()], rows: 1, epoch: 1 };
    old.location.create(&old.manifest_name(0), serde_json::to_vec(&entry).unwrap()).unwrap();
    // An uncommitted staged file of a later batch may be the old owner's commit in progress.
    old.location.put(&format!("{STAGING_DIR}/{}", old.batch_file(1)), b"{}\n".to_vec()).unwrap();
    let mut new = task_view(dir.path(), 0, 2);
    assert_eq!(visible(dir.path()), vec![file.clone()], "opening finished the interrupted commit");
    new.write(1, &[rows(&["b"], &[2])]).unwrap();
    new.commit(1).unwrap();
    assert_eq!(visible(dir.path()), vec![file, "t-0-batch-000000000001-e2.jsonl".to_string()]);
    assert_eq!(names(&dir.path().join(STAGING_DIR)), vec![other_task.batch_file(0)], "the old owner's file of batch 1 went once batch 1 committed; the other task's stays");
}
