//! Where a pipeline's records come from, as the batch loop sees it: partitions with a
//! position and a high watermark, exact offset ranges fetched as one Arrow batch, and
//! positions committed once a batch is done. The loop only talks to the [`Source`] trait;
//! [`crate::kafka::KafkaSource`] (librdkafka) and [`memory::MemorySource`] (tests and the
//! crash simulation) implement it. Nothing here plans batches ([`crate::plan`]) or knows
//! about plugins, sinks or checkpoints.
//!
//! What a source must take from real Kafka, whatever its transport:
//! * a range `[from, until)` may hold fewer than `until − from` records (transaction
//!   markers, compacted topics), and a range is complete once the partition's position
//!   has passed `until`, not once `until − from` records came;
//! * a record may be delivered again after a seek or a reassignment: [`Arrivals`] keeps
//!   each partition's records strictly increasing and inside what was asked for;
//! * offsets that do not exist are never waited for forever: [`SourceError::Missing`].

pub mod memory;

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::error::KafkaError;
use sluice_sdk::OffsetRange;

/// Where each partition is and how far the brokers have data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Next offset to read.
    pub next: i64,
    /// The broker's high watermark (one past the last record).
    pub high: i64,
}

/// What the batch loop needs from a source.
pub trait Source {
    /// Every partition's position (where the next batch starts) and high watermark.
    fn lag(&mut self) -> Result<Vec<PartitionLag>, SourceError>;

    /// Fetch exactly `ranges` as one batch in the record schema: partitions in plan order,
    /// records in offset order within each, each record once. Fails with
    /// [`SourceError::FetchTimeout`] when the records do not come within `timeout` (the loop
    /// waits and asks again) and [`SourceError::Missing`] when they cannot come.
    fn fetch(&mut self, ranges: &[OffsetRange], timeout: Duration) -> Result<RecordBatch, SourceError>;

    /// Mark `ranges` as done: the next [`Source::lag`] starts after them, and a consumer
    /// group's offsets (for lag tools) move to their ends.
    fn commit(&mut self, ranges: &[OffsetRange]) -> Result<(), SourceError>;

    /// The newest high watermark of a partition known without asking the brokers.
    fn known_high(&self, topic: &str, partition: i32) -> Option<i64>;

    /// Read ahead at most about `rows` records beyond the batch in flight.
    fn set_read_ahead(&mut self, _rows: usize) {}

    /// Stop reading `released` and start reading `added`, each from its position (the
    /// partitions a consumer group moves); the others continue where they are. A source
    /// over a fixed set of partitions refuses.
    fn reassign(&mut self, _released: &[(String, i32)], _added: &BTreeMap<(String, i32), i64>) -> Result<(), SourceError> {
        Err(SourceError::Inconsistent("this source reads a fixed set of partitions; it cannot take a consumer group's assignment".into()))
    }

    /// Where `partitions` start when no checkpoint says: the consumer group's committed
    /// offset, else `startingOffsets`.
    fn initial_positions(&mut self, _partitions: &[(String, i32)]) -> Result<BTreeMap<(String, i32), i64>, SourceError> {
        Err(SourceError::Inconsistent("this source has no consumer group to ask for starting positions".into()))
    }
}

/// A source failure, with what the source was doing.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// librdkafka refused the configuration.
    #[error("invalid Kafka configuration: {0}")]
    Config(KafkaError),
    /// A request to the brokers failed.
    #[error("{what}: {error} (check that the brokers in kafka.\"bootstrap.servers\" are reachable)")]
    Kafka {
        /// What was being done.
        what: String,
        /// librdkafka's error.
        error: KafkaError,
    },
    /// A source topic does not exist.
    #[error("topic `{0}` does not exist on the brokers; create it or fix source.topics")]
    NoTopic(String),
    /// Produced records were not acknowledged.
    #[error("{failed} produced records were not acknowledged by the brokers; the first error: {first}")]
    Delivery {
        /// How many.
        failed: u64,
        /// The first delivery error.
        first: String,
    },
    /// The brokers returned records that do not fit the plan.
    #[error("fetched records do not match the planned offset ranges: {0}")]
    Inconsistent(String),
    /// A fetch did not complete in time.
    #[error("fetching batch ranges timed out after {secs} s; still waiting for {}", pending.iter().map(Pending::to_string).collect::<Vec<_>>().join(", "))]
    FetchTimeout {
        /// Seconds waited.
        secs: u64,
        /// The partitions not yet read to the end of their range.
        pending: Vec<Pending>,
    },
    /// Offsets a batch needs are not on the brokers any more (or never were), so the batch
    /// cannot be read as planned.
    #[error("{0}")]
    Missing(String),
    /// The topics on the brokers do not allow what the pipeline asks (the message says
    /// what to do).
    #[error("{0}")]
    Topics(String),
    /// The in-memory source was told to fail here (the crash simulation).
    #[error("{0}")]
    Injected(String),
}

/// A partition a batch still waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// How far it was read (one past the newest offset covered).
    pub reached: i64,
    /// Where its range ends.
    pub until: i64,
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (read up to offset {} of {})", self.topic, self.partition, self.reached, self.until)
    }
}

