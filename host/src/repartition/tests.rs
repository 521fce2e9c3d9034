use super::*;
use sluice_sdk::{RecordParts, RecordsBuilder};

/// A test record: key, value and headers.
type Row<'a> = (Option<&'a str>, Option<&'a str>, Vec<(&'a str, String)>);

/// Records of partition 0 of `in`, with these keys, values and headers.
fn records(rows: &[Row<'_>]) -> RecordBatch {
    let mut b = RecordsBuilder::with_capacity(rows.len(), 64);
    for (i, (key, value, headers)) in rows.iter().enumerate() {
        let parts = RecordParts { topic: "in", partition: 0, offset: i as i64, timestamp: Some(1_000 + i as i64), key: key.map(str::as_bytes), value: value.map(str::as_bytes) };
        b.append(parts, headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))));
    }
    b.finish()
}

fn ctx() -> Context {
    Context { batch_id: 0, offset_ranges: Vec::new(), processing_time_ms: 0, watermark_ms: None }
}

fn keys(batch: &RecordBatch) -> Vec<Option<String>> {
    Batch::new(batch.clone()).unwrap().records().map(|r| r.key().map(|k| String::from_utf8(k.to_vec()).unwrap())).collect()
}

#[test]
fn the_key_step_keys_each_record_by_its_json_field_and_rejects_records_without_one() {
    let mut stage = KeyStage::new(Some("ad.campaign".into()));
    let input = records(&[
        (Some("u1"), Some(r#"{"ad": {"campaign": "c-7"}}"#), vec![]),
        (None, Some(r#"{"ad": {"campaign": 42}}"#), vec![]),
        (Some("u2"), Some(r#"{"ad": {}}"#), vec![]),
        (Some("u3"), Some("not json"), vec![]),
        (Some("u4"), None, vec![]),
        (Some("u5"), Some(r#"{"ad": {"campaign": "c-8"}}"#), vec![]),
    ]);
    let out = stage.process(&input, &ctx()).unwrap();
    assert_eq!(keys(&out.batches[0]), vec![Some("c-7".into()), Some("42".into()), Some("c-8".into())]);
    let rejected: Vec<u32> = out.record_errors.iter().map(|e| e.row).collect();
    assert_eq!(rejected, vec![2, 3, 4]);
    assert!(out.record_errors[0].reason.contains("no `ad.campaign`"), "{}", out.record_errors[0].reason);
    // The rest of each record is kept: offsets and values of rows 0, 1 and 5.
    let kept = Batch::new(out.batches[0].clone()).unwrap();
    assert_eq!(kept.records().map(|r| r.offset()).collect::<Vec<_>>(), vec![0, 1, 5]);
}

#[test]
fn without_a_path_the_key_step_keeps_keys_and_rejects_records_without_one() {
    let mut stage = KeyStage::new(None);
    let input = records(&[(Some("a"), Some("{}"), vec![]), (None, Some("{}"), vec![]), (Some("b"), None, vec![])]);
    let out = stage.process(&input, &ctx()).unwrap();
    assert_eq!(keys(&out.batches[0]), vec![Some("a".into()), Some("b".into())]);
    assert_eq!(out.record_errors.len(), 1);
    assert_eq!(out.record_errors[0].row, 1);
}

/// Repartition records tagged as from `source` partition `p`, batch `batch`, seq `seq`.
fn tagged(tags: &[(&str, i32, u64, u64)]) -> RecordBatch {
    let rows: Vec<_> = tags
        .iter()
        .map(|&(topic, p, batch, seq)| {
            let headers = vec![
                (SOURCE_TOPIC, topic.to_string()),
                (SOURCE_PARTITION, p.to_string()),
                (SOURCE_OFFSET, "0".to_string()),
                (SOURCE_BATCH, batch.to_string()),
                (SOURCE_SEQ, seq.to_string()),
            ];
            (Some("k"), Some("{}"), headers)
        })
        .collect();
    records(&rows)
}

fn offsets(batch: &RecordBatch) -> Vec<i64> {
    Batch::new(batch.clone()).unwrap().records().map(|r| r.offset()).collect()
}

#[test]
fn records_produced_again_are_dropped_per_source_partition_and_new_ones_counted() {
    let mut counted = Counted::default();
    // Batch 3 of src/0 (seq 0..3) and batch 1 of src/1, interleaved.
    let (first, f) = counted.filter(tagged(&[("src", 0, 3, 0), ("src", 1, 1, 0), ("src", 0, 3, 1), ("src", 0, 3, 2)])).unwrap();
    assert_eq!((offsets(&first), f), (vec![0, 1, 2, 3], Filtered::default()));
    // src/0 batch 3 produced again in full by a replay, then its batch 4; src/1 goes on.
    let (second, f) = counted.filter(tagged(&[("src", 0, 3, 0), ("src", 0, 3, 1), ("src", 1, 1, 1), ("src", 0, 3, 2), ("src", 0, 4, 0)])).unwrap();
    assert_eq!(offsets(&second), vec![2, 4]);
    assert_eq!(f.duplicates, 3);
    // A batch produced in part, then again in full: only its new records count.
    let (third, _) = counted.filter(tagged(&[("src", 0, 5, 0), ("src", 0, 5, 1), ("src", 0, 4, 0), ("src", 0, 5, 0), ("src", 0, 5, 1), ("src", 0, 5, 2)])).unwrap();
    assert_eq!(offsets(&third), vec![0, 1, 5]);
    // Through a checkpoint: the marks give the same filter.
    let mut restored = Counted::from_marks(&counted.marks());
    assert_eq!(restored, counted);
    let (after, f) = restored.filter(tagged(&[("src", 0, 5, 2), ("src", 1, 1, 1), ("src", 1, 2, 0)])).unwrap();
    assert_eq!((offsets(&after), f.duplicates), (vec![2], 2));
}

#[test]
fn records_without_tags_are_counted_as_they_come() {
    let mut counted = Counted::default();
    let (out, f) = counted.filter(records(&[(Some("k"), Some("{}"), vec![]), (Some("k"), Some("{}"), vec![])])).unwrap();
    assert_eq!(out.num_rows(), 2);
    assert_eq!(f, Filtered { duplicates: 0, untagged: 2 });
    assert!(counted.marks().is_empty());
}
