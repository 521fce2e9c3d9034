//! The Kafka source: the one module that owns librdkafka on the consuming side.
//!
//! It resolves where each partition starts, plans a batch as offset ranges `[from, until)`
//! from the brokers' high watermarks, fetches exactly those ranges (a consumer thread reads
//! ahead from the assigned positions, see [`prefetch`]; a batch that does not continue
//! where the last one ended re-assigns and seeks), turns them into one Arrow batch in the
//! record schema, and commits the group's offsets after the batch is written. It knows
//! nothing about plugins or sinks.

mod prefetch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use sluice_sdk::{record_schema, OffsetRange};

use self::prefetch::{Prefetcher, TakeError};
pub use self::prefetch::{is_transient, PREFETCH_ROWS};

use crate::config::{Source, StartingOffsets};

/// Consumer settings that made a 7× throughput difference on a real broker, and a 2 MiB
/// bound on librdkafka's read-ahead queue (its default is 64 MiB). With 1 M events on
/// tansu (7 runs each, medians; README "Against peers"), 2 MiB instead of
/// 16 MiB read a json-filter pipeline that drops everything in 1.45 s instead of 1.62 s,
/// with a peak RSS of 204 instead of 306 MiB; 1 MiB was slower. The pipeline's `[kafka]`
/// table overrides them.
pub const TUNED_DEFAULTS: [(&str, &str); 4] =
    [("fetch.wait.max.ms", "10"), ("fetch.queue.backoff.ms", "5"), ("queued.min.messages", "1000000"), ("queued.max.messages.kbytes", "2048")];

/// How long metadata and offset requests may take before the source reports the broker
/// as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often planning asks the brokers for high watermarks while fetch responses report
/// them (see [`KafkaSource::lag`]).
const LIST_EVERY: Duration = Duration::from_secs(1);

/// How long connecting waits for the first fetch responses, which carry each partition's
/// high watermark.
const WATERMARK_WAIT: Duration = Duration::from_secs(2);

/// How often a batch whose records do not fit the plan is read before it fails.
pub const FETCH_ATTEMPTS: u32 = 3;

/// A Kafka failure, with what the source was doing.
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
    #[error("fetching batch ranges timed out after {secs} s; still waiting for {pending}")]
    FetchTimeout {
        /// Seconds waited.
        secs: u64,
        /// Partitions and offsets not yet reached.
        pending: String,
    },
}

fn failed(what: impl Into<String>) -> impl FnOnce(KafkaError) -> SourceError {
    let what = what.into();
    move |error| SourceError::Kafka { what, error }
}

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

/// Reads exact offset ranges from Kafka.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer>,
    prefetcher: Option<Prefetcher>,
    /// Next offset to plan, per (topic, partition), in a stable order.
    next: BTreeMap<(String, i32), i64>,
    max_offsets_per_trigger: Option<u64>,
    /// Read-ahead limit, records.
    read_ahead: usize,
    /// The high watermarks the brokers listed last (ListOffsets), per partition, and when.
    listed: BTreeMap<(String, i32), i64>,
    listed_at: Option<std::time::Instant>,
}

