//! The pipeline file (TOML), read in three stages: [`raw`] structs that reject unknown keys,
//! [`Pipeline::from_raw`], which converts them, and [`Pipeline::check`], which checks values
//! and their combinations for every pipeline (a file's, or one built in code) and says which
//! key is wrong and how to fix it. Names follow Spark (`startingOffsets`,
//! `maxOffsetsPerTrigger`, `processingTime`) and librdkafka (the `[kafka]` table is passed
//! to librdkafka as-is).
//!
//! This module only describes a pipeline; it must not open connections or load plugins.

mod check;
mod failure;
mod raw;

pub use check::CheckedPipeline;
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

/// How a run's partitions are assigned: every partition to one process, or to the
/// processes of one consumer group, a task per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// One process reads every partition as one task.
    #[default]
    All,
    /// The processes of the consumer group share the partitions, a task per partition.
    Group,
}

/// The watermark a consumer-group task hands its plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatermarkScope {
    /// The task's own (Kafka Streams' stream time): a partition's windows close as its own
    /// events advance; an idle partition's windows stay open.
    #[default]
    Task,
    /// The highest committed watermark of all the group's tasks (Spark's one watermark per
    /// query): an idle partition's windows close as the others advance.
    Global,
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
    /// Consumer group used to commit offsets for lag tools, and in group mode the group
    /// whose processes share the partitions.
    pub group_id: String,
    /// One process for every partition, or the processes of the consumer group sharing them.
    pub assignment: Assignment,
    /// The input's Kafka key is what stateful steps group by, so one partition's task sees
    /// every record of a key (consumer-group runs warn when a stateful pipeline does not
    /// say so).
    pub keyed: bool,
    /// Which watermark a consumer-group task hands its plugins.
    pub watermark: WatermarkScope,
    /// In a consumer group, input not keyed by what the aggregate groups by goes through
    /// this topic, keyed anew, before the aggregate.
    pub repartition: Option<Repartition>,
}

