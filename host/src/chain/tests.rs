use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array};
use arrow_schema::{DataType, Field, Schema};
use sluice_sdk::{RecordParts, RecordsBuilder};

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;

use super::*;

/// An aggregate that counts records; its state is the count. `fail_first` makes its
/// first `process` call fail.
struct Counter {
    name: &'static str,
    version: &'static str,
    state_version: u32,
    count: i64,
    fail_first: bool,
    /// Calls to `process` that fail, shared by the instance and its rebuilds.
    failures: Arc<std::sync::atomic::AtomicU32>,
    schema: SchemaRef,
}

fn failed(message: &str) -> CallError {
    CallError::Plugin { plugin: "count".into(), call: "process", kind: sluice_sdk::ErrorKind::BatchFailed, message: message.into() }
}

fn counter(name: &'static str, version: &'static str, state_version: u32) -> Box<Counter> {
    let schema = Arc::new(Schema::new(vec![Field::new("count", DataType::Int64, false)]));
    Box::new(Counter { name, version, state_version, count: 0, fail_first: false, failures: Default::default(), schema })
}

impl Stage for Counter {
    fn name(&self) -> &str {
        self.name
    }
    fn version(&self) -> &str {
        self.version
    }
    fn kind(&self) -> PluginKind {
        PluginKind::Aggregate
    }
    fn output_schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn process(&mut self, batch: &RecordBatch, _ctx: &Context) -> Result<Finished, CallError> {
        if std::mem::take(&mut self.fail_first) {
            return Err(failed("broken on purpose"));
        }
        let failing = self.failures.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if failing {
            // Half the batch counted, then a failure: a rebuilt instance must not keep it.
            self.count += batch.num_rows() as i64 / 2;
            return Err(failed("trapped on purpose"));
        }
        self.count += batch.num_rows() as i64;
        let column: ArrayRef = Arc::new(Int64Array::from(vec![self.count]));
        Ok(Finished { batches: vec![RecordBatch::try_new(self.schema.clone(), vec![column]).unwrap()], ..Finished::default() })
    }
    fn identity(&self) -> PluginIdentity {
        PluginIdentity { name: self.name.into(), version: self.version.into(), content_hash: self.version.into(), state_version: self.state_version }
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        Ok(self.count.to_le_bytes().to_vec())
    }
    fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
        if state_version != self.state_version {
            return Err(failed(&format!("cannot read state version {state_version}")));
        }
        self.count = i64::from_le_bytes(state.try_into().unwrap());
        Ok(())
    }
    fn rebuild(&mut self) -> Result<(), CallError> {
        self.count = 0;
        Ok(())
    }
}

fn policy(retries: u32, then: OnFailure) -> FailurePolicy {
    FailurePolicy { retries, backoff: Duration::from_millis(1), then }
}

/// A chain of one counter that fails its next `failures` batches, after a first batch
/// of 3 records and a checkpoint.
fn failing_after_a_checkpoint(failures: u32, policy: FailurePolicy) -> Chain {
    let c = counter("count", "1", 1);
    let shared = c.failures.clone();
    let mut chain = Chain::of_stages(vec![c]).unwrap();
    chain.set_policies([policy]);
    chain.process(records(3), &Context::default()).unwrap();
    chain.snapshot().unwrap();
    shared.store(failures, std::sync::atomic::Ordering::SeqCst);
    chain
}

#[test]
fn a_failed_batch_is_retried_on_a_fresh_instance_holding_the_checkpointed_state() {
    let mut chain = failing_after_a_checkpoint(2, policy(2, OnFailure::Stop));
    let out = chain.process(records(4), &Context::default()).unwrap();
    assert_eq!(count(&out), 7, "3 before, 4 now, nothing of the failed attempts");
    assert!(out.rejected.is_empty());
    assert_eq!(out.failures, vec![StepId::new("count", "1"); 2], "both failed calls are counted");
}