impl KafkaSource {
    /// Connect, discover the partitions of `source.topics`, and resolve where each starts:
    /// from a checkpoint's positions when `resume` has them (a partition the checkpoint
    /// does not know, added since, starts at its earliest offset); without a checkpoint,
    /// the group's committed offset if it has one, else `startingOffsets`.
    pub fn connect(
        source: &Source,
        properties: &BTreeMap<String, String>,
        resume: Option<&BTreeMap<(String, i32), i64>>,
    ) -> Result<Self, SourceError> {
        let mut config = ClientConfig::new();
        for (k, v) in TUNED_DEFAULTS {
            config.set(k, v);
        }
        for (k, v) in properties {
            config.set(k, v);
        }
        config
            .set("group.id", &source.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = config.create().map_err(SourceError::Config)?;

        let mut partitions = TopicPartitionList::new();
        for topic in &source.topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                .map_err(failed(format!("reading metadata of topic `{topic}`")))?;
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(SourceError::NoTopic(topic.clone()));
            };
            if t.error().is_some() || t.partitions().is_empty() {
                return Err(SourceError::NoTopic(topic.clone()));
            }
            for p in t.partitions() {
                partitions.add_partition(topic, p.id());
            }
        }
        let committed = consumer
            .committed_offsets(partitions.clone(), REQUEST_TIMEOUT)
            .map_err(failed(format!("reading committed offsets of group `{}`", source.group_id)))?;
        let mut next = BTreeMap::new();
        for e in committed.elements() {
            let key = (e.topic().to_string(), e.partition());
            let start = match (resume, e.offset()) {
                (Some(positions), _) if positions.contains_key(&key) => positions[&key],
                (Some(_), _) => {
                    let (low, _) = consumer
                        .fetch_watermarks(e.topic(), e.partition(), REQUEST_TIMEOUT)
                        .map_err(failed(format!("reading offsets of {}/{}", e.topic(), e.partition())))?;
                    tracing::info!("{}/{} is not in the checkpoint (a new partition or topic): reading it from its earliest offset {low}", e.topic(), e.partition());
                    low
                }
                (None, Offset::Offset(o)) => o,
                (None, _) => {
                    let (low, high) = consumer
                        .fetch_watermarks(e.topic(), e.partition(), REQUEST_TIMEOUT)
                        .map_err(failed(format!("reading offsets of {}/{}", e.topic(), e.partition())))?;
                    match source.starting_offsets {
                        StartingOffsets::Earliest => low,
                        StartingOffsets::Latest => high,
                    }
                }
            };
            next.insert((e.topic().to_string(), e.partition()), start);
        }
        let consumer = Arc::new(consumer);
        let positions: Vec<_> = next.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let prefetcher = Prefetcher::start(consumer.clone(), &positions).map_err(failed("assigning the source's partitions"))?;
        let source = Self { consumer, prefetcher: Some(prefetcher), next, max_offsets_per_trigger: source.max_offsets_per_trigger, read_ahead: PREFETCH_ROWS, listed: BTreeMap::new(), listed_at: None };
        source.await_fetched_watermarks(WATERMARK_WAIT);
        Ok(source)
    }

    /// Wait (at most `limit`) until the first fetch response of every partition has told
    /// librdkafka its high watermark.
    fn await_fetched_watermarks(&self, limit: Duration) {
        let started = std::time::Instant::now();
        while started.elapsed() < limit && self.next.keys().any(|(t, p)| fetched_high_watermark(&self.consumer, t, *p).is_none()) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Current position and high watermark of every partition: the larger of what the
    /// brokers answer to a ListOffsets request and what their last fetch response said
    /// (some brokers, e.g. tansu 0.6, under-report the former). The brokers are asked at
    /// most every [`LIST_EVERY`] while every partition's fetch responses report a
    /// watermark: those are at most a fetch wait old while the consumer reads, and asking
    /// per batch cost a round trip per partition on every batch. When the request fails
    /// (a slow or restarting broker) but a fetch response has reported a watermark, that
    /// one is used and a warning logged: records below it exist, so the plan stays exact
    /// and only less is planned. Without either, the error is returned.
    pub fn lag(&mut self) -> Result<Vec<PartitionLag>, SourceError> {
        let fetched: Vec<Option<i64>> = self.next.keys().map(|(t, p)| fetched_high_watermark(&self.consumer, t, *p)).collect();
        let fresh = self.listed_at.is_some_and(|at| at.elapsed() < LIST_EVERY) && fetched.iter().all(Option::is_some);
        let mut lag = Vec::with_capacity(self.next.len());
        let mut listed_all = true;
        for (((topic, partition), &next), fetched) in self.next.iter().zip(fetched) {
            let high = if fresh {
                self.listed.get(&(topic.clone(), *partition)).copied().unwrap_or(-1).max(fetched.unwrap_or(-1))
            } else {
                match (self.consumer.fetch_watermarks(topic, *partition, REQUEST_TIMEOUT), fetched) {
                    (Ok((_, listed)), fetched) => {
                        self.listed.insert((topic.clone(), *partition), listed);
                        listed.max(fetched.unwrap_or(-1))
                    }
                    (Err(e), Some(fetched)) => {
                        tracing::warn!("reading the high watermark of {topic}/{partition} failed ({e}); planning up to {fetched}, the last one a fetch response reported");
                        listed_all = false;
                        fetched
                    }
                    (Err(e), None) => return Err(failed(format!("reading the high watermark of {topic}/{partition}"))(e)),
                }
            };
            lag.push(PartitionLag { topic: topic.clone(), partition: *partition, next, high });
        }
        if !fresh && listed_all {
            self.listed_at = Some(std::time::Instant::now());
        }
        Ok(lag)
    }

    /// Records left on the brokers once `ranges` are done: from each partition's planned
    /// position (`lag`, as planned) to the newest high watermark a fetch response reported
    /// (no request is made; the plan's watermark where none came).
    pub fn remaining_after(&self, lag: &[PartitionLag], ranges: &[OffsetRange]) -> u64 {
        self.positions_and_highs(lag, ranges).into_iter().map(|(_, next, high)| (high - next).max(0) as u64).sum()
    }

    /// Per partition of `lag`: its position once `ranges` are done and the newest high
    /// watermark known (as [`Self::remaining_after`]).
    pub fn positions_and_highs<'l>(&self, lag: &'l [PartitionLag], ranges: &[OffsetRange]) -> Vec<(&'l PartitionLag, i64, i64)> {
        lag.iter()
            .map(|p| {
                let until = ranges.iter().find(|r| r.topic == p.topic && r.partition == p.partition).map_or(p.next, |r| r.until);
                let high = fetched_high_watermark(&self.consumer, &p.topic, p.partition).unwrap_or(p.high).max(p.high);
                (p, until, high)
            })
            .collect()
    }

    /// Read ahead at most `rows` records beyond the batch in flight (capped at
    /// [`PREFETCH_ROWS`]): when rate control plans small batches, records it holds back
    /// stay in Kafka instead of in memory.
    pub fn set_read_ahead(&mut self, rows: usize) {
        self.read_ahead = rows;
        if let Some(p) = &self.prefetcher {
            p.set_limit(rows);
        }
    }

    /// Change `maxOffsetsPerTrigger` (live tuning).
    pub fn set_max_offsets_per_trigger(&mut self, max: Option<u64>) {
        self.max_offsets_per_trigger = max;
    }

    /// Plan the next batch from `lag`: every partition from its position to its high
    /// watermark, scaled down by share of lag when `maxOffsetsPerTrigger` caps the batch.
    pub fn plan(&self, lag: &[PartitionLag]) -> Vec<OffsetRange> {
        plan_ranges(lag, self.max_offsets_per_trigger)
    }

    /// Fetch exactly `ranges` and return them as one batch, partitions in plan order and
    /// records in offset order within each.
    /// Records that do not fit the plan (out of order, twice, beyond the range) are a
    /// broker or client fault: the ranges are read again from their starts, up to
    /// [`FETCH_ATTEMPTS`] times in all, before the batch fails with the reason.
    pub fn fetch(&mut self, ranges: &[OffsetRange], timeout: Duration) -> Result<RecordBatch, SourceError> {
        let wanted: Vec<&OffsetRange> = ranges.iter().filter(|r| r.until > r.from).collect();
        if wanted.is_empty() {
            return Ok(RecordBatch::new_empty(record_schema()));
        }
        let mut attempt = 1;
        loop {
            match self.fetch_once(&wanted, timeout) {
                Err(SourceError::Inconsistent(why)) if attempt < FETCH_ATTEMPTS => {
                    tracing::warn!("fetched records do not match the plan ({why}); reading the batch's ranges again");
                    // Dropping the reader makes the next attempt assign at the ranges' starts.
                    self.prefetcher = None;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn fetch_once(&mut self, wanted: &[&OffsetRange], timeout: Duration) -> Result<RecordBatch, SourceError> {
        if !self.prefetcher.as_ref().is_some_and(|p| p.continues(wanted)) {
            // First batch, or one that does not continue where the last ended: read from
            // the ranges' starts (other partitions from where they are).
            let mut positions: BTreeMap<(String, i32), i64> = match self.prefetcher.take() {
                Some(p) => p.positions().into_iter().collect(),
                None => self.next.clone(),
            };
            for r in wanted {
                positions.insert((r.topic.clone(), r.partition), r.from);
            }
            let positions: Vec<_> = positions.into_iter().collect();
            let prefetcher = Prefetcher::start(self.consumer.clone(), &positions).map_err(failed("assigning the batch's partitions"))?;
            prefetcher.set_limit(self.read_ahead);
            self.prefetcher = Some(prefetcher);
        }
        let prefetcher = self.prefetcher.as_ref().expect("started above");
        let chunks = prefetcher.take(wanted, timeout).map_err(|e| match e {
            TakeError::Kafka(error) => SourceError::Kafka { what: "fetching records".into(), error },
            TakeError::Timeout(pending) => SourceError::FetchTimeout { secs: timeout.as_secs(), pending },
        })?;
        let batch = arrow_select::concat::concat_batches(&record_schema(), &chunks).expect("chunks share the record schema");
        check_fetched(wanted, &batch)?;
        Ok(batch)
    }

    /// Where each partition continues once `ranges` are done.
    pub fn positions_after(&self, ranges: &[OffsetRange]) -> Vec<((String, i32), i64)> {
        let mut next = self.next.clone();
        for r in ranges {
            if let Some(n) = next.get_mut(&(r.topic.clone(), r.partition)) {
                *n = (*n).max(r.until);
            }
        }
        next.into_iter().collect()
    }

    /// Mark `ranges` as done: the next plan starts after them, and the consumer group's
    /// offsets (for lag tools) move to their ends.
    pub fn commit(&mut self, ranges: &[OffsetRange]) -> Result<(), SourceError> {
        let mut tpl = TopicPartitionList::new();
        for r in ranges.iter().filter(|r| r.until > r.from) {
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.until))
                .map_err(failed("building the commit"))?;
        }
        if tpl.count() > 0 {
            self.consumer.commit(&tpl, CommitMode::Sync).map_err(failed("committing consumer group offsets"))?;
        }
        for r in ranges {
            if let Some(next) = self.next.get_mut(&(r.topic.clone(), r.partition)) {
                *next = (*next).max(r.until);
            }
        }
        Ok(())
    }
}

/// The high watermark of a partition as the last fetch response reported it, if one came.
fn fetched_high_watermark(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::bindings::{rd_kafka_get_watermark_offsets, rd_kafka_resp_err_t};
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic` is NUL-terminated
    // and outlives the call, and `low`/`high` are valid out-parameters. The call only reads
    // librdkafka's cached partition state.
    let error = unsafe { rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (error == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// Check that a fetched batch holds, for each range in order, records of that partition
/// with strictly increasing offsets inside the range: a cheap guard against a broker or
/// client handing back records twice or out of place.
fn check_fetched(ranges: &[&OffsetRange], batch: &RecordBatch) -> Result<(), SourceError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    let partitions = batch.column(1).as_primitive::<Int32Type>().values();
    let offsets = batch.column(2).as_primitive::<Int64Type>().values();
    let mut row = 0;
    for r in ranges {
        let mut previous = r.from - 1;
        while row < batch.num_rows() && partitions[row] == r.partition && offsets[row] > previous && offsets[row] < r.until {
            previous = offsets[row];
            row += 1;
        }
    }
    if row < batch.num_rows() {
        return Err(SourceError::Inconsistent(format!(
            "record at row {row} (partition {}, offset {}) is out of order or outside the planned ranges",
            partitions[row], offsets[row]
        )));
    }
    Ok(())
}

/// Split a budget over partitions in proportion to their lag (Spark's
/// `maxOffsetsPerTrigger`); without a budget every partition is read to its high watermark.
pub fn plan_ranges(lag: &[PartitionLag], max_records: Option<u64>) -> Vec<OffsetRange> {
    let lags: Vec<u64> = lag.iter().map(|p| (p.high - p.next).max(0) as u64).collect();
    let total: u64 = lags.iter().sum();
    let shares: Vec<u64> = match max_records {
        Some(max) if total > max => {
            let mut shares: Vec<u64> = lags.iter().map(|&l| (l as u128 * max as u128 / total as u128) as u64).collect();
            // Hand the rounding remainder to the partitions with the most lag left.
            let mut left = max - shares.iter().sum::<u64>();
            let mut order: Vec<usize> = (0..lags.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(lags[i] - shares[i]));
            for i in order {
                if left == 0 {
                    break;
                }
                if shares[i] < lags[i] {
                    shares[i] += 1;
                    left -= 1;
                }
            }
            shares
        }
        _ => lags,
    };
    lag.iter()
        .zip(shares)
        .map(|(p, n)| OffsetRange { topic: p.topic.clone(), partition: p.partition, from: p.next, until: p.next + n as i64 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(parts: &[(i64, i64)]) -> Vec<PartitionLag> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(next, high))| PartitionLag { topic: "t".into(), partition: i as i32, next, high })
            .collect()
    }

    fn sizes(ranges: &[OffsetRange]) -> Vec<i64> {
        ranges.iter().map(|r| r.until - r.from).collect()
    }

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
    fn without_a_cap_every_partition_is_read_to_its_high_watermark() {
        let ranges = plan_ranges(&lag(&[(0, 10), (5, 5), (7, 100)]), None);
        assert_eq!(sizes(&ranges), vec![10, 0, 93]);
        assert_eq!((ranges[2].from, ranges[2].until), (7, 100));
    }

    #[test]
    fn a_cap_is_shared_by_lag_and_used_completely() {
        let ranges = plan_ranges(&lag(&[(0, 100), (0, 300), (0, 0)]), Some(100));
        assert_eq!(sizes(&ranges), vec![25, 75, 0]);
        let ranges = plan_ranges(&lag(&[(0, 1), (0, 1), (0, 1)]), Some(2));
        assert_eq!(sizes(&ranges).iter().sum::<i64>(), 2);
        let ranges = plan_ranges(&lag(&[(0, 3), (0, 3), (0, 3)]), Some(10));
        assert_eq!(sizes(&ranges), vec![3, 3, 3], "a cap above the lag reads everything");
    }
}

/// One record to produce.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Target partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Value bytes.
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// Counts records the brokers did not acknowledge.
#[derive(Default)]
pub struct DeliveryTracker {
    failed: std::sync::atomic::AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for DeliveryTracker {}

impl rdkafka::producer::ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.first_error.lock().expect("delivery lock").get_or_insert_with(|| error.to_string());
        }
    }
}

/// A producer that knows whether everything it sent arrived: for the Kafka sink, the
/// demo's generator, tests and benchmarks.
pub struct Loader {
    producer: rdkafka::producer::BaseProducer<DeliveryTracker>,
}

impl Loader {
    /// Connect to `bootstrap` with librdkafka `extra` settings.
    pub fn connect(bootstrap: &str, extra: &[(&str, &str)]) -> Result<Self, SourceError> {
        let mut properties: Vec<(&str, &str)> = vec![("bootstrap.servers", bootstrap)];
        properties.extend_from_slice(extra);
        Self::with_properties(properties)
    }

    /// Connect with these librdkafka properties (after sluice's producer defaults).
    pub fn with_properties<'p>(properties: impl IntoIterator<Item = (&'p str, &'p str)>) -> Result<Self, SourceError> {
        let mut config = ClientConfig::new();
        config.set("linger.ms", "5").set("queue.buffering.max.messages", "1000000");
        for (k, v) in properties {
            config.set(k, v);
        }
        Ok(Self { producer: config.create_with_context(DeliveryTracker::default()).map_err(SourceError::Config)? })
    }

    /// Queue one record, waiting while librdkafka's queue is full.
    pub fn send(&self, topic: &str, record: Outgoing<'_>) -> Result<(), SourceError> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::BaseRecord;
        let mut base: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(p) = record.partition {
            base = base.partition(p);
        }
        if let Some(k) = record.key {
            base = base.key(k);
        }
        if let Some(v) = record.value {
            base = base.payload(v);
        }
        if !record.headers.is_empty() {
            let headers = record
                .headers
                .iter()
                .fold(OwnedHeaders::new_with_capacity(record.headers.len()), |h, (key, value)| h.insert(Header { key, value: *value }));
            base = base.headers(headers);
        }
        let mut attempt = base;
        loop {
            match self.producer.send(attempt) {
                Ok(()) => {
                    self.producer.poll(Duration::ZERO);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    self.producer.poll(Duration::from_millis(5));
                    attempt = back;
                }
                Err((error, _)) => return Err(SourceError::Kafka { what: format!("producing to `{topic}`"), error }),
            }
        }
    }

    fn check_deliveries(&self) -> Result<(), SourceError> {
        use rdkafka::producer::Producer as _;
        let tracker = self.producer.context();
        let failed_count = tracker.failed.swap(0, std::sync::atomic::Ordering::SeqCst);
        if failed_count > 0 {
            let first = tracker.first_error.lock().expect("delivery lock").take().unwrap_or_default();
            return Err(SourceError::Delivery { failed: failed_count, first });
        }
        Ok(())
    }

    /// Wait until every queued record is acknowledged; an error if any was not.
    pub fn flush(&self, timeout: Duration) -> Result<(), SourceError> {
        use rdkafka::producer::Producer as _;
        self.producer.flush(timeout).map_err(failed("waiting for produced records to be acknowledged"))?;
        self.check_deliveries()
    }
}
