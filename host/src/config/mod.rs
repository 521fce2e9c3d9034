//! The pipeline file (TOML), read in two stages: [`raw`] structs that reject unknown keys,
//! then [`Pipeline::from_raw`], which checks values and their combinations and says which
//! key is wrong and how to fix it. Names follow Spark (`startingOffsets`,
//! `maxOffsetsPerTrigger`, `processingTime`) and librdkafka (the `[kafka]` table is passed
//! to librdkafka as-is).
//!
//! This module only describes a pipeline; it must not open connections or load plugins.

mod failure;
mod raw;

pub use failure::{FailurePolicy, OnFailure};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::rate::{AdaptiveInterval, PartitionRates, PidSettings};
use crate::runtime::Limits;

/// Where consumption starts when there is no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingOffsets {
    /// Only records produced after the pipeline starts.
    Latest,
    /// Everything the broker still has.
    Earliest,
}

/// What the Kafka source reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Topics, at least one.
    pub topics: Vec<String>,
    /// Start position without a checkpoint.
    pub starting_offsets: StartingOffsets,
    /// Most records in one batch, over all partitions.
    pub max_offsets_per_trigger: Option<u64>,
    /// Records/s caps per partition (`maxRatePerPartition`, `minRatePerPartition`).
    pub partition_rates: PartitionRates,
    /// Consumer group used to commit offsets for lag tools.
    pub group_id: String,
}

/// Where a plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// A `.wasm` file (relative paths are relative to the pipeline file).
    File(PathBuf),
    /// One of the plugins embedded in the binary.
    Builtin(String),
    /// `<name>.wasm` (and its config, `<name>.toml`, if present) in the plugin directory,
    /// watched while the pipeline runs: a new version is swapped in live.
    Dir(String),
}

/// One step of the plugin chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Where the component comes from.
    pub source: PluginSource,
    /// Its configuration, as JSON text.
    pub config: String,
    /// Its sandbox limits.
    pub limits: Limits,
    /// What it does when a batch fails in it.
    pub failure: FailurePolicy,
}

/// Where output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Parquet files under a local path or an object-store URL.
    Parquet {
        /// Local directory or object-store URL (`file://`, `s3://`, `gs://`, `az://`,
        /// `memory://`, …).
        path: String,
        /// Column compression.
        compression: ParquetCompression,
        /// Object-store options (credentials, region, endpoint), passed to the store.
        options: BTreeMap<String, String>,
    },
    /// JSON lines to a file, or stdout for `-`.
    Jsonl {
        /// File path or `-`.
        path: String,
    },
    /// A Kafka topic on the same cluster.
    Kafka {
        /// Topic name.
        topic: String,
        /// What a restart may do to output already written.
        delivery: Delivery,
    },
}

/// What a Kafka sink guarantees across failures and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Every batch's records are acknowledged before its checkpoint; a batch replayed after
    /// a crash between the two is written again (duplicates, never losses).
    #[default]
    AtLeastOnce,
    /// Each batch's records and a marker of the batch are written in one Kafka transaction
    /// (`transactional.id` below); a replayed batch whose transaction committed is not
    /// written again, one that did not is aborted and written anew. Consumers that read
    /// with `isolation.level = read_committed` see each record once.
    ExactlyOnce {
        /// The producer's `transactional.id`: a new process with the same id fences the
        /// old one.
        transactional_id: String,
    },
}

impl Delivery {
    /// The names accepted in a pipeline file.
    pub const NAMES: &'static str = "\"at-least-once\" (default) or \"exactly-once\"";
}

impl Sink {
    /// The path or topic it writes to.
    pub fn target(&self) -> &str {
        match self {
            Sink::Parquet { path, .. } | Sink::Jsonl { path } => path,
            Sink::Kafka { topic, .. } => topic,
        }
    }
}

