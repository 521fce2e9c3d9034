//! An in-memory [`Source`]: topics held in memory, read with Kafka's semantics, for tests
//! and the crash simulation. Offsets may have gaps (as transaction markers and compaction
//! leave them) and a partition's high watermark may lie beyond its last record (a marker
//! at the end). A consumer group's committed offsets live in a [`MemoryGroup`] that outlives
//! one source, as a broker's would outlive a process.
//!
//! It can be told to deliver records again after each seek, as a Kafka client may after a
//! reassignment, to check that the shared [`Arrivals`] filter keeps batches exact, and to
//! call a hook at each fetch (where the crash simulation stops the process model).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::RecordBatch;
use sluice_sdk::{record_schema, OffsetRange, RecordParts, RecordsBuilder};

use super::{check_fetched, Arrivals, PartitionLag, Pending, Source, SourceError};
use crate::config::StartingOffsets;

/// One record of an in-memory partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRecord {
    /// Offset.
    pub offset: i64,
    /// Timestamp, epoch ms.
    pub timestamp: Option<i64>,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
}

/// One partition: records in offset order (gaps allowed) and the high watermark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryPartition {
    /// The records, offsets strictly increasing.
    pub records: Vec<MemoryRecord>,
    /// One past the last offset used (a record or a marker).
    pub high: i64,
}

impl MemoryPartition {
    /// Append a record at the high watermark.
    pub fn push(&mut self, timestamp: Option<i64>, key: Option<Vec<u8>>, value: Option<Vec<u8>>) -> i64 {
        let offset = self.high;
        self.records.push(MemoryRecord { offset, timestamp, key, value });
        self.high += 1;
        offset
    }

    /// Use `n` offsets without records (a transaction marker, compacted records).
    pub fn skip(&mut self, n: i64) {
        self.high += n;
    }

    /// The lowest offset still held (the high watermark when empty).
    pub fn low(&self) -> i64 {
        self.records.first().map_or(self.high, |r| r.offset)
    }
}

/// Topics in memory: (topic, partition) → partition.
pub type MemoryLog = BTreeMap<(String, i32), MemoryPartition>;

/// A consumer group's committed offsets.
pub type MemoryGroup = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// Called at each fetch with what is being done; an error fails the fetch with it.
pub type FetchHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Reads a [`MemoryLog`] with Kafka's semantics.
pub struct MemorySource {
    log: Arc<MemoryLog>,
    group: MemoryGroup,
    next: BTreeMap<(String, i32), i64>,
    redeliver: bool,
    withheld: BTreeMap<(String, i32), i64>,
    hook: Option<FetchHook>,
    /// Where a partition without a committed offset starts (a consumer group's process).
    starting: StartingOffsets,
    /// Records delivered again and dropped, over the source's life.
    pub dropped: u64,
}

impl MemorySource {
    /// Resolve where each partition starts, as [`crate::kafka::KafkaSource::connect`] does:
    /// a checkpoint's position when `resume` has one (the earliest offset for a partition
    /// it does not know), else the group's committed offset, else `starting`.
    pub fn connect(log: Arc<MemoryLog>, group: MemoryGroup, resume: Option<&BTreeMap<(String, i32), i64>>, starting: StartingOffsets) -> Self {
        let committed = group.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let next = log
            .iter()
            .map(|(key, p)| {
                let start = match (resume, committed.get(key)) {
                    (Some(positions), _) => positions.get(key).copied().unwrap_or_else(|| p.low()),
                    (None, Some(&o)) => o,
                    (None, None) => match starting {
                        StartingOffsets::Earliest => p.low(),
                        StartingOffsets::Latest => p.high,
                    },
                };
                (key.clone(), start)
            })
            .collect();
        Self { log, group, next, redeliver: false, withheld: BTreeMap::new(), hook: None, starting, dropped: 0 }
    }

    /// A source of a consumer group's process: it reads the partitions the group assigns
    /// ([`Source::reassign`]), none at first.
    pub fn unassigned(log: Arc<MemoryLog>, group: MemoryGroup, starting: StartingOffsets) -> Self {
        Self { log, group, next: BTreeMap::new(), redeliver: false, withheld: BTreeMap::new(), hook: None, starting, dropped: 0 }
    }

    /// Deliver each range's records twice, and the record before it, as a client may after
    /// a seek; the batch must still hold each record once.
    pub fn redeliver_after_seek(mut self) -> Self {
        self.redeliver = true;
        self
    }

