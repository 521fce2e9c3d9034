//! The check applies to pipelines built in code as to files (the files' messages are tested
//! with tests/pipelines/bad).

use std::collections::BTreeMap;
use std::time::Duration;

use super::super::{Checkpointing, Delivery, Pipeline, PluginSource, Sink, Source, StartingOffsets, Step, DEFAULT_RETAIN};
use crate::config::ConfigError;
use crate::runtime::Limits;

fn literal() -> Pipeline {
    Pipeline {
        name: "coded".into(),
        source: Source {
            topics: vec!["in".into()],
            starting_offsets: StartingOffsets::Earliest,
            max_offsets_per_trigger: None,
            partition_rates: Default::default(),
            group_id: "g".into(),
            assignment: Default::default(),
            keyed: false,
            repartition: None,
            watermark: Default::default(),
        },
        trigger_interval: Duration::from_secs(1),
        adaptive_interval: None,
        kafka: BTreeMap::from([("bootstrap.servers".to_string(), "127.0.0.1:9092".to_string())]),
        steps: vec![Step { source: PluginSource::Builtin("json-filter".into()), config: "{}".into(), limits: Limits::default(), failure: Default::default() }],
        plugin_dir: None,
        sink: Sink::Jsonl { path: "out.jsonl".into() },
        dead_letter: None,
        checkpoint: Some(Checkpointing { location: "memory://".into(), options: BTreeMap::new(), retain: DEFAULT_RETAIN }),
        backpressure: None,
    }
}

fn refused(p: Pipeline) -> (String, String) {
    match p.check() {
        Err(ConfigError::Invalid { path, key, .. }) => (path, key),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_valid_pipeline_built_in_code_passes_and_reads_as_itself() {
    let checked = literal().check().unwrap();
    assert_eq!(*checked, literal());
    let back_to_back = Pipeline { trigger_interval: Duration::ZERO, ..literal() };
    assert!(back_to_back.check().is_ok(), "code may run batches back to back");
}

#[test]
fn pipelines_built_in_code_are_refused_for_what_files_are_refused_for() {
    let same_place = Pipeline { dead_letter: Some(Sink::Jsonl { path: "out.jsonl".into() }), ..literal() };
    assert_eq!(refused(same_place), ("pipeline `coded`".to_string(), "deadLetter".to_string()));
    let mut managed = literal();
    managed.kafka.insert("enable.auto.commit".into(), "true".into());
    assert_eq!(refused(managed).1, "kafka.\"enable.auto.commit\"");
    let mut loops = literal();
    loops.sink = Sink::Kafka { topic: "in".into(), delivery: Delivery::AtLeastOnce };
    assert_eq!(refused(loops).1, "sink.topic");
    let mut no_memory = literal();
    no_memory.steps[0].limits.memory_bytes = 0;
    assert_eq!(refused(no_memory).1, "plugin[0].memoryMb");
    let no_topics = Pipeline { source: Source { topics: vec![], ..literal().source }, ..literal() };
    assert_eq!(refused(no_topics).1, "source.topics");
}

#[test]
fn a_change_is_checked_again_and_keeps_the_origin_in_messages() {
    let checked = literal().check().unwrap();
    let error = checked
        .change(|p| {
            p.checkpoint = None;
            p.sink = Sink::Kafka { topic: "out".into(), delivery: Delivery::ExactlyOnce { transactional_id: "t".into() } };
        })
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("pipeline `coded`: `sink.deliveryGuarantee`: `exactly-once` needs checkpointing"), "{error}");
    let moved = literal().check().unwrap().change(|p| p.plugin_dir = Some("plugins".into())).unwrap();
    assert_eq!(moved.plugin_dir.as_deref(), Some(std::path::Path::new("plugins")));
}
