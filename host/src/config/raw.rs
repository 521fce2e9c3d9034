//! The pipeline file as written: serde structs that reject unknown keys, with names as serde
//! enums and durations read by `humantime-serde`. Nothing here is checked beyond types; see
//! [`super::Pipeline::from_raw`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::ParquetCompression;

/// A whole pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub name: Option<String>,
    #[serde(rename = "pluginDir")]
    pub plugin_dir: Option<String>,
    pub source: RawSource,
    #[serde(default)]
    pub trigger: RawTrigger,
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub plugin: Vec<RawPlugin>,
    pub sink: RawSink,
    #[serde(rename = "deadLetter")]
    pub dead_letter: Option<RawSink>,
    pub checkpoint: Option<RawCheckpoint>,
    pub backpressure: Option<RawBackpressure>,
}

/// `[backpressure]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawBackpressure {
    pub enabled: Option<bool>,
    pub initial_rate: Option<f64>,
    #[serde(default)]
    pub pid: RawPid,
}

/// `[backpressure.pid]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPid {
    pub proportional: Option<f64>,
    pub integral: Option<f64>,
    pub derived: Option<f64>,
    pub min_rate: Option<f64>,
}

/// `[checkpoint]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCheckpoint {
    pub enabled: Option<bool>,
    pub location: Option<String>,
    pub retain: Option<i64>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// `[source]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSource {
    pub topics: Vec<String>,
    pub starting_offsets: Option<RawStartingOffsets>,
    pub max_offsets_per_trigger: Option<i64>,
    pub max_rate_per_partition: Option<f64>,
    pub min_rate_per_partition: Option<f64>,
    pub group_id: Option<String>,
    pub assignment: Option<super::Assignment>,
    pub keyed: Option<bool>,
    pub watermark: Option<super::WatermarkScope>,
    pub repartition: Option<RawRepartition>,
}

/// `[source.repartition]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRepartition {
    pub topic: String,
    pub key: Option<String>,
}

/// `startingOffsets`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawStartingOffsets {
    Latest,
    Earliest,
}

/// `[trigger]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTrigger {
    #[serde(default, with = "humantime_serde")]
    pub processing_time: Option<Duration>,
    pub adaptive: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub min_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_interval: Option<Duration>,
}

/// One `[[plugin]]` step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPlugin {
    pub path: Option<String>,
    pub builtin: Option<String>,
    pub name: Option<String>,
    pub config: Option<toml::Table>,
    pub memory_mb: Option<i64>,
    pub max_output_mb: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    pub retries: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub retry_backoff: Option<Duration>,
    pub on_failure: Option<RawOnFailure>,
}

/// `onFailure` of a step.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawOnFailure {
    Stop,
    DeadLetter,
}

/// `deliveryGuarantee` of a Kafka sink.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawDelivery {
    AtLeastOnce,
    ExactlyOnce,
}

/// `[sink]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "format", rename_all = "lowercase")]
pub enum RawSink {
    Parquet {
        path: String,
        compression: Option<ParquetCompression>,
        #[serde(default)]
        options: BTreeMap<String, String>,
    },
    Jsonl {
        path: String,
    },
    Kafka {
        topic: String,
        #[serde(rename = "deliveryGuarantee")]
        delivery_guarantee: Option<RawDelivery>,
        #[serde(rename = "transactionalId")]
        transactional_id: Option<String>,
    },
}