/// Keeps what a partition delivers usable for exact ranges: records before the position
/// the partition was (re)assigned at, or at or before the last offset taken, are dropped
/// (a broker or client may deliver them again after a seek or reassignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrivals {
    /// Where the partition was assigned.
    start: i64,
    /// The next offset a new record may have.
    next: i64,
    /// Records dropped as delivered again.
    pub dropped: u64,
}

impl Arrivals {
    /// A partition assigned at `start`.
    pub fn starting_at(start: i64) -> Self {
        Self { start, next: start, dropped: 0 }
    }

    /// For the first record admitted after the assignment: the offsets it skips, when it is
    /// not at the start (`[start, offset)`: compacted or transaction-marker offsets, or a
    /// broker that skips the rest of a record batch).
    pub fn skipped_at_start(&self, offset: i64) -> Option<(i64, i64)> {
        (self.next == self.start && offset > self.start).then_some((self.start, offset))
    }

    /// Whether a delivered record at `offset` is new; a new one moves the partition on.
    pub fn admit(&mut self, offset: i64) -> bool {
        if offset < self.next {
            self.dropped += 1;
            return false;
        }
        self.next = offset + 1;
        true
    }

    /// One past the newest offset admitted (the start while none was).
    pub fn next(&self) -> i64 {
        self.next
    }
}

/// Check that a fetched batch holds, for each range in order, records of that partition
/// with strictly increasing offsets inside the range: the guard that nothing delivered
/// twice or out of place reaches the plugins.
pub fn check_fetched(ranges: &[&OffsetRange], batch: &RecordBatch) -> Result<(), SourceError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    let topics = batch.column(0).as_string::<i32>();
    let partitions = batch.column(1).as_primitive::<Int32Type>().values();
    let offsets = batch.column(2).as_primitive::<Int64Type>().values();
    let mut row = 0;
    for r in ranges {
        let mut previous = r.from - 1;
        while row < batch.num_rows() && partitions[row] == r.partition && topics.value(row) == r.topic && offsets[row] > previous && offsets[row] < r.until {
            previous = offsets[row];
            row += 1;
        }
    }
    if row < batch.num_rows() {
        return Err(SourceError::Inconsistent(format!(
            "record at row {row} ({}/{}, offset {}) is out of order or outside the planned ranges",
            topics.value(row),
            partitions[row],
            offsets[row]
        )));
    }
    Ok(())
}

/// How long a batch may wait for offsets below a partition's high watermark while the
/// source reads nothing new of that partition, before [`SourceError::Missing`].
pub const STALL_LIMIT: Duration = Duration::from_secs(120);

/// The message of a batch whose offsets below the high watermark do not arrive.
pub fn missing_offsets(topic: &str, partition: i32, reached: i64, until: i64, high: i64, waited: Duration) -> SourceError {
    SourceError::Missing(format!(
        "{topic}/{partition}: the brokers report records up to offset {high}, but none after offset {reached} arrived in {} s, and the batch needs offsets up to {until}. \
         The offsets may have been deleted by retention or compaction since the batch was planned, or the broker does not serve reads from inside a record batch \
         (tansu 0.6 does not). The batch is not committed: check the topic's retention and the broker, then restart; \
         to skip what is gone, start a new checkpoint location (sluice then starts from source.startingOffsets)",
        waited.as_secs()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(rows: &[(i32, i64)]) -> RecordBatch {
        let mut b = sluice_sdk::RecordsBuilder::default();
        for &(partition, offset) in rows {
            b.append(sluice_sdk::RecordParts { topic: "t", partition, offset, timestamp: None, key: None, value: Some(b"{}") }, []);
        }
        b.finish()
    }

    #[test]
    fn a_fetched_batch_must_follow_its_plan() {
        let plan = [OffsetRange { topic: "t".into(), partition: 0, from: 10, until: 13 }, OffsetRange { topic: "t".into(), partition: 1, from: 5, until: 8 }];
        let plan: Vec<&OffsetRange> = plan.iter().collect();
        assert!(check_fetched(&plan, &fetched(&[(0, 10), (0, 11), (0, 12), (1, 5), (1, 6), (1, 7)])).is_ok());
        assert!(check_fetched(&plan, &fetched(&[(0, 10), (0, 12), (1, 7)])).is_ok(), "gaps (compaction, transaction markers) are allowed");
        for (bad, why) in [
            (vec![(0, 10), (0, 10), (1, 5)], "a record twice"),
            (vec![(0, 11), (0, 10), (1, 5)], "out of order"),
            (vec![(0, 10), (0, 13), (1, 5)], "beyond the range"),
            (vec![(0, 9), (1, 5)], "before the range"),
            (vec![(1, 5), (0, 10)], "partitions out of plan order"),
        ] {
            let error = check_fetched(&plan, &fetched(&bad)).expect_err(why);
            assert!(matches!(error, SourceError::Inconsistent(_)), "{why}: {error}");
        }
    }

    #[test]
    fn arrivals_drop_what_was_delivered_before_and_keep_gaps() {
        let mut a = Arrivals::starting_at(10);
        let admitted: Vec<i64> = [8, 9, 10, 11, 11, 10, 14, 12, 15].into_iter().filter(|&o| a.admit(o)).collect();
        assert_eq!(admitted, vec![10, 11, 14, 15], "before the start, again, and behind the newest: dropped; a gap (12, 13) is kept");
        assert_eq!((a.next(), a.dropped), (16, 5));
    }
}