    /// Serve no record of `topic`/`partition` from `offset` on, although the high
    /// watermark says they exist: a fetch that needs them times out (as with a broker that
    /// cannot serve them).
    pub fn withhold(mut self, topic: &str, partition: i32, offset: i64) -> Self {
        self.withheld.insert((topic.to_string(), partition), offset);
        self
    }

    /// Call `hook` before and after each fetch.
    pub fn with_hook(mut self, hook: FetchHook) -> Self {
        self.hook = Some(hook);
        self
    }

    fn call_hook(&self, what: &str) -> Result<(), SourceError> {
        match &self.hook {
            Some(hook) => hook(what).map_err(SourceError::Injected),
            None => Ok(()),
        }
    }
}

impl Source for MemorySource {
    fn lag(&mut self) -> Result<Vec<PartitionLag>, SourceError> {
        Ok(self
            .next
            .iter()
            .map(|((topic, partition), &next)| PartitionLag { topic: topic.clone(), partition: *partition, next, high: self.log[&(topic.clone(), *partition)].high })
            .collect())
    }

    fn fetch(&mut self, ranges: &[OffsetRange], _timeout: Duration) -> Result<RecordBatch, SourceError> {
        self.call_hook("fetch")?;
        let wanted: Vec<&OffsetRange> = ranges.iter().filter(|r| r.until > r.from).collect();
        let mut builder = RecordsBuilder::default();
        for r in &wanted {
            let key = (r.topic.clone(), r.partition);
            let p = self.log.get(&key).ok_or_else(|| SourceError::NoTopic(r.topic.clone()))?;
            // Offsets not written yet, or withheld: the fetch times out having read up to there.
            let reached = self.withheld.get(&key).copied().filter(|&w| w < r.until).map(|w| w.max(r.from)).or((r.until > p.high).then_some(p.high));
            if let Some(reached) = reached {
                return Err(SourceError::FetchTimeout { secs: 0, pending: vec![Pending { topic: r.topic.clone(), partition: r.partition, reached, until: r.until }] });
            }
            let start = p.records.partition_point(|rec| rec.offset < r.from);
            let end = p.records.partition_point(|rec| rec.offset < r.until);
            // What a client delivers after a seek to `from`: with `redeliver`, the record
            // before the range and the range twice.
            let delivered: Vec<&MemoryRecord> = if self.redeliver {
                let before = start.saturating_sub(1);
                p.records[before..end].iter().chain(p.records[start..end].iter()).collect()
            } else {
                p.records[start..end].iter().collect()
            };
            let mut arrivals = Arrivals::starting_at(r.from);
            for rec in delivered {
                if rec.offset >= r.until || !arrivals.admit(rec.offset) {
                    continue;
                }
                builder.append(
                    RecordParts { topic: &r.topic, partition: r.partition, offset: rec.offset, timestamp: rec.timestamp, key: rec.key.as_deref(), value: rec.value.as_deref() },
                    [],
                );
            }
            self.dropped += arrivals.dropped;
        }
        let batch = if builder.is_empty() { RecordBatch::new_empty(record_schema()) } else { builder.finish() };
        check_fetched(&wanted, &batch)?;
        self.call_hook("fetched")?;
        Ok(batch)
    }

    fn commit(&mut self, ranges: &[OffsetRange]) -> Result<(), SourceError> {
        let mut group = self.group.lock().unwrap_or_else(|p| p.into_inner());
        for r in ranges.iter().filter(|r| r.until > r.from) {
            group.insert((r.topic.clone(), r.partition), r.until);
        }
        for r in ranges {
            if let Some(next) = self.next.get_mut(&(r.topic.clone(), r.partition)) {
                *next = (*next).max(r.until);
            }
        }
        Ok(())
    }

    fn known_high(&self, topic: &str, partition: i32) -> Option<i64> {
        self.log.get(&(topic.to_string(), partition)).map(|p| p.high)
    }

    fn reassign(&mut self, released: &[(String, i32)], added: &BTreeMap<(String, i32), i64>) -> Result<(), SourceError> {
        self.next.retain(|k, _| !released.contains(k));
        for (key, &next) in added {
            if !self.log.contains_key(key) {
                return Err(SourceError::NoTopic(key.0.clone()));
            }
            self.next.insert(key.clone(), next);
        }
        Ok(())
    }

