//! The consumer's own thread. It keeps reading every assigned partition ahead of the batch
//! loop into Arrow chunks, so fetching overlaps the plugins' and the sink's work. A batch
//! takes exactly its offset ranges out of the chunks (zero-copy slices); whatever was read
//! beyond them stays for the next batch. With more than its read-ahead limit buffered
//! (at most [`PREFETCH_ROWS`] records; less when rate control plans small batches, see
//! [`Prefetcher::set_limit`]) and nothing the batch in flight still waits for, the
//! thread stops taking
//! records from librdkafka (whose own queue is bounded by `queued.max.messages.kbytes`)
//! until the loop catches up. It never pauses partitions: librdkafka could lose the
//! position of records queued at the moment of a pause.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::RecordBatch;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_sdk::{OffsetRange, RecordParts, RecordsBuilder};

use super::SourceConsumer;
use crate::source::{Arrivals, Pending};

/// Records read ahead, over all partitions, before the consumer thread waits (the largest
/// read-ahead limit).
pub const PREFETCH_ROWS: usize = 500_000;
/// How long the consumer thread waits before it looks again whether to read on.
const THROTTLE: Duration = Duration::from_millis(2);
/// The consumer thread hands over what it read at least this often …
const HANDOVER_EVERY: Duration = Duration::from_millis(5);
/// … or after this many records, whichever comes first.
const HANDOVER_ROWS: usize = 4096;
/// Records between looks at the clock for [`HANDOVER_EVERY`].
const CLOCK_EVERY: usize = 64;
/// How long one poll waits for a record.
const POLL: Duration = Duration::from_millis(20);

type Key = (String, i32);

/// What one partition has read ahead.
struct Buffer {
    chunks: VecDeque<RecordBatch>,
    /// One past the last offset buffered (the start position while nothing was read).
    covered: i64,
    /// Where the next batch must start to be served from this buffer.
    consumed: i64,
    rows: usize,
    /// The offset a waiting batch needs the buffer to reach; read on until it is.
    demand: i64,
}

impl Buffer {
    fn new(start: i64) -> Self {
        Self { chunks: VecDeque::new(), covered: start, consumed: start, rows: 0, demand: start }
    }

    /// Take the rows with offsets in `[from, until)`; rows before `from` are dropped.
    fn take(&mut self, from: i64, until: i64, out: &mut Vec<RecordBatch>) {
        while let Some(chunk) = self.chunks.pop_front() {
            let offsets = chunk.column(OFFSET_COLUMN).as_primitive::<Int64Type>().values();
            let start = offsets.partition_point(|&o| o < from);
            let end = offsets.partition_point(|&o| o < until);
            if end > start {
                out.push(chunk.slice(start, end - start));
            }
            self.rows -= end;
            if end < chunk.num_rows() {
                self.chunks.push_front(chunk.slice(end, chunk.num_rows() - end));
                break;
            }
        }
        self.consumed = until;
    }
}

/// Index of `offset` in the record schema (checked by a test).
const OFFSET_COLUMN: usize = 2;

struct State {
    parts: HashMap<Key, Buffer>,
    error: Option<KafkaError>,
    /// Records to read ahead before waiting.
    limit: usize,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether enough is buffered and no waiting batch needs more.
    fn has_enough(&self) -> bool {
        let state = self.lock();
        state.parts.values().map(|b| b.rows).sum::<usize>() >= state.limit && state.parts.values().all(|b| b.covered >= b.demand)
    }
}

/// Why a batch could not be taken.
pub enum TakeError {
    /// The consumer reported an error.
    Kafka(KafkaError),
    /// The ranges were not all read within the timeout; how far each missing one was read.
    Timeout(Vec<Pending>),
}

