//! Records a plugin rejected: where they came from, and the batches the dead-letter sinks
//! get.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::RecordBatch;

use super::Stage;

/// A record one stage rejected, located by its source coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Name of the plugin that rejected it.
    pub plugin: String,
    /// That plugin's version.
    pub version: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The plugin's reason.
    pub reason: String,
    /// The record as the plugin got it (one row in the record schema).
    pub record: RecordBatch,
}

/// Headers a dead letter carries besides the record's own.
pub mod dead_letter_headers {
    /// Why the plugin rejected the record.
    pub const REASON: &str = "sluice.error.reason";
    /// The plugin's name.
    pub const PLUGIN: &str = "sluice.error.plugin";
    /// The plugin's version.
    pub const VERSION: &str = "sluice.error.plugin.version";
    /// Where the record came from: topic, partition, offset.
    pub const TOPIC: &str = "sluice.source.topic";
    /// See [`TOPIC`].
    pub const PARTITION: &str = "sluice.source.partition";
    /// See [`TOPIC`].
    pub const OFFSET: &str = "sluice.source.offset";
}

/// Rejected records as dead letters for a Kafka topic, in the record schema: each record's
/// key, value and headers as they were, plus the headers in [`dead_letter_headers`] (why,
/// which plugin and version, and the source coordinates, which the topic would otherwise
/// lose).
pub fn dead_letter_records(rejected: &[Rejected]) -> RecordBatch {
    records_of(rejected, true)
}

/// Rejected records as dead letters for files: the record's columns as they were
/// (`topic`, `partition`, `offset`, `timestamp`, `key`, `value`, `headers`), then `reason`,
/// `plugin` and `plugin_version`.
pub fn dead_letter_rows(rejected: &[Rejected]) -> RecordBatch {
    let records = records_of(rejected, false);
    let mut fields: Vec<arrow_schema::FieldRef> = records.schema().fields().iter().cloned().collect();
    let mut columns = records.columns().to_vec();
    for (name, value) in [
        ("reason", &(|r: &Rejected| r.reason.clone()) as &dyn Fn(&Rejected) -> String),
        ("plugin", &|r: &Rejected| r.plugin.clone()),
        ("plugin_version", &|r: &Rejected| r.version.clone()),
    ] {
        fields.push(std::sync::Arc::new(arrow_schema::Field::new(name, arrow_schema::DataType::Utf8, false)));
        columns.push(std::sync::Arc::new(arrow_array::StringArray::from_iter_values(rejected.iter().map(value))));
    }
    RecordBatch::try_new(std::sync::Arc::new(arrow_schema::Schema::new(fields)), columns).expect("columns match their fields")
}

fn records_of(rejected: &[Rejected], with_error_headers: bool) -> RecordBatch {
    let mut out = sluice_sdk::RecordsBuilder::default();
    for r in rejected {
        let batch = sluice_sdk::Batch::new(r.record.clone()).expect("a slice of a record-schema batch");
        let record = batch.records().next().expect("one row");
        let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
        let extra = [
            (dead_letter_headers::REASON, Some(r.reason.as_bytes())),
            (dead_letter_headers::PLUGIN, Some(r.plugin.as_bytes())),
            (dead_letter_headers::VERSION, Some(r.version.as_bytes())),
            (dead_letter_headers::TOPIC, Some(r.topic.as_bytes())),
            (dead_letter_headers::PARTITION, Some(partition.as_bytes())),
            (dead_letter_headers::OFFSET, Some(offset.as_bytes())),
        ];
        let extra = if with_error_headers { &extra[..] } else { &[] };
        out.append(
            sluice_sdk::RecordParts {
                topic: record.topic(),
                partition: record.partition(),
                offset: record.offset(),
                timestamp: record.timestamp(),
                key: record.key(),
                value: record.value(),
            },
            record.headers().chain(extra.iter().copied()),
        );
    }
    out.finish()
}

/// Replace each rejected record by the source record with the same coordinates.
pub(super) fn originals(source: &RecordBatch, rejected: &mut [Rejected]) {
    if rejected.is_empty() {
        return;
    }
    let (topics, partitions, offsets) = (source.column(0).as_string::<i32>(), source.column(1).as_primitive::<Int32Type>(), source.column(2).as_primitive::<Int64Type>());
    let rows: std::collections::HashMap<(&str, i32, i64), usize> = (0..source.num_rows()).map(|i| ((topics.value(i), partitions.value(i), offsets.value(i)), i)).collect();
    for r in rejected {
        if let Some(&row) = rows.get(&(r.topic.as_str(), r.partition, r.offset)) {
            r.record = source.slice(row, 1);
        }
    }
}

pub(super) fn locate(batch: &RecordBatch, row: usize, stage: &dyn Stage, reason: String) -> Rejected {
    Rejected {
        plugin: stage.name().to_string(),
        version: stage.version().to_string(),
        topic: batch.column(0).as_string::<i32>().value(row).to_string(),
        partition: batch.column(1).as_primitive::<Int32Type>().value(row),
        offset: batch.column(2).as_primitive::<Int64Type>().value(row),
        reason,
        record: batch.slice(row, 1),
    }
}
