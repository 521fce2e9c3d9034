//! The Kafka source: the one module that owns librdkafka on the consuming side.
//!
//! It resolves where each partition starts, plans a batch as offset ranges `[from, until)`
//! from the brokers' high watermarks, fetches exactly those ranges (a consumer thread reads
//! ahead from the assigned positions, see [`prefetch`]; a batch that does not continue
//! where the last one ended re-assigns and seeks), turns them into one Arrow batch in the
//! record schema, and commits the group's offsets after the batch is written. It knows
//! nothing about plugins or sinks.

mod group;
mod prefetch;

pub use self::group::{Changes, Membership};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};
use sluice_sdk::{record_schema, OffsetRange};

pub use self::prefetch::{is_transient, PREFETCH_ROWS};
use self::prefetch::{Prefetcher, TakeError};

use crate::config::{Source as SourceConfig, StartingOffsets};
use crate::source::{check_fetched, Source};
pub use crate::source::{PartitionLag, SourceError};

/// Consumer settings that made a 7× throughput difference on a real broker, and a 2 MiB
/// bound on librdkafka's read-ahead queue (its default is 64 MiB). With 1 M events on
/// tansu (7 runs each, medians; README "Against peers"), 2 MiB instead of
/// 16 MiB read a json-filter pipeline that drops everything in 1.45 s instead of 1.62 s,
/// with a peak RSS of 204 instead of 306 MiB; 1 MiB was slower. The pipeline's `[kafka]`
/// table overrides them.
pub const TUNED_DEFAULTS: [(&str, &str); 4] =
    [("fetch.wait.max.ms", "10"), ("fetch.queue.backoff.ms", "5"), ("queued.min.messages", "1000000"), ("queued.max.messages.kbytes", "2048")];

