//! What the real-broker suites share: the seed's job, seed-style events produced to Apache
//! Kafka, the window rows a Parquet sink shows to a reader, and waiting for a child process.
//! Each suite uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use sluice::broker::Broker;
use sluice::demo::generator::{EventGenerator, EventSpec};
use sluice::kafka::{Loader, Outgoing};
use sluice_tests::reference::WindowRow;

/// Seed-style events per topic.
pub const RECORDS: usize = 20_000;

/// Produce [`RECORDS`] seed-style events keyed by campaign, partitioned by the producer's
/// default partitioner, with librdkafka's default batching; returns them.
pub fn produce(broker: &dyn Broker, topic: &str) -> Vec<Value> {
    produce_to(broker, topic, None, &|_, _| true).into_iter().map(|(_, event)| event).collect()
}

/// [`produce`]; with `partitions`, each event goes to partition FNV-1a(campaign) mod
/// `partitions`, returned with it, so a test knows what each partition holds. Only events
/// `keep` keeps (given their partition) are produced and returned.
pub fn produce_to(broker: &dyn Broker, topic: &str, partitions: Option<i32>, keep: &dyn Fn(Option<i32>, &Value) -> bool) -> Vec<(Option<i32>, Value)> {
    produce_placed(broker, topic, &|_, campaign| partitions.map(|n| (fnv1a(campaign.as_bytes()) % n as u64) as i32), true, keep)
}

/// [`RECORDS`] seed-style events without a key, spread over `partitions` round robin (so
/// every campaign's events are in every partition); returns them.
pub fn produce_unkeyed(broker: &dyn Broker, topic: &str, partitions: i32) -> Vec<Value> {
    produce_placed(broker, topic, &|i, _| Some(i as i32 % partitions), false, &|_, _| true).into_iter().map(|(_, event)| event).collect()
}

/// Produce events, the `i`th with campaign `c` to partition `place(i, c)` (`None`: the
/// producer's partitioner), keyed by campaign when `keyed`.
fn produce_placed(
    broker: &dyn Broker,
    topic: &str,
    place: &dyn Fn(usize, &str) -> Option<i32>,
    keyed: bool,
    keep: &dyn Fn(Option<i32>, &Value) -> bool,
) -> Vec<(Option<i32>, Value)> {
    // Idempotent: a produce request retried (a broker that is just up, a loaded machine)
    // cannot land behind a later one, so each partition holds its events in the order
    // produced, the order the expected windows are computed in.
    let loader = Loader::connect(&broker.bootstrap(), &[("enable.idempotence", "true")]).unwrap();
    let mut gen = EventGenerator::new(EventSpec { events_per_sec: 50, ..EventSpec::default() });
    let mut events = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let event = gen.next_event();
        let value = serde_json::to_vec(&event).unwrap();
        let partition = place(i, &event.campaign_id);
        let json = serde_json::to_value(&event).unwrap();
        if !keep(partition, &json) {
            continue;
        }
        let key = keyed.then_some(event.campaign_id.as_bytes());
        loader.send(topic, Outgoing { partition, key, value: Some(&value), headers: &[] }).unwrap();
        events.push((partition, json));
    }
    loader.flush(Duration::from_secs(60)).unwrap();
    events
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Lines a suite adds to the tables of a [`pipeline_file`].
#[derive(Default)]
pub struct Extra<'a> {
    /// In `[source]`.
    pub source: &'a str,
    /// In `[kafka]`.
    pub kafka: &'a str,
    /// In `[checkpoint]`.
    pub checkpoint: &'a str,
}

/// A pipeline file `name` reading `topic` in batches of at most `batch` through
/// `plugins` (TOML `[[plugin]]` tables) into a `sink`: `parquet` or `jsonl` (files in
/// `<name>-out`) or the body of a `[sink]` table; with its own group and checkpoint
/// location, and the `extra` lines of its own.
#[allow(clippy::too_many_arguments)]
pub fn pipeline_file(dir: &Path, bootstrap: &str, name: &str, topic: &str, batch: u64, plugins: &str, sink: &str, extra: &Extra<'_>) -> std::path::PathBuf {
    let file = dir.join(format!("{name}.toml"));
    let sink = match sink {
        "parquet" | "jsonl" => format!("format = \"{sink}\"\npath = \"{}\"", dir.join(format!("{name}-out")).display()),
        table => table.to_string(),
    };
    let text = format!(
        r#"name = "{name}"
[source]
topics = ["{topic}"]
startingOffsets = "earliest"
maxOffsetsPerTrigger = {batch}
{source}
[trigger]
processingTime = "100ms"
[kafka]
"bootstrap.servers" = "{bootstrap}"
{kafka}
{plugins}
[sink]
{sink}
[checkpoint]
location = "{ck}"
{checkpoint}
"#,
        ck = dir.join(format!("{name}-checkpoint")).display(),
        source = extra.source,
        kafka = extra.kafka,
        checkpoint = extra.checkpoint,
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// The seed's job: json-filter keeps the clicks, ad-clicks with its default config.
pub const SEED_JOB: &str = r#"[[plugin]]
builtin = "json-filter"
config = { where = [{ field = "event", op = "eq", value = "click" }] }
[[plugin]]
builtin = "ad-clicks""#;

/// Window rows of the Parquet files a reader sees.
pub fn windows(out: &Path) -> Vec<WindowRow> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return rows };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap().build().unwrap();
            for batch in reader {
                rows.extend(sluice_sdk::json::batch_to_rows(&batch.unwrap()).into_iter().map(|row| WindowRow::from_json(&Value::Object(row))));
            }
        }
    }
    rows
}

/// Wait for `child` until `deadline`; its exit status, or `None` if it still runs.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The values of `topic` (one partition) from its start to its end, read with
/// `isolation` (`read_committed` or `read_uncommitted`).
pub fn topic_values(bootstrap: &str, topic: &str, isolation: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "seed-runs-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut values = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "{topic} was not read to its end within 60 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => values.push(String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return values,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
}