#[test]
fn when_the_retries_fail_too_the_run_stops_or_the_batch_goes_to_the_dead_letters() {
    let mut chain = failing_after_a_checkpoint(3, policy(2, OnFailure::Stop));
    let e = chain.process(records(4), &Context::default()).unwrap_err();
    assert!(e.to_string().contains("trapped on purpose"), "{e}");

    let mut chain = failing_after_a_checkpoint(3, policy(2, OnFailure::DeadLetter));
    let out = chain.process(records(4), &Context::default()).unwrap();
    assert!(out.batches.is_empty());
    assert_eq!(out.rejected.len(), 4);
    assert_eq!(out.failures.len(), 3);
    assert!(out.rejected[0].reason.contains("failed in count 1 3 times") && out.rejected[0].reason.contains("trapped on purpose"), "{}", out.rejected[0].reason);
    let out = chain.process(records(2), &Context::default()).unwrap();
    assert_eq!(count(&out), 5, "the next batch goes on from the checkpointed state");
}

fn records(n: i64) -> RecordBatch {
    let mut b = RecordsBuilder::default();
    for offset in 0..n {
        b.append(RecordParts { topic: "t", partition: 0, offset, timestamp: None, key: None, value: Some(b"{}") }, []);
    }
    b.finish()
}

fn count(out: &ChainOutput) -> i64 {
    out.batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[test]
fn a_swapped_in_version_takes_over_the_state_and_is_kept_after_its_first_batch() {
    let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
    assert_eq!(count(&chain.process(records(3), &Context::default()).unwrap()), 3);
    chain.swap(0, counter("count", "2", 1)).unwrap();
    let out = chain.process(records(2), &Context::default()).unwrap();
    assert_eq!((count(&out), out.promoted.clone()), (5, vec![StepId::new("count", "2")]));
    assert_eq!(chain.stages().next().unwrap().version(), "2");
    let out = chain.process(records(1), &Context::default()).unwrap();
    assert!(out.promoted.is_empty() && out.rolled_back.is_empty());
}

#[test]
fn a_version_that_fails_its_first_batch_gives_way_to_the_one_before_which_processes_it() {
    let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
    chain.process(records(3), &Context::default()).unwrap();
    let mut broken = counter("count", "2", 1);
    broken.fail_first = true;
    chain.swap(0, broken).unwrap();
    let out = chain.process(records(2), &Context::default()).unwrap();
    assert_eq!(count(&out), 5, "the batch was processed once, by version 1");
    assert_eq!(out.rolled_back.len(), 1);
    assert_eq!(out.failures, vec![StepId::new("count", "2")]);
    assert_eq!((out.rolled_back[0].failed.as_str(), out.rolled_back[0].running.as_str()), ("count 2", "count 1"));
    assert!(out.rolled_back[0].error.contains("broken on purpose"));
    assert_eq!(chain.stages().next().unwrap().version(), "1");
}

#[test]
fn a_swap_that_would_lose_or_misread_state_is_refused_and_changes_nothing() {
    let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
    chain.process(records(3), &Context::default()).unwrap();
    let e = chain.swap(0, counter("other", "1", 1)).unwrap_err();
    assert!(e.to_string().contains("only another version of count can take over"), "{e}");
    let e = chain.swap(0, counter("count", "2", 2)).unwrap_err();
    assert!(e.to_string().contains("refused the state of count 1 (state version 1)") && e.to_string().contains("migration"), "{e}");
    assert!(matches!(chain.swap(1, counter("count", "2", 1)), Err(SwapError::NoStep(1))));
    let out = chain.process(records(1), &Context::default()).unwrap();
    assert_eq!((count(&out), chain.stages().next().unwrap().version()), (4, "1"));
}

#[test]
fn an_aggregate_cannot_be_swapped_in_before_the_last_step() {
    let mut chain = Chain::of_stages(vec![counter("count", "1", 1)]).unwrap();
    chain.steps.insert(0, Step::new(counter("first", "1", 1)));
    let e = chain.swap(0, counter("first", "2", 1)).unwrap_err();
    assert!(matches!(e, SwapError::Chain(ChainError::AggregateNotLast(_))), "{e}");
}
