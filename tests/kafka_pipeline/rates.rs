//! Rate limits and backpressure on a real client.

use super::*;

#[test]
fn rate_limits_cap_each_batch_and_the_rest_waits_in_kafka() {
    let broker = Mock::start().unwrap();
    broker.create_topic("events", 2).unwrap();
    produce_ids(&broker, "events", &[0, 1], 0..600);
    let mut p = pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    p.trigger_interval = Duration::from_millis(100);
    p.source.partition_rates = sluice::rate::PartitionRates { max: Some(1_000.0), min: None };
    let mut sizes = Vec::new();
    let summary =
        pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut FailingSink { ok: usize::MAX, written: Vec::new() }, &mut |b| sizes.push(b.records))
            .unwrap();
    assert_eq!(summary.records, 600, "nothing dropped");
    assert_eq!(sizes, [200, 200, 200, 0], "1000 records/s per partition × 100 ms × 2 partitions, then the final flush");

    // Backpressure starts at initialRate and then follows what the pipeline processes.
    let mut p = pipeline(&broker.bootstrap(), &["events"], StartingOffsets::Earliest, None, vec![builtin("json-filter", "{}")]);
    p.source.group_id = "bp".into();
    p.trigger_interval = Duration::from_millis(100);
    p.backpressure = Some(sluice::config::Backpressure { initial_rate: Some(500.0), pid: Default::default() });
    let mut sizes = Vec::new();
    let summary =
        pipeline::run(&checked(&p), &runtime(), Until::AvailableNow, &Control::new(), &mut FailingSink { ok: usize::MAX, written: Vec::new() }, &mut |b| sizes.push(b.records))
            .unwrap();
    assert_eq!(summary.records, 600);
    assert_eq!(sizes[..2], [50, 50], "500 records/s × 100 ms before the first estimate: {sizes:?}");
    assert!(sizes[2] > 50, "the estimate follows the processing rate, far above 500/s: {sizes:?}");
}