/// Reads ahead on its own thread; see the module docs.
pub struct Prefetcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Assign every partition in `positions` at its offset and start reading.
    pub fn start(consumer: Arc<SourceConsumer>, positions: &[(Key, i64)]) -> Result<Self, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        consumer.assign(&tpl)?;
        let state = State { parts: positions.iter().map(|(k, o)| (k.clone(), Buffer::new(*o))).collect(), error: None, limit: PREFETCH_ROWS };
        let shared = Arc::new(Shared { state: Mutex::new(state), ready: Condvar::new(), stop: AtomicBool::new(false) });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sluice-consumer".into())
                .spawn({
                    let starts: Vec<(Key, i64)> = positions.to_vec();
                    move || read_ahead(&consumer, &shared, &starts)
                })
                .expect("spawn the consumer thread")
        };
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Read ahead at most `rows` records (capped at [`PREFETCH_ROWS`]); the batch in flight
    /// is always read whole.
    pub fn set_limit(&self, rows: usize) {
        self.shared.lock().limit = rows.min(PREFETCH_ROWS);
    }

    /// Where each partition's next batch must start to be served without a restart.
    pub fn positions(&self) -> Vec<(Key, i64)> {
        self.shared.lock().parts.iter().map(|(k, b)| (k.clone(), b.consumed)).collect()
    }

    /// Whether every range starts where its partition's buffer continues.
    pub fn continues(&self, ranges: &[&OffsetRange]) -> bool {
        let state = self.shared.lock();
        ranges.iter().all(|r| state.parts.get(&(r.topic.clone(), r.partition)).is_some_and(|b| b.consumed == r.from))
    }

    /// Wait until every range is read, then take them out of the buffers, in order.
    pub fn take(&self, ranges: &[&OffsetRange], timeout: Duration) -> Result<Vec<RecordBatch>, TakeError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        for r in ranges {
            if let Some(b) = state.parts.get_mut(&(r.topic.clone(), r.partition)) {
                b.demand = b.demand.max(r.until);
            }
        }
        loop {
            if let Some(error) = state.error.take() {
                return Err(TakeError::Kafka(error));
            }
            let missing: Vec<Pending> = ranges
                .iter()
                .filter_map(|r| {
                    let b = state.parts.get(&(r.topic.clone(), r.partition))?;
                    (b.covered < r.until).then(|| Pending { topic: r.topic.clone(), partition: r.partition, reached: b.covered, until: r.until })
                })
                .collect();
            if missing.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TakeError::Timeout(missing));
            }
            state = self.shared.ready.wait_timeout(state, (deadline - now).min(Duration::from_millis(100))).map(|(s, _)| s).unwrap_or_else(|p| p.into_inner().0);
        }
        let mut out = Vec::new();
        for r in ranges {
            if let Some(b) = state.parts.get_mut(&(r.topic.clone(), r.partition)) {
                b.take(r.from, r.until, &mut out);
            }
        }
        Ok(out)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The consumer thread: poll, append to per-partition builders, hand over, and wait while
/// enough is buffered. Each partition takes only records after what it took before and
/// not before its assigned start ([`Arrivals`]): a client may deliver records again after
/// an assignment.
fn read_ahead(consumer: &SourceConsumer, shared: &Shared, starts: &[(Key, i64)]) {
    // Per partition: its builder and what it admitted. Few partitions: a list, searched
    // without allocating a key per record.
    let mut local: Vec<(Key, RecordsBuilder, Arrivals)> = starts.iter().map(|(k, start)| (k.clone(), RecordsBuilder::default(), Arrivals::starting_at(*start))).collect();
    let mut unhanded = 0;
    let mut last_handover = Instant::now();
    let mut throttled = false;
    let mut last_warning: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if throttled {
            std::thread::sleep(THROTTLE);
            throttled = shared.has_enough();
            continue;
        }
        let idle = match consumer.poll(POLL) {
            None => true,
            Some(Err(error)) if is_transient(&error) => {
                // The broker is away or busy; librdkafka reconnects and fetches again by
                // itself, and a batch waits for its records meanwhile.
                if last_warning.is_none_or(|t: Instant| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!("the source cannot reach the brokers ({error}); waiting for them");
                    last_warning = Some(Instant::now());
                }
                std::thread::sleep(POLL);
                true
            }
            Some(Err(error)) => {
                shared.lock().error = Some(error);
                shared.ready.notify_all();
                // Give the loop time to see it; librdkafka keeps retrying meanwhile.
                std::thread::sleep(POLL);
                true
            }
            Some(Ok(m)) => {
                let Some(i) = local.iter().position(|((t, p), ..)| *p == m.partition() && t == m.topic()) else {
                    continue; // not assigned here (a message of an earlier assignment)
                };
                let (_, builder, arrivals) = &mut local[i];
                if let Some((from, first)) = arrivals.skipped_at_start(m.offset()) {
                    tracing::warn!(
                        "{}/{}: read from offset {from}, the first record the broker returned is at {first}; offsets {from}..{first} hold no records \
                         (compaction or transaction markers — or a broker that returns the next record batch when asked for an offset inside one, \
                         as tansu 0.6 does, which loses those records)",
                        m.topic(),
                        m.partition()
                    );
                }
                if !arrivals.admit(m.offset()) {
                    continue; // delivered again
                }
                let headers = m.headers();
                let header_iter = (0..headers.map_or(0, |h| h.count())).filter_map(|i| headers.and_then(|h| h.try_get(i)).map(|h| (h.key, h.value)));
                builder.append(
                    RecordParts { topic: m.topic(), partition: m.partition(), offset: m.offset(), timestamp: m.timestamp().to_millis(), key: m.key(), value: m.payload() },
                    header_iter,
                );
                unhanded += 1;
                false
            }
        };
        // The clock is read every CLOCK_EVERY records, not per record: reading it was a
        // sixth of this thread's time.
        let due = idle || unhanded >= HANDOVER_ROWS || (unhanded % CLOCK_EVERY == 0 && last_handover.elapsed() >= HANDOVER_EVERY);
        if unhanded > 0 && due {
            hand_over(&mut local, shared);
            unhanded = 0;
            last_handover = Instant::now();
            throttled = shared.has_enough();
        }
        if idle && unhanded == 0 {
            cover_to_positions(consumer, shared);
        }
    }
}

