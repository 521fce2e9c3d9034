//! Run a plugin natively, without Kafka and without WebAssembly: for plugin unit tests
//! with plain `cargo test`, and as the native baseline in benchmarks.
//!
//! ```
//! # use sluice_sdk::{Transform, Batch, Context, Output, Error, NoConfig};
//! # #[derive(Default)] struct Upper;
//! # impl Transform for Upper {
//! #     type Config = NoConfig;
//! #     fn new(_: NoConfig) -> Result<Self, Error> { Ok(Upper) }
//! #     fn process(&mut self, b: &Batch, _: &Context, out: &mut Output) -> Result<(), Error> {
//! #         for r in b.records() { let v = r.value_str().unwrap_or("").to_uppercase(); out.forward(&r, Some(Some(v.as_bytes())))?; }
//! #         Ok(())
//! #     }
//! # }
//! use sluice_sdk::testing::TransformHarness;
//! let mut h = TransformHarness::<Upper>::new(serde_json::json!({})).unwrap();
//! let out = h.push_values(&["a", "b"]).unwrap();
//! assert_eq!(out.values(), vec!["A", "B"]);
//! ```

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use serde_json::{Map, Value};

use crate::driver::Instance;
pub use crate::driver::{AggregateDriver, Driver, TransformDriver};
use crate::output::{Finished, RecordError};
use crate::schema::{RecordParts, RecordsBuilder};
use crate::{Aggregate, Context, Error, Transform};

/// A plugin instance driven in-process, batch after batch, the way the host drives it.
pub struct Harness<D> {
    instance: Instance<D>,
    batch_id: u64,
    next_offset: i64,
    watermark_ms: Option<i64>,
}

/// A harness for a [`Transform`].
pub type TransformHarness<T> = Harness<TransformDriver<T>>;

/// A harness for an [`Aggregate`].
pub type AggregateHarness<A> = Harness<AggregateDriver<A>>;

/// The output of one batch, with rows as JSON objects.
#[derive(Debug, Clone, Default)]
pub struct TestOutput {
    /// Output rows.
    pub rows: Vec<Map<String, Value>>,
    /// Rejected input records.
    pub record_errors: Vec<RecordError>,
    /// The plugin's watermark after the batch.
    pub watermark_ms: Option<i64>,
    /// Records dropped as late.
    pub late_records: u64,
}

impl TestOutput {
    fn from_finished(f: Finished) -> Self {
        Self { rows: f.batches.iter().flat_map(crate::json::batch_to_rows).collect(), record_errors: f.record_errors, watermark_ms: f.watermark_ms, late_records: f.late_records }
    }

    /// The `value` column of each output row as text (record-schema outputs).
    pub fn values(&self) -> Vec<&str> {
        self.rows.iter().filter_map(|r| r.get("value").and_then(Value::as_str)).collect()
    }
}

impl<T: Transform> Harness<TransformDriver<T>> {
    /// Configure a transform.
    pub fn new(config: Value) -> Result<Self, Error> {
        Self::with_config(&config.to_string())
    }
}

impl<A: Aggregate> Harness<AggregateDriver<A>> {
    /// Configure an aggregate.
    pub fn new(config: Value) -> Result<Self, Error> {
        Self::with_config(&config.to_string())
    }
}

impl<D: Driver> Harness<D> {
    /// Configure from a JSON text.
    pub fn with_config(config: &str) -> Result<Self, Error> {
        Ok(Self { instance: Instance::init(config)?, batch_id: 0, next_offset: 0, watermark_ms: None })
    }

    /// The output schema for the configuration.
    pub fn output_schema(&self) -> &SchemaRef {
        self.instance.schema()
    }

    /// Build a batch from record values (topic `test`, partition 0, consecutive offsets).
    pub fn batch_of<S: AsRef<[u8]>>(&mut self, values: &[S]) -> RecordBatch {
        let mut b = RecordsBuilder::with_capacity(values.len(), 0);
        for v in values {
            b.append(RecordParts { topic: "test", partition: 0, offset: self.next_offset, timestamp: None, key: None, value: Some(v.as_ref()) }, []);
            self.next_offset += 1;
        }
        b.finish()
    }

    /// Process a batch of record values.
    pub fn push_values<S: AsRef<[u8]>>(&mut self, values: &[S]) -> Result<TestOutput, Error> {
        let batch = self.batch_of(values);
        self.push_batch(batch, None).map(TestOutput::from_finished)
    }

    /// Process an Arrow batch, with the host's watermark floor (the previous batch's
    /// watermark when `None`).
    pub fn push_batch(&mut self, batch: RecordBatch, watermark_ms: Option<i64>) -> Result<Finished, Error> {
        let ctx = Context { batch_id: self.batch_id, offset_ranges: Vec::new(), processing_time_ms: 0, watermark_ms: watermark_ms.or(self.watermark_ms) };
        self.batch_id += 1;
        let finished = self.instance.process_batch(batch, &ctx)?;
        self.watermark_ms = finished.watermark_ms.or(self.watermark_ms);
        Ok(finished)
    }

    /// Final flush: an empty batch with the watermark at `i64::MAX`.
    pub fn flush(&mut self) -> Result<TestOutput, Error> {
        let batch = self.batch_of::<&[u8]>(&[]);
        self.push_batch(batch, Some(i64::MAX)).map(TestOutput::from_finished)
    }

    /// Serialize the state, as a checkpoint would.
    pub fn snapshot(&self) -> Result<Vec<u8>, Error> {
        self.instance.snapshot()
    }

    /// Restore state taken by [`snapshot`](Self::snapshot), written by `state_version`.
    pub fn restore(&mut self, bytes: &[u8], state_version: u32) -> Result<(), Error> {
        self.instance.restore(bytes, state_version)
    }
}