/// A consumer group's repartition topic (`[source.repartition]`): the steps before the
/// aggregate run in tasks of the source partitions and produce their output to `topic`,
/// keyed by `key`; the aggregate runs in tasks of `topic`'s partitions, so each sees every
/// record of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartition {
    /// The topic (created with the source's partition count when it does not exist).
    pub topic: String,
    /// A dotted path into each record's JSON value whose value becomes the record's key;
    /// `None`: the key the steps before the aggregate set.
    pub key: Option<String>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParquetCompression {
    /// Snappy (Spark's default): fast, moderate ratio.
    #[default]
    Snappy,
    /// Zstandard at its default level: smaller files, a little slower.
    Zstd,
    /// No compression.
    #[serde(alias = "uncompressed")]
    None,
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

/// A pipeline: what to read, the plugin steps, where output and checkpoints go. Runs take
/// it [checked](Pipeline::check).
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

/// Convert a `[sink]`-shaped table; `key` names it in messages.
/// `pipeline` is the pipeline's name (part of a default transactional id).
fn convert_sink(raw: raw::RawSink, key: &str, pipeline: &str, invalid: &dyn Fn(&str, String) -> ConfigError) -> Result<Sink, ConfigError> {
    Ok(match raw {
        raw::RawSink::Parquet { path, compression, options } => Sink::Parquet { path, compression: compression.unwrap_or_default(), options },
        raw::RawSink::Jsonl { path } => Sink::Jsonl { path },
        raw::RawSink::Kafka { topic, delivery_guarantee, transactional_id } => {
            let delivery = match delivery_guarantee {
                None | Some(raw::RawDelivery::AtLeastOnce) => {
                    if transactional_id.is_some() {
                        return Err(invalid(&format!("{key}.transactionalId"), "applies only with `deliveryGuarantee = \"exactly-once\"`; add that or remove it".into()));
                    }
                    Delivery::AtLeastOnce
                }
                // One producer per pipeline, output and task (one task today).
                Some(raw::RawDelivery::ExactlyOnce) => Delivery::ExactlyOnce { transactional_id: transactional_id.unwrap_or_else(|| format!("sluice-{pipeline}-{key}-0")) },
            };
            Sink::Kafka { topic, delivery }
        }
    })
}

impl Pipeline {
    /// Read and check a pipeline file.
    pub fn load(path: &Path) -> Result<CheckedPipeline, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.display().to_string(), error })?;
        Self::parse(&text, path)
    }

    /// Check pipeline text; `path` names it in messages and anchors relative plugin paths.
    pub fn parse(text: &str, path: &Path) -> Result<CheckedPipeline, ConfigError> {
        let shown = path.display().to_string();
        let raw: raw::RawPipeline = toml::from_str(text).map_err(|e| {
            // humantime-serde says only "expected a duration": say what one looks like.
            let message = e.to_string().trim_end().replace("expected a duration", "expected a duration like `500ms`, `10s` or `1m 30s`");
            ConfigError::Syntax { path: shown.clone(), message }
        })?;
        Self::from_raw(raw, path)
    }

    /// Convert what was read, refuse what only a file can get wrong, then [`Pipeline::check`].
    fn from_raw(raw: raw::RawPipeline, path: &Path) -> Result<CheckedPipeline, ConfigError> {
        let shown = path.display().to_string();
        let invalid = |key: &str, message: String| ConfigError::Invalid { path: shown.clone(), key: key.to_string(), message };

        let name = raw.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()));
        let max_offsets_per_trigger = match raw.source.max_offsets_per_trigger {
            None => None,
            Some(n) => Some(u64::try_from(n).map_err(|_| invalid("source.maxOffsetsPerTrigger", format!("must be a positive number of records, got {n}")))?),
        };
        let source = Source {
            topics: raw.source.topics,
            starting_offsets: match raw.source.starting_offsets {
                None | Some(raw::RawStartingOffsets::Latest) => StartingOffsets::Latest,
                Some(raw::RawStartingOffsets::Earliest) => StartingOffsets::Earliest,
            },
            max_offsets_per_trigger,
            partition_rates: PartitionRates { max: raw.source.max_rate_per_partition, min: raw.source.min_rate_per_partition },
            group_id: raw.source.group_id.unwrap_or_else(|| format!("sluice-{name}")),
            assignment: raw.source.assignment.unwrap_or_default(),
            keyed: raw.source.keyed.unwrap_or(false),
            watermark: raw.source.watermark.unwrap_or_default(),
            repartition: raw.source.repartition.map(|r| Repartition { topic: r.topic, key: r.key }),
        };

        let trigger_interval = raw.trigger.processing_time.unwrap_or(DEFAULT_TRIGGER_INTERVAL);
        if trigger_interval.is_zero() {
            return Err(invalid("trigger.processingTime", "must be longer than zero".into()));
        }
        let adaptive_interval = if raw.trigger.adaptive == Some(true) {
            Some(AdaptiveInterval {
                min: raw.trigger.min_interval.unwrap_or(trigger_interval.min(Duration::from_secs(1))),
                max: raw.trigger.max_interval.unwrap_or(trigger_interval.max(Duration::from_secs(60))),
            })
        } else {
            if raw.trigger.min_interval.is_some() || raw.trigger.max_interval.is_some() {
                return Err(invalid("trigger.adaptive", "minInterval and maxInterval apply only with `adaptive = true`; add it or remove them".into()));
            }
            None
        };

        let mut kafka = BTreeMap::new();
        for (key, value) in raw.kafka {
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
        let steps = raw
            .plugin
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let key = |k: &str| format!("plugin[{i}].{k}");
                let source = match (p.path, p.builtin, p.name) {
                    (Some(file), None, None) => PluginSource::File(base.join(file)),
                    (None, Some(name), None) => PluginSource::Builtin(name),
                    (None, None, Some(name)) => PluginSource::Dir(name),
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
                let mib = |k: &str, mb: Option<i64>, default: usize| match mb {
                    None => Ok(default),
                    Some(mb) if mb > 0 => Ok((mb as usize) << 20),
                    Some(mb) => Err(invalid(&key(k), format!("must be a positive number of MiB, got {mb}"))),
                };
                let defaults = Limits::default();
                let limits = Limits {
                    memory_bytes: mib("memoryMb", p.memory_mb, defaults.memory_bytes)?,
                    max_output_bytes: mib("maxOutputMb", p.max_output_mb, defaults.max_output_bytes)?,
                    call_timeout: p.call_timeout.unwrap_or(defaults.call_timeout),
                };
                let mut failure = FailurePolicy::default();
                if let Some(n) = p.retries {
                    failure.retries = u32::try_from(n).map_err(|_| invalid(&key("retries"), format!("must be 0 to 100, got {n}")))?;
                }
                failure.backoff = p.retry_backoff.unwrap_or(failure.backoff);
                if let Some(raw::RawOnFailure::DeadLetter) = p.on_failure {
                    failure.then = OnFailure::DeadLetter;
                }
                Ok(Step { source, config, limits, failure })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let sink = convert_sink(raw.sink, "sink", &name, &invalid)?;
        let dead_letter = raw.dead_letter.map(|d| convert_sink(d, "deadLetter", &name, &invalid)).transpose()?;

        let raw_checkpoint = raw.checkpoint.unwrap_or_default();
        let checkpoint = if raw_checkpoint.enabled == Some(false) {
            if raw_checkpoint.location.is_some() || raw_checkpoint.retain.is_some() || !raw_checkpoint.options.is_empty() {
                return Err(invalid("checkpoint.enabled", "checkpointing is off, so the other [checkpoint] keys have no effect; remove them or `enabled = false`".into()));
            }
            None
        } else {
            // Like the sink path, a relative location is relative to the working directory.
            let location = raw_checkpoint.location.unwrap_or_else(|| {
                let dir: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
                format!("checkpoints/{dir}")
            });
            let retain = match raw_checkpoint.retain {
                None => DEFAULT_RETAIN,
                Some(n) => usize::try_from(n).map_err(|_| invalid("checkpoint.retain", format!("keep at least 1 checkpoint, got {n}")))?,
            };
            Some(Checkpointing { location, options: raw_checkpoint.options, retain })
        };

        let raw_bp = raw.backpressure.unwrap_or_default();
        let backpressure = if raw_bp.enabled == Some(true) {
            let defaults = PidSettings::default();
            let pid = PidSettings {
                proportional: raw_bp.pid.proportional.unwrap_or(defaults.proportional),
                integral: raw_bp.pid.integral.unwrap_or(defaults.integral),
                derived: raw_bp.pid.derived.unwrap_or(defaults.derived),
                min_rate: raw_bp.pid.min_rate.unwrap_or(defaults.min_rate),
            };
            Some(Backpressure { initial_rate: raw_bp.initial_rate, pid })
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

        let plugin_dir = raw.plugin_dir.map(|dir| if dir.trim().is_empty() { PathBuf::new() } else { base.join(dir) });
        Self { name, source, trigger_interval, adaptive_interval, kafka, steps, plugin_dir, sink, dead_letter, checkpoint, backpressure }.check_as(&shown)
    }
}
