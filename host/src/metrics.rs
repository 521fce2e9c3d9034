//! Prometheus metrics of a run, kept up to date from each batch's progress record with
//! `prometheus-client` and rendered in the text exposition format (version 0.0.4) for
//! `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, Once};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::chain::StepId;
use crate::progress::BatchProgress;

/// Upper bounds (seconds) of the batch-duration and checkpoint-duration histograms.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The batch phases reported as `sluice_batch_phase_seconds_total{phase=...}`.
const PHASES: [&str; 7] = ["plan", "fetch", "plugins", "sink", "checkpoint", "commit", "swap"];

type Seconds = Counter<f64, AtomicU64>;
type Real = Gauge<f64, AtomicU64>;
/// `plugin` and `version` of a plugin step.
type PluginLabels = [(&'static str, String); 2];
/// `topic` and `partition` of a source partition.
type PartitionLabels = [(&'static str, String); 2];

/// The metrics of one run; share it between the batch loop and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    batches: Counter,
    records: Counter,
    output_rows: Counter,
    rejected: Counter,
    dead_letters: Counter,
    swaps: Counter,
    swaps_failed: Counter,
    input_per_sec: Real,
    processed_per_sec: Real,
    interval: Real,
    lag: Gauge,
    /// Registered with the first batch: before it there is no batch id.
    last_batch_id: Gauge,
    first_batch: Once,
    /// Registered with the first watermark a plugin reports.
    watermark: Real,
    first_watermark: Once,
    partition_lag: Family<PartitionLabels, Gauge>,
    phases: Family<[(&'static str, &'static str); 1], Seconds>,
    batch_duration: Histogram,
    checkpoint_duration: Histogram,
    plugin_seconds: Family<PluginLabels, Seconds>,
    plugin_rejected: Family<PluginLabels, Counter>,
    plugin_failures: Family<PluginLabels, Counter>,
    tasks: Family<[(&'static str, String); 1], Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Mutex::default(),
            batches: Counter::default(),
            records: Counter::default(),
            output_rows: Counter::default(),
            rejected: Counter::default(),
            dead_letters: Counter::default(),
            swaps: Counter::default(),
            swaps_failed: Counter::default(),
            input_per_sec: Real::default(),
            processed_per_sec: Real::default(),
            interval: Real::default(),
            lag: Gauge::default(),
            last_batch_id: Gauge::default(),
            first_batch: Once::new(),
            watermark: Real::default(),
            first_watermark: Once::new(),
            partition_lag: Family::default(),
            phases: Family::default(),
            batch_duration: Histogram::new(BUCKETS),
            checkpoint_duration: Histogram::new(BUCKETS),
            plugin_seconds: Family::default(),
            plugin_rejected: Family::default(),
            plugin_failures: Family::default(),
            tasks: Family::default(),
        };
        {
            let mut r = m.registry.lock().expect("not shared yet");
            r.register("sluice_batches", "Batches processed", m.batches.clone());
            r.register("sluice_input_records", "Records read from Kafka", m.records.clone());
            r.register("sluice_output_rows", "Rows written to the sink", m.output_rows.clone());
            r.register("sluice_rejected_records", "Records rejected by plugins", m.rejected.clone());
            r.register("sluice_dead_letters", "Records written to the dead-letter sink", m.dead_letters.clone());
            r.register("sluice_plugin_swaps", "New plugin versions swapped in that processed a batch", m.swaps.clone());
            r.register("sluice_plugin_swaps_failed", "New plugin versions rejected (preparation, swap or first batch)", m.swaps_failed.clone());
            r.register("sluice_input_rows_per_second", "Input rate of the last batch (records per second since the batch before started)", m.input_per_sec.clone());
            r.register("sluice_processed_rows_per_second", "Processing rate of the last batch (records per second of its duration)", m.processed_per_sec.clone());
            r.register("sluice_batch_interval_seconds", "Trigger interval of the last batch", m.interval.clone());
            r.register("sluice_consumer_lag_records", "Records left on the brokers after the last batch, all partitions", m.lag.clone());
            r.register("sluice_partition_lag_records", "Records left on the brokers after the last batch, per partition", m.partition_lag.clone());
            r.register("sluice_batch_phase_seconds", "Time spent in each phase of the batches", m.phases.clone());
            r.register("sluice_batch_duration_seconds", "Time from planning a batch to committing it", m.batch_duration.clone());
            r.register("sluice_checkpoint_duration_seconds", "Time writing a batch's checkpoint", m.checkpoint_duration.clone());
            r.register("sluice_plugin_seconds", "Time spent in each plugin version, retries included", m.plugin_seconds.clone());
            r.register("sluice_plugin_rejected_records", "Records each plugin version rejected", m.plugin_rejected.clone());
            r.register(
                "sluice_plugin_failures",
                "Failed plugin calls (traps, timeouts, errors) that were retried, rolled back or sent to the dead letters",
                m.plugin_failures.clone(),
            );
            r.register("sluice_task_owned", "The tasks (source partitions) this process owns in a consumer-group run, 1 each", m.tasks.clone());
        }
        m
    }
}

/// A step → its `plugin` and `version` labels.
fn plugin_labels(name: &str, version: &str) -> PluginLabels {
    [("plugin", name.to_string()), ("version", version.to_string())]
}

impl crate::progress::Observer for Metrics {
    fn batch(&self, progress: &BatchProgress, _: &serde_json::Value) {
        self.record(progress);
    }

    fn tasks(&self, owned: &[String]) {
        self.tasks.clear();
        for task in owned {
            self.tasks.get_or_create(&[("task", task.clone())]).set(1);
        }
    }
}

impl Metrics {
    /// Count one batch.
    pub fn record(&self, p: &BatchProgress) {
        self.first_batch.call_once(|| self.register("sluice_last_batch_id", "Id of the last batch processed", self.last_batch_id.clone()));
        self.batches.inc();
        self.records.inc_by(p.records);
        self.output_rows.inc_by(p.output_rows);
        self.rejected.inc_by(p.rejected.len() as u64);
        self.dead_letters.inc_by(p.dead_letters);
        // The progress record carries the run's totals of swaps.
        self.swaps.inc_by(p.swaps.saturating_sub(self.swaps.get()));
        self.swaps_failed.inc_by(p.swaps_failed.saturating_sub(self.swaps_failed.get()));
        self.last_batch_id.set(p.batch_id as i64);
        self.input_per_sec.set(p.input_per_sec);
        self.processed_per_sec.set(p.processed_per_sec);
        self.interval.set(p.interval.as_secs_f64());
        if let Some(wm) = p.watermark_ms {
            self.first_watermark.call_once(|| self.register("sluice_watermark_seconds", "Event-time watermark reported by the plugins (Unix time)", self.watermark.clone()));
            self.watermark.set(wm as f64 / 1000.0);
        }
        self.lag.set(p.lag as i64);
        for part in &p.partitions {
            let labels = [("topic", part.topic.clone()), ("partition", part.partition.to_string())];
            self.partition_lag.get_or_create(&labels).set((part.high - part.until).max(0));
        }
        let d = &p.durations;
        for (phase, t) in PHASES.iter().zip([d.plan, d.fetch, d.plugins, d.sink, d.checkpoint, d.commit, p.swap_time]) {
            self.phases.get_or_create(&[("phase", *phase)]).inc_by(t.as_secs_f64());
        }
        self.batch_duration.observe(p.duration.as_secs_f64());
        self.checkpoint_duration.observe(d.checkpoint.as_secs_f64());
        let plugin = |step: &StepId| plugin_labels(&step.name, &step.version);
        for (step, t) in &p.step_times {
            let labels = plugin(step);
            self.plugin_seconds.get_or_create(&labels).inc_by(t.as_secs_f64());
            // Every plugin that ran has all three series, zeros included.
            let _ = self.plugin_rejected.get_or_create(&labels);
            let _ = self.plugin_failures.get_or_create(&labels);
        }
        for r in &p.rejected {
            self.plugin_rejected.get_or_create(&plugin_labels(&r.plugin, &r.version)).inc();
        }
        for step in &p.failures {
            self.plugin_failures.get_or_create(&plugin(step)).inc();
        }
    }

    fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).register(name, help, metric);
    }

    /// The metrics in Prometheus' text format (version 0.0.4).
    pub fn render(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::chain::Rejected;
    use crate::progress::{BatchDurations, PartitionProgress};

    fn batch(id: u64, records: u64, millis: u64, lag: i64) -> BatchProgress {
        let ms = Duration::from_millis;
        BatchProgress {
            batch_id: id,
            task: None,
            timestamp_ms: 0,
            input_per_sec: records as f64,
            durations: BatchDurations { plan: ms(1), fetch: ms(2), plugins: ms(millis - 5), sink: ms(1), checkpoint: ms(1), commit: Duration::ZERO },
            step_times: vec![(StepId::new("ad-clicks", "1.0.0"), ms(millis - 5))],
            partitions: vec![PartitionProgress { topic: "t\"x".into(), partition: 0, from: 0, until: records as i64, high: records as i64 + lag }],
            dead_letters: 0,
            records,
            output_rows: 2,
            rejected: vec![],
            duration: ms(millis),
            processed_per_sec: records as f64 * 1000.0 / millis as f64,
            lag: lag as u64,
            watermark_ms: Some(60_000),
            swap_time: Duration::ZERO,
            swaps: 0,
            swaps_failed: 0,
            interval: Duration::from_secs(1),
            failures: vec![],
        }
    }

    fn value(text: &str, series: &str) -> String {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' '))).unwrap_or_else(|| panic!("no {series} in\n{text}")).to_string()
    }

    #[test]
    fn counters_add_up_and_the_histogram_is_cumulative() {
        let metrics = Metrics::default();
        metrics.record(&batch(0, 100, 20, 50));
        let mut second = batch(1, 300, 700, 7);
        second.rejected.push(Rejected {
            plugin: "ad-clicks".into(),
            version: "1.0.0".into(),
            topic: "t".into(),
            partition: 0,
            offset: 3,
            reason: "bad".into(),
            record: arrow_array::RecordBatch::new_empty(sluice_sdk::record_schema()),
        });
        second.dead_letters = 1;
        second.failures = vec![StepId::new("ad-clicks", "1.0.0")];
        metrics.record(&second);
        // The progress record counts the same per plugin version.
        let json = second.to_json();
        assert_eq!((json["plugins"][0]["rejected"].as_u64(), json["plugins"][0]["failures"].as_u64()), (Some(1), Some(1)), "{json}");
        let text = metrics.render();
        assert_eq!(value(&text, "sluice_batches_total"), "2");
        assert_eq!(value(&text, "sluice_input_records_total"), "400");
        assert_eq!(value(&text, "sluice_consumer_lag_records"), "7");
        assert_eq!(value(&text, "sluice_partition_lag_records{topic=\"t\\\"x\",partition=\"0\"}"), "7");
        assert_eq!(value(&text, "sluice_batch_duration_seconds_bucket{le=\"0.025\"}"), "1");
        assert_eq!(value(&text, "sluice_batch_duration_seconds_bucket{le=\"0.5\"}"), "1");
        assert_eq!(value(&text, "sluice_batch_duration_seconds_bucket{le=\"1\"}"), "2");
        assert_eq!(value(&text, "sluice_batch_duration_seconds_bucket{le=\"+Inf\"}"), "2");
        assert_eq!(value(&text, "sluice_batch_duration_seconds_count"), "2");
        let seconds: f64 = value(&text, "sluice_plugin_seconds_total{plugin=\"ad-clicks\",version=\"1.0.0\"}").parse().unwrap();
        assert!((seconds - 0.71).abs() < 1e-9, "{seconds}");
        assert_eq!(value(&text, "sluice_plugin_rejected_records_total{plugin=\"ad-clicks\",version=\"1.0.0\"}"), "1");
        assert_eq!(value(&text, "sluice_plugin_failures_total{plugin=\"ad-clicks\",version=\"1.0.0\"}"), "1");
        assert_eq!(value(&text, "sluice_dead_letters_total"), "1");
        assert_eq!(value(&text, "sluice_watermark_seconds").parse::<f64>().unwrap(), 60.0);
        assert_eq!(value(&text, "sluice_last_batch_id"), "1");
        let fetch: f64 = value(&text, "sluice_batch_phase_seconds_total{phase=\"fetch\"}").parse().unwrap();
        assert!((fetch - 0.004).abs() < 1e-9, "{fetch}");
    }

    #[test]
    fn the_tasks_a_process_owns_are_one_series_each_and_a_released_one_goes() {
        use crate::progress::Observer;
        let metrics = Metrics::default();
        metrics.tasks(&["clicks/0".into(), "clicks/3".into()]);
        let text = metrics.render();
        assert_eq!((value(&text, "sluice_task_owned{task=\"clicks/0\"}"), value(&text, "sluice_task_owned{task=\"clicks/3\"}")), ("1".into(), "1".into()));
        metrics.tasks(&["clicks/3".into()]);
        let text = metrics.render();
        assert!(!text.contains("task=\"clicks/0\""), "a released task has no series: {text}");
        assert_eq!(value(&text, "sluice_task_owned{task=\"clicks/3\"}"), "1");
    }

    #[test]
    fn before_the_first_batch_there_is_no_batch_id_and_no_watermark() {
        let metrics = Metrics::default();
        let text = metrics.render();
        assert_eq!(value(&text, "sluice_batches_total"), "0");
        assert!(!text.contains("sluice_last_batch_id") && !text.contains("sluice_watermark_seconds"), "{text}");
        let mut first = batch(0, 10, 10, 0);
        first.watermark_ms = None;
        metrics.record(&first);
        let text = metrics.render();
        assert_eq!(value(&text, "sluice_last_batch_id"), "0");
        assert!(!text.contains("sluice_watermark_seconds"), "no plugin reported a watermark yet: {text}");
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let metrics = Metrics::default();
        metrics.record(&batch(0, 10, 10, 0));
        for line in metrics.render().lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            assert!(value.parse::<f64>().is_ok(), "value of {line}");
            let name_end = series.find('{').unwrap_or(series.len());
            assert!(series[..name_end].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "name of {line}");
        }
    }
}