/// Compression of Parquet column chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParquetCompression {
    /// Snappy (Spark's default): fast, moderate ratio.
    #[default]
    Snappy,
    /// Zstandard at its default level: smaller files, a little slower.
    Zstd,
    /// No compression.
    None,
}

impl ParquetCompression {
    /// The names accepted in a pipeline file.
    pub const NAMES: &'static str = "\"snappy\" (default), \"zstd\" or \"none\"";

    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "snappy" => Some(Self::Snappy),
            "zstd" => Some(Self::Zstd),
            "none" | "uncompressed" => Some(Self::None),
            _ => None,
        }
    }
}

/// Where checkpoints go and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointing {
    /// Local directory or object-store URL.
    pub location: String,
    /// Object-store options (credentials, region, endpoint).
    pub options: BTreeMap<String, String>,
    /// Checkpoints kept (the newest ones); older ones and their logs are deleted.
    pub retain: usize,
}

/// PID backpressure (Spark's `spark.streaming.backpressure.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backpressure {
    /// Records/s of the batches before the first estimate; unlimited when `None`.
    pub initial_rate: Option<f64>,
    /// Gains and floor.
    pub pid: PidSettings,
}

/// Checkpoints kept when `checkpoint.retain` is not given.
pub const DEFAULT_RETAIN: usize = 10;

/// A checked pipeline, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// Pipeline name.
    pub name: String,
    /// Kafka source.
    pub source: Source,
    /// Batch interval (the first one, when it adapts).
    pub trigger_interval: Duration,
    /// Bounds of the adaptive batch interval; `None` unless `trigger.adaptive = true`.
    pub adaptive_interval: Option<AdaptiveInterval>,
    /// librdkafka properties, as strings.
    pub kafka: BTreeMap<String, String>,
    /// Plugin chain.
    pub steps: Vec<Step>,
    /// Where steps given by `name` find their plugin (`pluginDir`, or `sluice run
    /// --plugin-dir`).
    pub plugin_dir: Option<PathBuf>,
    /// Output.
    pub sink: Sink,
    /// Where records a plugin rejects go (`[deadLetter]`, same keys as `[sink]`); `None`:
    /// they are only logged.
    pub dead_letter: Option<Sink>,
    /// Checkpoints; `None` when `checkpoint.enabled = false`.
    pub checkpoint: Option<Checkpointing>,
    /// PID backpressure; `None` unless `backpressure.enabled = true`.
    pub backpressure: Option<Backpressure>,
}