/// While a batch waits for a partition, let the consumer's own position count: it moves
/// past offsets that hold no record for the application (transaction markers, aborted
/// records), so a range ending in such offsets completes without a record after it.
/// Called with nothing polled and not handed over, so every record below the position is
/// in the buffer already.
fn cover_to_positions(consumer: &SourceConsumer, shared: &Shared) {
    let waiting: Vec<Key> = shared.lock().parts.iter().filter(|(_, b)| b.covered < b.demand).map(|(k, _)| k.clone()).collect();
    if waiting.is_empty() {
        return;
    }
    let Ok(positions) = consumer.position() else { return };
    let mut state = shared.lock();
    let mut moved = false;
    for key in waiting {
        if let (Some(b), Some(Offset::Offset(position))) = (state.parts.get_mut(&key), positions.find_partition(&key.0, key.1).map(|e| e.offset())) {
            if position > b.covered {
                b.covered = position;
                moved = true;
            }
        }
    }
    drop(state);
    if moved {
        shared.ready.notify_all();
    }
}

/// How often the consumer thread repeats that the brokers are away.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Errors that go away when the brokers come back: connections lost, leaders moving,
/// requests timing out.
pub fn is_transient(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::Resolve
                | C::NetworkException
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::BrokerNotAvailable
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::CoordinatorLoadInProgress
                | C::TimedOutQueue
        ),
        None => false,
    }
}

fn hand_over(local: &mut [(Key, RecordsBuilder, Arrivals)], shared: &Shared) {
    let mut state = shared.lock();
    for (key, builder, arrivals) in local.iter_mut() {
        if builder.is_empty() {
            continue;
        }
        let chunk = builder.finish();
        if let Some(b) = state.parts.get_mut(key) {
            b.rows += chunk.num_rows();
            b.covered = b.covered.max(arrivals.next());
            b.chunks.push_back(chunk);
        }
    }
    drop(state);
    shared.ready.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offsets: std::ops::Range<i64>) -> RecordBatch {
        let mut b = RecordsBuilder::default();
        for o in offsets {
            let value = o.to_string();
            b.append(RecordParts { topic: "t", partition: 0, offset: o, timestamp: None, key: None, value: Some(value.as_bytes()) }, []);
        }
        b.finish()
    }

    fn offsets(batches: &[RecordBatch]) -> Vec<i64> {
        batches.iter().flat_map(|b| b.column(OFFSET_COLUMN).as_primitive::<Int64Type>().values().to_vec()).collect()
    }

    #[test]
    fn the_offset_column_index_matches_the_record_schema() {
        assert_eq!(sluice_sdk::record_schema().index_of(sluice_sdk::columns::OFFSET).unwrap(), OFFSET_COLUMN);
    }

    #[test]
    fn a_batch_takes_exactly_its_range_and_leaves_the_rest_for_the_next() {
        let mut b = Buffer::new(10);
        for c in [chunk(10..14), chunk(14..20), chunk(22..25)] {
            b.rows += c.num_rows();
            b.chunks.push_back(c);
        }
        b.covered = 25;
        let mut out = Vec::new();
        b.take(10, 16, &mut out);
        assert_eq!(offsets(&out), vec![10, 11, 12, 13, 14, 15]);
        assert_eq!((b.consumed, b.rows), (16, 7));
        let mut out = Vec::new();
        b.take(16, 23, &mut out);
        assert_eq!(offsets(&out), vec![16, 17, 18, 19, 22], "offsets may have gaps (compaction)");
        let mut out = Vec::new();
        b.take(23, 25, &mut out);
        assert_eq!(offsets(&out), vec![23, 24]);
        assert_eq!((b.rows, b.chunks.len()), (0, 0));
    }
}
