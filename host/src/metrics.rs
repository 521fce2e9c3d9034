//! Prometheus metrics of a run, kept up to date from each batch's progress record and
//! rendered in the text exposition format (version 0.0.4) for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::chain::StepId;
use crate::progress::BatchProgress;

/// Upper bounds (seconds) of the batch-duration and checkpoint-duration histograms.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The batch phases reported as `sluice_batch_phase_seconds_total{phase=...}`.
const PHASES: [&str; 7] = ["plan", "fetch", "plugins", "sink", "checkpoint", "commit", "swap"];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Per plugin version (`name`, `version`).
#[derive(Debug, Default, Clone)]
struct PluginTotals {
    seconds: f64,
    rejected: u64,
    failures: u64,
}

#[derive(Debug, Default)]
struct Inner {
    batches: u64,
    records: u64,
    output_rows: u64,
    rejected: u64,
    dead_letters: u64,
    swaps: u64,
    swaps_failed: u64,
    last_batch_id: Option<u64>,
    input_per_sec: f64,
    processed_per_sec: f64,
    interval: Duration,
    watermark_ms: Option<i64>,
    lag: u64,
    partition_lag: BTreeMap<(String, i32), u64>,
    phases: [f64; PHASES.len()],
    batch_duration: Histogram,
    checkpoint_duration: Histogram,
    plugins: BTreeMap<(String, String), PluginTotals>,
}

/// The metrics of one run; share it between the batch loop and the HTTP server.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// A step → its (`name`, `version`) labels.
fn plugin_labels(step: &StepId) -> (String, String) {
    (step.name.clone(), step.version.clone())
}

impl crate::progress::Observer for Metrics {
    fn batch(&self, progress: &BatchProgress, _: &serde_json::Value) {
        self.record(progress);
    }
}

impl Metrics {
    /// Count one batch.
    pub fn record(&self, p: &BatchProgress) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.batches += 1;
        m.records += p.records;
        m.output_rows += p.output_rows;
        m.rejected += p.rejected.len() as u64;
        m.dead_letters += p.dead_letters;
        m.swaps = p.swaps;
        m.swaps_failed = p.swaps_failed;
        m.last_batch_id = Some(p.batch_id);
        m.input_per_sec = p.input_per_sec;
        m.processed_per_sec = p.processed_per_sec;
        m.interval = p.interval;
        m.watermark_ms = p.watermark_ms.or(m.watermark_ms);
        m.lag = p.lag;
        for part in &p.partitions {
            m.partition_lag.insert((part.topic.clone(), part.partition), (part.high - part.until).max(0) as u64);
        }
        let d = &p.durations;
        for (total, t) in m.phases.iter_mut().zip([d.plan, d.fetch, d.plugins, d.sink, d.checkpoint, d.commit, p.swap_time]) {
            *total += t.as_secs_f64();
        }
        m.batch_duration.observe(p.duration.as_secs_f64());
        m.checkpoint_duration.observe(d.checkpoint.as_secs_f64());
        for (step, t) in &p.step_times {
            m.plugins.entry(plugin_labels(step)).or_default().seconds += t.as_secs_f64();
        }
        for r in &p.rejected {
            m.plugins.entry((r.plugin.clone(), r.version.clone())).or_default().rejected += 1;
        }
        for step in &p.failures {
            m.plugins.entry(plugin_labels(step)).or_default().failures += 1;
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        single("sluice_batches_total", "counter", "Batches processed.", m.batches.to_string());
        single("sluice_input_records_total", "counter", "Records read from Kafka.", m.records.to_string());
        single("sluice_output_rows_total", "counter", "Rows written to the sink.", m.output_rows.to_string());
        single("sluice_rejected_records_total", "counter", "Records rejected by plugins.", m.rejected.to_string());
        single("sluice_dead_letters_total", "counter", "Records written to the dead-letter sink.", m.dead_letters.to_string());
        single("sluice_plugin_swaps_total", "counter", "New plugin versions swapped in that processed a batch.", m.swaps.to_string());
        single("sluice_plugin_swaps_failed_total", "counter", "New plugin versions rejected (preparation, swap or first batch).", m.swaps_failed.to_string());
        single("sluice_input_rows_per_second", "gauge", "Input rate of the last batch (records per second since the batch before started).", m.input_per_sec.to_string());
        single("sluice_processed_rows_per_second", "gauge", "Processing rate of the last batch (records per second of its duration).", m.processed_per_sec.to_string());
        single("sluice_batch_interval_seconds", "gauge", "Trigger interval of the last batch.", m.interval.as_secs_f64().to_string());
        single("sluice_consumer_lag_records", "gauge", "Records left on the brokers after the last batch, all partitions.", m.lag.to_string());
        if let Some(id) = m.last_batch_id {
            single("sluice_last_batch_id", "gauge", "Id of the last batch processed.", id.to_string());
        }
        if let Some(wm) = m.watermark_ms {
            single("sluice_watermark_seconds", "gauge", "Event-time watermark reported by the plugins (Unix time).", (wm as f64 / 1000.0).to_string());
        }

        header(&mut out, "sluice_partition_lag_records", "gauge", "Records left on the brokers after the last batch, per partition.");
        for ((topic, partition), lag) in &m.partition_lag {
            let _ = writeln!(out, "sluice_partition_lag_records{{topic=\"{}\",partition=\"{partition}\"}} {lag}", escape(topic));
        }
        header(&mut out, "sluice_batch_phase_seconds_total", "counter", "Time spent in each phase of the batches.");
        for (phase, seconds) in PHASES.iter().zip(m.phases) {
            let _ = writeln!(out, "sluice_batch_phase_seconds_total{{phase=\"{phase}\"}} {seconds}");
        }
        m.batch_duration.render(&mut out, "sluice_batch_duration_seconds", "Time from planning a batch to committing it.");
        m.checkpoint_duration.render(&mut out, "sluice_checkpoint_duration_seconds", "Time writing a batch's checkpoint.");

        let plugin_series = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&PluginTotals) -> String| {
            header(out, name, kind, help);
            for ((plugin, version), totals) in &m.plugins {
                let _ = writeln!(out, "{name}{{plugin=\"{}\",version=\"{}\"}} {}", escape(plugin), escape(version), value(totals));
            }
        };
        plugin_series(&mut out, "sluice_plugin_seconds_total", "counter", "Time spent in each plugin version, retries included.", &|t| t.seconds.to_string());
        plugin_series(&mut out, "sluice_plugin_rejected_records_total", "counter", "Records each plugin version rejected.", &|t| t.rejected.to_string());
        plugin_series(
            &mut out,
            "sluice_plugin_failures_total",
            "counter",
            "Failed plugin calls (traps, timeouts, errors) that were retried, rolled back or sent to the dead letters.",
            &|t| t.failures.to_string(),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Rejected;
    use crate::progress::{BatchDurations, PartitionProgress};

    fn batch(id: u64, records: u64, millis: u64, lag: i64) -> BatchProgress {
        let ms = Duration::from_millis;
        BatchProgress {
            batch_id: id,
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
        assert_eq!(value(&text, "sluice_watermark_seconds"), "60");
        let fetch: f64 = value(&text, "sluice_batch_phase_seconds_total{phase=\"fetch\"}").parse().unwrap();
        assert!((fetch - 0.004).abs() < 1e-9, "{fetch}");
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