    fn initial_positions(&mut self, partitions: &[(String, i32)]) -> Result<BTreeMap<(String, i32), i64>, SourceError> {
        let committed = self.group.lock().unwrap_or_else(|p| p.into_inner()).clone();
        partitions
            .iter()
            .map(|key| {
                let p = self.log.get(key).ok_or_else(|| SourceError::NoTopic(key.0.clone()))?;
                let start = committed.get(key).copied().unwrap_or(match self.starting {
                    StartingOffsets::Earliest => p.low(),
                    StartingOffsets::Latest => p.high,
                });
                Ok((key.clone(), start))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;

    fn log(parts: &[MemoryPartition]) -> Arc<MemoryLog> {
        Arc::new(parts.iter().enumerate().map(|(i, p)| (("t".to_string(), i as i32), p.clone())).collect())
    }

    fn offsets(batch: &RecordBatch) -> Vec<i64> {
        batch.column(2).as_primitive::<Int64Type>().values().to_vec()
    }

    fn range(partition: i32, from: i64, until: i64) -> OffsetRange {
        OffsetRange { topic: "t".into(), partition, from, until }
    }

    /// A partition of `n` records with a 2-offset marker after every third record.
    fn with_markers(n: usize) -> MemoryPartition {
        let mut p = MemoryPartition::default();
        for i in 0..n {
            p.push(Some(i as i64), None, Some(format!("{i}").into_bytes()));
            if i % 3 == 2 {
                p.skip(2);
            }
        }
        p
    }

    #[test]
    fn a_range_with_gaps_holds_the_records_there_are_and_ends_where_the_range_does() {
        let p = with_markers(9); // records at 0 1 2, 5 6 7, 10 11 12; high 15 (a marker at 13-14)
        assert_eq!(p.high, 15);
        let mut source = MemorySource::connect(log(&[p]), MemoryGroup::default(), None, StartingOffsets::Earliest);
        let batch = source.fetch(&[range(0, 1, 11)], Duration::ZERO).unwrap();
        assert_eq!(offsets(&batch), vec![1, 2, 5, 6, 7, 10]);
        // The last range ends at the high watermark, behind a marker: it does not wait.
        let batch = source.fetch(&[range(0, 11, 15)], Duration::ZERO).unwrap();
        assert_eq!(offsets(&batch), vec![11, 12]);
    }

    #[test]
    fn records_delivered_again_after_a_seek_reach_the_batch_once() {
        let mut source = MemorySource::connect(log(&[with_markers(30), with_markers(5)]), MemoryGroup::default(), None, StartingOffsets::Earliest).redeliver_after_seek();
        let batch = source.fetch(&[range(0, 5, 20), range(1, 0, 7)], Duration::ZERO).unwrap();
        assert_eq!(offsets(&batch), vec![5, 6, 7, 10, 11, 12, 15, 16, 17, 0, 1, 2, 5, 6]);
        assert!(source.dropped >= 10, "the source did deliver records again ({} dropped)", source.dropped);
    }

    #[test]
    fn a_restart_resumes_at_the_checkpoint_else_at_the_group_else_at_starting_offsets() {
        let l = log(&[with_markers(6), with_markers(6)]);
        let group = MemoryGroup::default();
        let fresh = MemorySource::connect(l.clone(), group.clone(), None, StartingOffsets::Latest).lag().unwrap();
        assert_eq!(fresh.iter().map(|p| (p.next, p.high)).collect::<Vec<_>>(), vec![(10, 10), (10, 10)]);
        let mut s = MemorySource::connect(l.clone(), group.clone(), None, StartingOffsets::Earliest);
        s.commit(&[range(0, 0, 5)]).unwrap();
        let next = |s: &mut MemorySource| s.lag().unwrap().iter().map(|p| p.next).collect::<Vec<_>>();
        assert_eq!(next(&mut s), vec![5, 0]);
        assert_eq!(next(&mut MemorySource::connect(l.clone(), group.clone(), None, StartingOffsets::Latest)), vec![5, 10], "the group's offset, else latest");
        let resume = BTreeMap::from([(("t".to_string(), 1), 6)]);
        assert_eq!(
            next(&mut MemorySource::connect(l, group, Some(&resume), StartingOffsets::Latest)),
            vec![0, 6],
            "a checkpoint wins; a partition it lacks starts at its earliest offset"
        );
    }
}
