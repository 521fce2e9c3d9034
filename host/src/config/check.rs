//! What every pipeline must satisfy before it runs, however it was made — a pipeline file,
//! the demo, a test or a benchmark: [`Pipeline::check`] is the only way to a
//! [`CheckedPipeline`], and the run functions take only that.
//!
//! A pipeline file is read in stages: [`super::raw`] (types), [`Pipeline::from_raw`]
//! (conversion and what only a file can get wrong: a step naming two sources, settings of a
//! section that is off, a missing `bootstrap.servers`), then this check.

use std::ops::Deref;

use super::{Assignment, ConfigError, Delivery, Pipeline, PluginSource, Sink, WatermarkScope, MANAGED_KAFKA_KEYS};

/// A pipeline that passed [`Pipeline::check`]. It reads as the pipeline it holds; to change
/// it, use [`CheckedPipeline::change`], which checks again.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedPipeline {
    pipeline: Pipeline,
    /// Where it came from, named in messages: a file, or `pipeline <name>`.
    origin: String,
}

impl Deref for CheckedPipeline {
    type Target = Pipeline;

    fn deref(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl CheckedPipeline {
    /// The pipeline changed by `edit`, checked again.
    pub fn change(self, edit: impl FnOnce(&mut Pipeline)) -> Result<Self, ConfigError> {
        let mut pipeline = self.pipeline;
        edit(&mut pipeline);
        pipeline.check_as(&self.origin)
    }

    /// The pipeline, no longer known to be checked.
    pub fn into_inner(self) -> Pipeline {
        self.pipeline
    }
}

fn valid_topic(name: &str) -> bool {
    !name.is_empty() && name.len() <= 249 && name != "." && name != ".." && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A plugin name usable as a file name in the plugin directory.
fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

type Invalid<'a> = &'a dyn Fn(&str, String) -> ConfigError;

impl Pipeline {
    /// Check every value and combination a run relies on; messages name the pipeline.
    pub fn check(self) -> Result<CheckedPipeline, ConfigError> {
        let origin = format!("pipeline `{}`", self.name);
        self.check_as(&origin)
    }

    /// [`Pipeline::check`], with messages naming `origin` (the pipeline file).
    pub(super) fn check_as(self, origin: &str) -> Result<CheckedPipeline, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid { path: origin.to_string(), key: key.to_string(), message };
        self.check_source(&invalid)?;
        self.check_trigger(&invalid)?;
        for key in self.kafka.keys() {
            if let Some((_, why)) = MANAGED_KAFKA_KEYS.iter().find(|(k, _)| k == key) {
                return Err(invalid(&format!("kafka.\"{key}\""), format!("is managed by sluice: {why}")));
            }
        }
        self.check_steps(&invalid)?;
        check_sink(&self.sink, "sink", &self.source.topics, &invalid)?;
        if let Some(dead_letter) = &self.dead_letter {
            check_sink(dead_letter, "deadLetter", &self.source.topics, &invalid)?;
            if dead_letter.target() == self.sink.target() {
                return Err(invalid("deadLetter", "is the same place as [sink]; give dead letters a path or topic of their own".into()));
            }
        }
        self.check_checkpoint(&invalid)?;
        self.check_group(&invalid)?;
        self.check_backpressure(&invalid)?;
        if self.plugin_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(invalid("pluginDir", "must not be empty".into()));
        }
        Ok(CheckedPipeline { pipeline: self, origin: origin.to_string() })
    }

    fn check_source(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        let source = &self.source;
        if source.topics.is_empty() {
            return Err(invalid("source.topics", "list at least one topic to read, e.g. `topics = [\"ad-events\"]`".into()));
        }
        if let Some(bad) = source.topics.iter().find(|t| !valid_topic(t)) {
            return Err(invalid("source.topics", format!("`{bad}` is not a Kafka topic name (1-249 characters of a-z, A-Z, 0-9, `.`, `_`, `-`)")));
        }
        if source.max_offsets_per_trigger == Some(0) {
            return Err(invalid("source.maxOffsetsPerTrigger", "must be a positive number of records, got 0".into()));
        }
        let rates = source.partition_rates;
        positive_rate("source.maxRatePerPartition", rates.max, invalid)?;
        positive_rate("source.minRatePerPartition", rates.min, invalid)?;
        if let (Some(max), Some(min)) = (rates.max, rates.min) {
            if min > max {
                return Err(invalid("source.minRatePerPartition", format!("{min} is above source.maxRatePerPartition {max}")));
            }
        }
        if source.group_id.trim().is_empty() {
            return Err(invalid("source.groupId", "must not be empty".into()));
        }
        Ok(())
    }

    /// What a consumer-group run needs: a checkpoint location every process reaches, with
    /// create-only writes (its fencing), and sinks that keep each task's batches apart.
    fn check_group(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        if self.source.assignment != Assignment::Group {
            if self.source.watermark != WatermarkScope::Task {
                return Err(invalid("source.watermark", "applies to source.assignment = \"group\"; a run over all partitions has one watermark already".into()));
            }
            if self.source.repartition.is_some() {
                return Err(invalid(
                    "source.repartition",
                    "applies to source.assignment = \"group\"; a run over all partitions aggregates every key in one task already, so remove [source.repartition]".into(),
                ));
            }
            return Ok(());
        }
        self.check_repartition(invalid)?;
        let Some(checkpoint) = &self.checkpoint else {
            return Err(invalid(
                "source.assignment",
                "\"group\" needs checkpointing, which [checkpoint] enabled = false turns off: a task's state moves between the group's processes through the checkpoint location"
                    .into(),
            ));
        };
        if checkpoint.location.to_ascii_lowercase().starts_with("memory://") {
            return Err(invalid(
                "checkpoint.location",
                "a memory:// location lives in one process; with source.assignment = \"group\" use a directory or object-store URL every process reaches".into(),
            ));
        }
        Ok(())
    }

    /// A repartition topic: its own topic, and a key to repartition by.
    fn check_repartition(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        let Some(repartition) = &self.source.repartition else { return Ok(()) };
        let topic = repartition.topic.as_str();
        if !valid_topic(topic) {
            return Err(invalid("source.repartition.topic", format!("`{topic}` is not a Kafka topic name: name the topic the steps before the aggregate write to")));
        }
        if self.source.topics.iter().any(|t| t == topic) {
            return Err(invalid("source.repartition.topic", format!("`{topic}` is a source topic; the repartition topic must be a topic of its own")));
        }
        for (key, sink) in [("sink.topic", Some(&self.sink)), ("deadLetter.topic", self.dead_letter.as_ref())] {
            if let Some(Sink::Kafka { topic: out, .. }) = sink {
                if out == topic {
                    return Err(invalid(key, format!("`{topic}` is the repartition topic; write the output to a topic of its own")));
                }
            }
        }
        if self.source.watermark == WatermarkScope::Global {
            return Err(invalid(
                "source.watermark",
                "\"global\" is not available with [source.repartition]: a repartition partition that lags (keys spread unevenly, rate caps) would see its events behind the watermark of one that keeps up, and its windows would close before their events arrive. Use the per-task watermark (\"task\", the default)".into(),
            ));
        }
        if self.source.keyed {
            return Err(invalid(
                "source.keyed",
                "says the input is keyed by what the aggregate groups by already, and [source.repartition] is for input that is not: remove one of them".into(),
            ));
        }
        match &repartition.key {
            Some(key) if key.split('.').any(str::is_empty) => {
                Err(invalid("source.repartition.key", format!("`{key}` is not a dotted path into the record's JSON value, such as `campaign_id` or `ad.campaign`")))
            }
            None if self.steps.len() < 2 => Err(invalid(
                "source.repartition.key",
                "is needed when no step comes before the aggregate: give the JSON field to key the records by (`key = \"campaign_id\"`), or a step before the aggregate that sets each record's key".into(),
            )),
            _ => Ok(()),
        }
    }

    fn check_trigger(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        // A zero interval (batches back to back) is for code, such as the benchmarks; a
        // pipeline file may not ask for it (see `from_raw`).
        let zero = |key: &str| invalid(key, "must be longer than zero".into());
        let Some(bounds) = self.adaptive_interval else { return Ok(()) };
        if bounds.min.is_zero() {
            return Err(zero("trigger.minInterval"));
        }
        if bounds.max.is_zero() {
            return Err(zero("trigger.maxInterval"));
        }
        if !(bounds.min <= self.trigger_interval && self.trigger_interval <= bounds.max) {
            let shown = |d| humantime::format_duration(d).to_string();
            return Err(invalid(
                "trigger",
                format!("processingTime {} must lie between minInterval {} and maxInterval {}", shown(self.trigger_interval), shown(bounds.min), shown(bounds.max)),
            ));
        }
        Ok(())
    }

    fn check_steps(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        for (i, step) in self.steps.iter().enumerate() {
            let key = |k: &str| format!("plugin[{i}].{k}");
            if let PluginSource::Dir(name) = &step.source {
                if !valid_plugin_name(name) {
                    return Err(invalid(
                        &key("name"),
                        format!("`{name}` is not a plugin name: use letters, digits, `-` and `_` (the plugin is `<name>.wasm` in the plugin directory)"),
                    ));
                }
            }
            let limits = &step.limits;
            if limits.memory_bytes == 0 {
                return Err(invalid(&key("memoryMb"), "must be a positive number of MiB, got 0".into()));
            }
            if limits.max_output_bytes == 0 {
                return Err(invalid(&key("maxOutputMb"), "must be a positive number of MiB, got 0".into()));
            }
            if limits.call_timeout.is_zero() {
                return Err(invalid(&key("callTimeout"), "must be longer than zero".into()));
            }
            if step.failure.retries > 100 {
                return Err(invalid(&key("retries"), format!("must be 0 to 100, got {}", step.failure.retries)));
            }
            if step.failure.then == super::OnFailure::DeadLetter && self.dead_letter.is_none() {
                return Err(invalid(&key("onFailure"), "`dead-letter` needs a [deadLetter] sink to send the batch's records to; add one, or use `stop`".into()));
            }
        }
        Ok(())
    }

    fn check_checkpoint(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        if let Some(checkpoint) = &self.checkpoint {
            let location = &checkpoint.location;
            if location.trim().is_empty() {
                return Err(invalid("checkpoint.location", "must not be empty; leave it out for the default".into()));
            }
            crate::store::check_location(location).map_err(|message| invalid("checkpoint.location", message))?;
            if !checkpoint.options.is_empty() && !location.contains("://") {
                return Err(invalid("checkpoint.options", "object-store options apply to URLs like `s3://bucket/prefix`; remove them for a local directory".into()));
            }
            if checkpoint.retain == 0 {
                return Err(invalid("checkpoint.retain", "keep at least 1 checkpoint, got 0".into()));
            }
        }
        for (key, sink) in [("sink", Some(&self.sink)), ("deadLetter", self.dead_letter.as_ref())] {
            if let (Some(Sink::Kafka { delivery: Delivery::ExactlyOnce { .. }, .. }), None) = (sink, &self.checkpoint) {
                return Err(invalid(
                    &format!("{key}.deliveryGuarantee"),
                    "`exactly-once` needs checkpointing: a restart decides from the checkpoint which batches to replay; remove `enabled = false` from [checkpoint] or use `at-least-once`".into(),
                ));
            }
        }
        if let (Sink::Kafka { delivery: Delivery::ExactlyOnce { transactional_id: a }, .. }, Some(Sink::Kafka { delivery: Delivery::ExactlyOnce { transactional_id: b }, .. })) =
            (&self.sink, &self.dead_letter)
        {
            if a == b {
                return Err(invalid("deadLetter.transactionalId", format!("`{b}` is also the sink's: the two producers would fence each other; give each its own id")));
            }
        }
        Ok(())
    }

    fn check_backpressure(&self, invalid: Invalid<'_>) -> Result<(), ConfigError> {
        let Some(bp) = &self.backpressure else { return Ok(()) };
        for (key, gain) in [("proportional", bp.pid.proportional), ("integral", bp.pid.integral), ("derived", bp.pid.derived)] {
            if !(gain.is_finite() && gain >= 0.0) {
                return Err(invalid(&format!("backpressure.pid.{key}"), format!("must be zero or a positive number, got {gain}")));
            }
        }
        positive_rate("backpressure.pid.minRate", Some(bp.pid.min_rate), invalid)?;
        positive_rate("backpressure.initialRate", bp.initial_rate, invalid)
    }
}

fn positive_rate(key: &str, value: Option<f64>, invalid: Invalid<'_>) -> Result<(), ConfigError> {
    match value {
        Some(r) if !(r.is_finite() && r > 0.0) => Err(invalid(key, format!("must be a positive number of records per second, got {r}"))),
        _ => Ok(()),
    }
}

/// Check a `[sink]`-shaped table; `key` names it in messages.
fn check_sink(sink: &Sink, key: &str, source_topics: &[String], invalid: Invalid<'_>) -> Result<(), ConfigError> {
    let at = |k: &str| format!("{key}.{k}");
    match sink {
        Sink::Parquet { path, .. } if path.trim().is_empty() => Err(invalid(&at("path"), "must not be empty".into())),
        Sink::Jsonl { path } if path.trim().is_empty() => Err(invalid(&at("path"), "must not be empty; use `-` for stdout".into())),
        Sink::Kafka { topic, .. } if !valid_topic(topic) => Err(invalid(&at("topic"), format!("`{topic}` is not a Kafka topic name"))),
        Sink::Kafka { topic, .. } if source_topics.contains(topic) => {
            Err(invalid(&at("topic"), format!("`{topic}` is also a source topic: the pipeline would read its own output")))
        }
        Sink::Parquet { path, options, .. } => {
            crate::store::check_location(path).map_err(|message| invalid(&at("path"), message))?;
            if !options.is_empty() && !path.contains("://") {
                return Err(invalid(&at("options"), "object-store options apply to URLs like `s3://bucket/prefix`; remove them for a local directory".into()));
            }
            Ok(())
        }
        Sink::Kafka { delivery: Delivery::ExactlyOnce { transactional_id }, .. } if transactional_id.trim().is_empty() => {
            Err(invalid(&at("transactionalId"), "must not be empty; leave it out for the default".into()))
        }
        Sink::Jsonl { .. } | Sink::Kafka { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests;