/// The pipeline's librdkafka table for a client that only produces or administers (a
/// sink, the repartition topic's producer and admin): without the consumer-only fetch
/// defaults sluice adds, which librdkafka would warn about.
pub fn producer_properties(kafka: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    kafka.iter().filter(|(k, _)| !TUNED_DEFAULTS.iter().any(|(d, _)| d == k)).map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// How long metadata and offset requests may take before the source reports the broker
/// as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often planning asks the brokers for high watermarks while fetch responses report
/// them (see [`KafkaSource::lag`]).
const LIST_EVERY: Duration = Duration::from_secs(1);

/// How long connecting waits for the first fetch responses, which carry each partition's
/// high watermark.
const WATERMARK_WAIT: Duration = Duration::from_secs(2);

/// How long connecting waits for the consumer group's coordinator to be ready.
const COORDINATOR_WAIT: Duration = Duration::from_secs(60);

/// Run `request` until it succeeds, fails for good, or `limit` has passed while it failed
/// with errors that go away by themselves ([`is_transient`]).
fn while_transient<T>(limit: Duration, mut request: impl FnMut() -> Result<T, KafkaError>) -> Result<T, KafkaError> {
    let started = std::time::Instant::now();
    let mut warned = false;
    loop {
        match request() {
            Err(e) if is_transient(&e) && started.elapsed() < limit => {
                if !warned {
                    tracing::warn!("the brokers are not ready ({e}); asking again for up to {} s", limit.as_secs());
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// How often a batch whose records do not fit the plan is read before it fails.
pub const FETCH_ATTEMPTS: u32 = 3;

fn failed(what: impl Into<String>) -> impl FnOnce(KafkaError) -> SourceError {
    let what = what.into();
    move |error| SourceError::Kafka { what, error }
}

/// The source consumer's context: it reports consumer-group offset commits that failed
/// (they are asynchronous, see [`KafkaSource::commit`](Source::commit)).
#[derive(Debug, Default)]
pub struct SourceContext;

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!("committing the consumer group's offsets failed ({e}); they serve lag tools only, the checkpoint keeps the pipeline's position");
        }
    }
}

/// The consumer of the source.
pub type SourceConsumer = BaseConsumer<SourceContext>;

/// Reads exact offset ranges from Kafka.
pub struct KafkaSource {
    consumer: Arc<SourceConsumer>,
    prefetcher: Option<Prefetcher>,
    /// Next offset to plan, per (topic, partition), in a stable order.
    next: BTreeMap<(String, i32), i64>,
    /// Read-ahead limit, records.
    read_ahead: usize,
    /// The high watermarks the brokers listed last (ListOffsets), per partition, and when.
    listed: BTreeMap<(String, i32), i64>,
    listed_at: Option<std::time::Instant>,
    /// Where a partition without a checkpoint or group offset starts.
    starting_offsets: StartingOffsets,
    group_id: String,
    /// Whether this consumer commits the group's offsets (not in a consumer-group run,
    /// where the group's member does).
    group_commits: bool,
}

impl KafkaSource {
    /// Connect, discover the partitions of `source.topics`, and resolve where each starts:
    /// from a checkpoint's positions when `resume` has them (a partition the checkpoint
    /// does not know, added since, starts at its earliest offset); without a checkpoint,
    /// the group's committed offset if it has one, else `startingOffsets`.
    pub fn connect(source: &SourceConfig, properties: &BTreeMap<String, String>, resume: Option<&BTreeMap<(String, i32), i64>>) -> Result<Self, SourceError> {
        let mut this = Self::unassigned(source, properties)?;
        let mut partitions = Vec::new();
        for topic in &source.topics {
            let metadata = this.consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(failed(format!("reading metadata of topic `{topic}`")))?;
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(SourceError::NoTopic(topic.clone()));
            };
            if t.error().is_some() || t.partitions().is_empty() {
                return Err(SourceError::NoTopic(topic.clone()));
            }
            partitions.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
        }
        let next = match resume {
            None => this.initial_positions(&partitions)?,
            Some(positions) => {
                let mut next = BTreeMap::new();
                for key in partitions {
                    let start = match positions.get(&key) {
                        Some(&p) => p,
                        None => {
                            let (low, _) = this.consumer.fetch_watermarks(&key.0, key.1, REQUEST_TIMEOUT).map_err(failed(format!("reading offsets of {}/{}", key.0, key.1)))?;
                            tracing::info!("{}/{} is not in the checkpoint (a new partition or topic): reading it from its earliest offset {low}", key.0, key.1);
                            low
                        }
                    };
                    next.insert(key, start);
                }
                next
            }
        };
        this.reassign(&[], &next)?;
        this.group_commits = true;
        Ok(this)
    }

    /// Connect without reading any partition yet: in a consumer-group run the group says
    /// which partitions this process reads ([`Source::assign`]); their group offsets are
    /// committed by the group's member, not by this consumer.
    pub fn unassigned(source: &SourceConfig, properties: &BTreeMap<String, String>) -> Result<Self, SourceError> {
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
        let consumer: SourceConsumer = config.create_with_context(SourceContext).map_err(SourceError::Config)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            prefetcher: None,
            next: BTreeMap::new(),
            read_ahead: PREFETCH_ROWS,
            listed: BTreeMap::new(),
            listed_at: None,
            starting_offsets: source.starting_offsets,
            group_id: source.group_id.clone(),
            group_commits: false,
        })
    }

    /// Wait (at most `limit`) until the first fetch response of every partition has told
    /// librdkafka its high watermark.
    fn await_fetched_watermarks(&self, limit: Duration) {
        let started = std::time::Instant::now();
        while started.elapsed() < limit && self.next.keys().any(|(t, p)| fetched_high_watermark(&self.consumer, t, *p).is_none()) {
            std::thread::sleep(Duration::from_millis(5));
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
}

impl Source for KafkaSource {
    /// Current position and high watermark of every partition: the larger of what the
    /// brokers answer to a ListOffsets request and what their last fetch response said
    /// (some brokers, e.g. tansu 0.6, under-report the former). The brokers are asked at
    /// most every [`LIST_EVERY`] while every partition's fetch responses report a
    /// watermark: those are at most a fetch wait old while the consumer reads, and asking
    /// per batch cost a round trip per partition on every batch. When the request fails
    /// (a slow or restarting broker) but a fetch response has reported a watermark, that
    /// one is used and a warning logged: records below it exist, so the plan stays exact
    /// and only less is planned. Without either, the error is returned.
    fn lag(&mut self) -> Result<Vec<PartitionLag>, SourceError> {
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

    /// Fetch exactly `ranges` and return them as one batch, partitions in plan order and
    /// records in offset order within each.
    /// Records that do not fit the plan (out of order, twice, beyond the range) are a
    /// broker or client fault: the ranges are read again from their starts, up to
    /// [`FETCH_ATTEMPTS`] times in all, before the batch fails with the reason.
    fn fetch(&mut self, ranges: &[OffsetRange], timeout: Duration) -> Result<RecordBatch, SourceError> {
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

    /// Mark `ranges` as done: the next plan starts after them, and the consumer group's
    /// offsets (for lag tools) move to their ends. That commit is asynchronous: a
    /// synchronous one waits without a time limit, and after a broker was paused it was
    /// seen to wait forever, holding the batch loop and a stop with it. A failed commit is
    /// logged by [`SourceContext`]; closing the consumer waits for commits in flight.
    fn commit(&mut self, ranges: &[OffsetRange]) -> Result<(), SourceError> {
        if self.group_commits {
            commit_group_offsets(self.consumer.as_ref(), ranges)?;
        }
        for r in ranges {
            if let Some(next) = self.next.get_mut(&(r.topic.clone(), r.partition)) {
                *next = (*next).max(r.until);
            }
        }
        Ok(())
    }

    /// Stop reading `released`, start reading `added` from their positions; the other
    /// partitions continue where the next batch starts (what was read ahead is read again).
    fn reassign(&mut self, released: &[(String, i32)], added: &BTreeMap<(String, i32), i64>) -> Result<(), SourceError> {
        self.prefetcher = None;
        self.next.retain(|k, _| !released.contains(k));
        self.next.extend(added.iter().map(|(k, v)| (k.clone(), *v)));
        let next = &self.next;
        self.listed.retain(|k, _| next.contains_key(k));
        if self.next.is_empty() {
            return self.consumer.unassign().map_err(failed("releasing the source's partitions"));
        }
        let starts: Vec<_> = self.next.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let prefetcher = Prefetcher::start(self.consumer.clone(), &starts).map_err(failed("assigning the source's partitions"))?;
        prefetcher.set_limit(self.read_ahead);
        self.prefetcher = Some(prefetcher);
        self.await_fetched_watermarks(WATERMARK_WAIT);
        Ok(())
    }

    /// Where partitions without a checkpoint start: the consumer group's committed offset,
    /// else `startingOffsets`.
    fn initial_positions(&mut self, partitions: &[(String, i32)]) -> Result<BTreeMap<(String, i32), i64>, SourceError> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in partitions {
            tpl.add_partition(topic, *partition);
        }
        // A broker that has just started (or moved the group's coordinator) answers
        // "not coordinator" or "loading" for a while: ask again until it knows.
        let committed = while_transient(COORDINATOR_WAIT, || self.consumer.committed_offsets(tpl.clone(), REQUEST_TIMEOUT))
            .map_err(failed(format!("reading committed offsets of group `{}`", self.group_id)))?;
        let mut next = BTreeMap::new();
        for e in committed.elements() {
            let start = match e.offset() {
                Offset::Offset(o) => o,
                _ => {
                    let (low, high) =
                        self.consumer.fetch_watermarks(e.topic(), e.partition(), REQUEST_TIMEOUT).map_err(failed(format!("reading offsets of {}/{}", e.topic(), e.partition())))?;
                    match self.starting_offsets {
                        StartingOffsets::Earliest => low,
                        StartingOffsets::Latest => high,
                    }
                }
            };
            next.insert((e.topic().to_string(), e.partition()), start);
        }
        Ok(next)
    }

    /// The newest high watermark a fetch response reported (no request is made).
    fn known_high(&self, topic: &str, partition: i32) -> Option<i64> {
        fetched_high_watermark(&self.consumer, topic, partition)
    }

    /// Read ahead at most `rows` records beyond the batch in flight (capped at
    /// [`PREFETCH_ROWS`]): when rate control plans small batches, records it holds back
    /// stay in Kafka instead of in memory.
    fn set_read_ahead(&mut self, rows: usize) {
        self.read_ahead = rows;
        if let Some(p) = &self.prefetcher {
            p.set_limit(rows);
        }
    }
}

/// Commit a consumer group's offsets to the ends of `ranges` (for lag tools),
/// asynchronously: a synchronous commit waits without a time limit (see
/// [`KafkaSource::commit`](Source::commit)); the consumer's context logs a failed one.
fn commit_group_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, ranges: &[OffsetRange]) -> Result<(), SourceError> {
    let mut tpl = TopicPartitionList::new();
    for r in ranges.iter().filter(|r| r.until > r.from) {
        tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.until)).map_err(failed("building the commit"))?;
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Async).map_err(failed("committing consumer group offsets"))?;
    }
    Ok(())
}