/// A pipeline file that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read pipeline file {path}: {error}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        error: std::io::Error,
    },
    /// Not valid TOML, or a key or type that the pipeline file does not have.
    #[error("{path}: {message}")]
    Syntax {
        /// File.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value that is not allowed.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// File.
        path: String,
        /// The offending key, e.g. `source.topics`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// librdkafka properties sluice sets itself, and why.
const MANAGED_KAFKA_KEYS: [(&str, &str); 5] = [
    ("group.id", "set `source.groupId` instead"),
    ("enable.auto.commit", "sluice commits offsets itself after each batch is written"),
    ("auto.offset.reset", "set `source.startingOffsets` instead"),
    ("enable.auto.offset.store", "sluice stores offsets itself after each batch is written"),
    ("transactional.id", "set `deliveryGuarantee = \"exactly-once\"` (and optionally `transactionalId`) under [sink] instead"),
];

/// Default batch interval when `[trigger]` gives none.
pub const DEFAULT_TRIGGER_INTERVAL: Duration = Duration::from_secs(1);

fn valid_topic(name: &str) -> bool {
    !name.is_empty() && name.len() <= 249 && name != "." && name != ".." && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Check a `[sink]`-shaped table; `key` names it in messages.
/// `pipeline` is the pipeline's name (part of a default transactional id).
fn check_sink(raw: raw::RawSink, key: &str, pipeline: &str, source_topics: &[String], invalid: &dyn Fn(&str, String) -> ConfigError) -> Result<Sink, ConfigError> {
    let at = |k: &str| format!("{key}.{k}");
    Ok(match raw {
        raw::RawSink::Parquet { path, .. } if path.trim().is_empty() => return Err(invalid(&at("path"), "must not be empty".into())),
        raw::RawSink::Jsonl { path } if path.trim().is_empty() => return Err(invalid(&at("path"), "must not be empty; use `-` for stdout".into())),
        raw::RawSink::Kafka { topic, .. } if !valid_topic(&topic) => return Err(invalid(&at("topic"), format!("`{topic}` is not a Kafka topic name"))),
        raw::RawSink::Kafka { topic, .. } if source_topics.contains(&topic) => {
            return Err(invalid(&at("topic"), format!("`{topic}` is also a source topic: the pipeline would read its own output")))
        }
        raw::RawSink::Parquet { path, compression, options } => {
            crate::store::check_location(&path).map_err(|message| invalid(&at("path"), message))?;
            let compression = match compression {
                None => ParquetCompression::default(),
                Some(name) => ParquetCompression::parse(&name)
                    .ok_or_else(|| invalid(&at("compression"), format!("`{name}` is not a Parquet compression; use {}", ParquetCompression::NAMES)))?,
            };
            if !options.is_empty() && !path.contains("://") {
                return Err(invalid(&at("options"), "object-store options apply to URLs like `s3://bucket/prefix`; remove them for a local directory".into()));
            }
            Sink::Parquet { path, compression, options }
        }
        raw::RawSink::Jsonl { path } => Sink::Jsonl { path },
        raw::RawSink::Kafka { topic, delivery_guarantee, transactional_id } => {
            let delivery = match delivery_guarantee.as_deref() {
                None | Some("at-least-once") => {
                    if transactional_id.is_some() {
                        return Err(invalid(&at("transactionalId"), "applies only with `deliveryGuarantee = \"exactly-once\"`; add that or remove it".into()));
                    }
                    Delivery::AtLeastOnce
                }
                Some("exactly-once") => match transactional_id {
                    Some(id) if id.trim().is_empty() => return Err(invalid(&at("transactionalId"), "must not be empty; leave it out for the default".into())),
                    Some(id) => Delivery::ExactlyOnce { transactional_id: id },
                    // One producer per pipeline, output and task (one task today).
                    None => Delivery::ExactlyOnce { transactional_id: format!("sluice-{pipeline}-{key}-0") },
                },
                Some(other) => return Err(invalid(&at("deliveryGuarantee"), format!("`{other}` is not a delivery guarantee; use {}", Delivery::NAMES))),
            };
            Sink::Kafka { topic, delivery }
        }
    })
}

/// A plugin name usable as a file name in the plugin directory.
fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

impl Pipeline {
    /// Read and check a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.display().to_string(), error })?;
        Self::parse(&text, path)
    }

    /// Check pipeline text; `path` names it in messages and anchors relative plugin paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let raw: raw::RawPipeline = toml::from_str(text).map_err(|e| ConfigError::Syntax { path: shown.clone(), message: e.to_string().trim_end().to_string() })?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: raw::RawPipeline, path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let invalid = |key: &str, message: String| ConfigError::Invalid { path: shown.clone(), key: key.to_string(), message };

        let name = raw.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()));
        if name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }

        if raw.source.topics.is_empty() {
            return Err(invalid("source.topics", "list at least one topic to read, e.g. `topics = [\"ad-events\"]`".into()));
        }
        if let Some(bad) = raw.source.topics.iter().find(|t| !valid_topic(t)) {
            return Err(invalid("source.topics", format!("`{bad}` is not a Kafka topic name (1-249 characters of a-z, A-Z, 0-9, `.`, `_`, `-`)")));
        }
        let max_offsets_per_trigger = match raw.source.max_offsets_per_trigger {
            None => None,
            Some(n) if n > 0 => Some(n as u64),
            Some(n) => return Err(invalid("source.maxOffsetsPerTrigger", format!("must be a positive number of records, got {n}"))),
        };
        let positive_rate = |key: &str, value: Option<f64>| match value {
            Some(r) if !(r.is_finite() && r > 0.0) => Err(invalid(key, format!("must be a positive number of records per second, got {r}"))),
            other => Ok(other),
        };
        let partition_rates = PartitionRates {
            max: positive_rate("source.maxRatePerPartition", raw.source.max_rate_per_partition)?,
            min: positive_rate("source.minRatePerPartition", raw.source.min_rate_per_partition)?,
        };
        if let (Some(max), Some(min)) = (partition_rates.max, partition_rates.min) {
            if min > max {
                return Err(invalid("source.minRatePerPartition", format!("{min} is above source.maxRatePerPartition {max}")));
            }
        }
        let group_id = raw.source.group_id.unwrap_or_else(|| format!("sluice-{name}"));
        if group_id.trim().is_empty() {
            return Err(invalid("source.groupId", "must not be empty".into()));
        }
        let source = Source {
            topics: raw.source.topics,
            starting_offsets: match raw.source.starting_offsets {
                None | Some(raw::RawStartingOffsets::Latest) => StartingOffsets::Latest,
                Some(raw::RawStartingOffsets::Earliest) => StartingOffsets::Earliest,
            },
            max_offsets_per_trigger,
            partition_rates,
            group_id,
        };

        let trigger_interval = match raw.trigger.processing_time {
            None => DEFAULT_TRIGGER_INTERVAL,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return Err(invalid("trigger.processingTime", "must be longer than zero".into())),
                Err(e) => return Err(invalid("trigger.processingTime", format!("`{text}` is not a duration like `500ms` or `10s`: {e}"))),
            },
        };

        let interval = |key: &str, text: &str| match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(invalid(key, format!("`{text}` is not a positive duration like `500ms` or `10s`"))),
        };
        let adaptive_interval = if raw.trigger.adaptive == Some(true) {
            let min = match &raw.trigger.min_interval {
                Some(t) => interval("trigger.minInterval", t)?,
                None => trigger_interval.min(Duration::from_secs(1)),
            };
            let max = match &raw.trigger.max_interval {
                Some(t) => interval("trigger.maxInterval", t)?,
                None => trigger_interval.max(Duration::from_secs(60)),
            };
            if !(min <= trigger_interval && trigger_interval <= max) {
                return Err(invalid(
                    "trigger",
                    format!(
                        "processingTime {} must lie between minInterval {} and maxInterval {}",
                        humantime::format_duration(trigger_interval),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
            Some(AdaptiveInterval { min, max })
        } else {
            if raw.trigger.min_interval.is_some() || raw.trigger.max_interval.is_some() {
                return Err(invalid("trigger.adaptive", "minInterval and maxInterval apply only with `adaptive = true`; add it or remove them".into()));
            }
            None
        };

        let mut kafka = BTreeMap::new();
        for (key, value) in raw.kafka {
            if let Some((_, why)) = MANAGED_KAFKA_KEYS.iter().find(|(k, _)| *k == key) {
                return Err(invalid(&format!("kafka.\"{key}\""), format!("is managed by sluice: {why}")));
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => return Err(invalid(&format!("kafka.\"{key}\""), format!("librdkafka properties are strings, numbers or booleans, got a {}", other.type_str()))),
            };
            kafka.insert(key, text);
        }
        if !kafka.contains_key("bootstrap.servers") {
            return Err(invalid("kafka", "`\"bootstrap.servers\"` is missing: add `\"bootstrap.servers\" = \"host:9092\"` under [kafka]".into()));
        }

        if raw.plugin.is_empty() {
            return Err(invalid("plugin", "add at least one [[plugin]] step with `path` or `builtin`".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let has_dead_letter = raw.dead_letter.is_some();
        let steps = raw
            .plugin
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let key = |k: &str| format!("plugin[{i}].{k}");
                let source = match (p.path, p.builtin, p.name) {
                    (Some(file), None, None) => PluginSource::File(base.join(file)),
                    (None, Some(name), None) => PluginSource::Builtin(name),
                    (None, None, Some(name)) if valid_plugin_name(&name) => PluginSource::Dir(name),
                    (None, None, Some(name)) => {
                        return Err(invalid(
                            &key("name"),
                            format!("`{name}` is not a plugin name: use letters, digits, `-` and `_` (the plugin is `<name>.wasm` in the plugin directory)"),
                        ))
                    }
                    _ => {
                        return Err(invalid(
                            &format!("plugin[{i}]"),
                            "give exactly one of `name` (a plugin in the plugin directory, swapped live), `path` (a .wasm file) or `builtin` (json-filter, ad-clicks)".into(),
                        ))
                    }
                };
                let config = match p.config {
                    None => "{}".to_string(),
                    Some(table) => serde_json::to_string(&table).map_err(|e| invalid(&key("config"), e.to_string()))?,
                };
                let mut limits = Limits::default();
                if let Some(mb) = p.memory_mb {
                    if mb <= 0 {
                        return Err(invalid(&key("memoryMb"), format!("must be a positive number of MiB, got {mb}")));
                    }
                    limits.memory_bytes = (mb as usize) << 20;
                }
                if let Some(mb) = p.max_output_mb {
                    if mb <= 0 {
                        return Err(invalid(&key("maxOutputMb"), format!("must be a positive number of MiB, got {mb}")));
                    }
                    limits.max_output_bytes = (mb as usize) << 20;
                }
                if let Some(text) = p.call_timeout {
                    limits.call_timeout = match humantime::parse_duration(&text) {
                        Ok(d) if !d.is_zero() => d,
                        _ => return Err(invalid(&key("callTimeout"), format!("`{text}` is not a positive duration like `500ms` or `10s`"))),
                    };
                }
                let mut failure = FailurePolicy::default();
                if let Some(n) = p.retries {
                    failure.retries = u32::try_from(n).ok().filter(|n| *n <= 100).ok_or_else(|| invalid(&key("retries"), format!("must be 0 to 100, got {n}")))?;
                }
                if let Some(text) = p.retry_backoff {
                    failure.backoff = humantime::parse_duration(&text).map_err(|_| invalid(&key("retryBackoff"), format!("`{text}` is not a duration like `500ms` or `1s`")))?;
                }
                match p.on_failure.as_deref() {
                    None | Some("stop") => {}
                    Some("dead-letter") if has_dead_letter => failure.then = OnFailure::DeadLetter,
                    Some("dead-letter") => {
                        return Err(invalid(&key("onFailure"), "`dead-letter` needs a [deadLetter] sink to send the batch's records to; add one, or use `stop`".into()))
                    }
                    Some(other) => return Err(invalid(&key("onFailure"), format!("`{other}` is not a failure action; use `stop` or `dead-letter`"))),
                }
                Ok(Step { source, config, limits, failure })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let sink = check_sink(raw.sink, "sink", &name, &source.topics, &invalid)?;
        let dead_letter = raw.dead_letter.map(|d| check_sink(d, "deadLetter", &name, &source.topics, &invalid)).transpose()?;
        if dead_letter.as_ref().is_some_and(|d| d.target() == sink.target()) {
            return Err(invalid("deadLetter", "is the same place as [sink]; give dead letters a path or topic of their own".into()));
        }

        let raw_checkpoint = raw.checkpoint.unwrap_or_default();
        let checkpoint = if raw_checkpoint.enabled == Some(false) {
            if raw_checkpoint.location.is_some() || raw_checkpoint.retain.is_some() || !raw_checkpoint.options.is_empty() {
                return Err(invalid("checkpoint.enabled", "checkpointing is off, so the other [checkpoint] keys have no effect; remove them or `enabled = false`".into()));
            }
            None
        } else {
            let location = match raw_checkpoint.location {
                Some(l) if l.trim().is_empty() => return Err(invalid("checkpoint.location", "must not be empty; leave it out for the default".into())),
                Some(l) if l.contains("://") => {
                    crate::store::check_location(&l).map_err(|message| invalid("checkpoint.location", message))?;
                    l
                }
                // Like the sink path, a relative location is relative to the working directory.
                Some(l) => l,
                None => {
                    let dir: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
                    format!("checkpoints/{dir}")
                }
            };
            if !raw_checkpoint.options.is_empty() && !location.contains("://") {
                return Err(invalid("checkpoint.options", "object-store options apply to URLs like `s3://bucket/prefix`; remove them for a local directory".into()));
            }
            let retain = match raw_checkpoint.retain {
                None => DEFAULT_RETAIN,
                Some(n) if n >= 1 => n as usize,
                Some(n) => return Err(invalid("checkpoint.retain", format!("keep at least 1 checkpoint, got {n}"))),
            };
            Some(Checkpointing { location, options: raw_checkpoint.options, retain })
        };

        for (key, sink) in [("sink", Some(&sink)), ("deadLetter", dead_letter.as_ref())] {
            if let (Some(Sink::Kafka { delivery: Delivery::ExactlyOnce { .. }, .. }), None) = (sink, &checkpoint) {
                return Err(invalid(
                    &format!("{key}.deliveryGuarantee"),
                    "`exactly-once` needs checkpointing: a restart decides from the checkpoint which batches to replay; remove `enabled = false` from [checkpoint] or use `at-least-once`".into(),
                ));
            }
        }
        if let (Sink::Kafka { delivery: Delivery::ExactlyOnce { transactional_id: a }, .. }, Some(Sink::Kafka { delivery: Delivery::ExactlyOnce { transactional_id: b }, .. })) =
            (&sink, &dead_letter)
        {
            if a == b {
                return Err(invalid("deadLetter.transactionalId", format!("`{b}` is also the sink's: the two producers would fence each other; give each its own id")));
            }
        }

        let raw_bp = raw.backpressure.unwrap_or_default();
        let backpressure = if raw_bp.enabled == Some(true) {
            let defaults = PidSettings::default();
            let gain = |key: &str, value: Option<f64>, default: f64| match value {
                Some(g) if !(g.is_finite() && g >= 0.0) => Err(invalid(key, format!("must be zero or a positive number, got {g}"))),
                Some(g) => Ok(g),
                None => Ok(default),
            };
            let pid = PidSettings {
                proportional: gain("backpressure.pid.proportional", raw_bp.pid.proportional, defaults.proportional)?,
                integral: gain("backpressure.pid.integral", raw_bp.pid.integral, defaults.integral)?,
                derived: gain("backpressure.pid.derived", raw_bp.pid.derived, defaults.derived)?,
                min_rate: positive_rate("backpressure.pid.minRate", raw_bp.pid.min_rate)?.unwrap_or(defaults.min_rate),
            };
            Some(Backpressure { initial_rate: positive_rate("backpressure.initialRate", raw_bp.initial_rate)?, pid })
        } else {
            let set = raw_bp.initial_rate.is_some()
                || raw_bp.pid.proportional.is_some()
                || raw_bp.pid.integral.is_some()
                || raw_bp.pid.derived.is_some()
                || raw_bp.pid.min_rate.is_some();
            if set {
                return Err(invalid("backpressure.enabled", "the [backpressure] settings apply only with `enabled = true`; add it or remove them".into()));
            }
            None
        };

        let plugin_dir = match raw.plugin_dir {
            Some(dir) if dir.trim().is_empty() => return Err(invalid("pluginDir", "must not be empty".into())),
            Some(dir) => Some(base.join(dir)),
            None => None,
        };
        Ok(Self { name, source, trigger_interval, adaptive_interval, kafka, steps, plugin_dir, sink, dead_letter, checkpoint, backpressure })
    }
}