/// The high watermark of a partition as the last fetch response reported it, if one came.
fn fetched_high_watermark(consumer: &SourceConsumer, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::bindings::{rd_kafka_get_watermark_offsets, rd_kafka_resp_err_t};
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic` is NUL-terminated
    // and outlives the call, and `low`/`high` are valid out-parameters. The call only reads
    // librdkafka's cached partition state.
    let error = unsafe { rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (error == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
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

impl ClientContext for DeliveryTracker {}

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
        self.send_at(topic, record, None)
    }

    /// [`Loader::send`] with the record's timestamp (epoch ms); `None`: the time it is sent.
    pub fn send_at(&self, topic: &str, record: Outgoing<'_>, timestamp: Option<i64>) -> Result<(), SourceError> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::BaseRecord;
        let mut base: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(t) = timestamp {
            base = base.timestamp(t);
        }
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
            let headers = record.headers.iter().fold(OwnedHeaders::new_with_capacity(record.headers.len()), |h, (key, value)| h.insert(Header { key, value: *value }));
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

    /// The producer, for a sink's transactions.
    pub(crate) fn producer(&self) -> &rdkafka::producer::BaseProducer<DeliveryTracker> {
        &self.producer
    }

    /// An error if a record sent since the last check was not delivered (the count is reset).
    pub(crate) fn check_deliveries(&self) -> Result<(), SourceError> {
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
