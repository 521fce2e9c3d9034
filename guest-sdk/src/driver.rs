//! Turns an author's [`Transform`] or [`Aggregate`] into the five calls of the WIT world.
//!
//! The WebAssembly glue (`guest.rs`) and the native test harness (`testing.rs`) both drive
//! plugins through [`Driver`], so a plugin behaves the same natively and in WASM.

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::output::Finished;
use crate::schema::{decode_ipc, encode_ipc, is_record_schema, record_schema};
use crate::{Aggregate, Batch, Context, Error, Output, PluginKind, Transform};

/// Name, version and description of a plugin, taken from its `Cargo.toml` by the export
/// macro.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Package name.
    pub name: &'static str,
    /// Package version.
    pub version: &'static str,
    /// Package description.
    pub description: &'static str,
}

/// The calls of the WIT world, on Rust types.
pub trait Driver: Sized + 'static {
    /// Transform or aggregate.
    const KIND: PluginKind;
    /// State layout version (0 for transforms).
    const STATE_VERSION: u32;
    /// Output schema for the default configuration.
    fn default_schema() -> SchemaRef;
    /// Parse `config` (JSON) and build an instance; returns it with its output schema.
    fn init(config: &str) -> Result<(Self, SchemaRef), Error>;
    /// Process one batch.
    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error>;
    /// Serialize the state.
    fn snapshot(&self) -> Result<Vec<u8>, Error>;
    /// Restore state written by `state_version`.
    fn restore(&mut self, bytes: &[u8], state_version: u32) -> Result<(), Error>;
}

fn parse_config<C: serde::de::DeserializeOwned>(config: &str) -> Result<C, Error> {
    let text = if config.trim().is_empty() { "{}" } else { config };
    serde_json::from_str(text).map_err(|e| Error::config(e.to_string()))
}

/// Drives a [`Transform`].
pub struct TransformDriver<T> {
    inner: T,
}

impl<T: Transform> Driver for TransformDriver<T> {
    const KIND: PluginKind = PluginKind::Transform;
    const STATE_VERSION: u32 = 0;

    fn default_schema() -> SchemaRef {
        T::output_schema(&T::Config::default())
    }

    fn init(config: &str) -> Result<(Self, SchemaRef), Error> {
        let config: T::Config = parse_config(config)?;
        let schema = T::output_schema(&config);
        Ok((Self { inner: T::new(config)? }, schema))
    }

    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error> {
        self.inner.process(batch, ctx, out)
    }

    fn snapshot(&self) -> Result<Vec<u8>, Error> {
        Ok(Vec::new())
    }

    fn restore(&mut self, _bytes: &[u8], _state_version: u32) -> Result<(), Error> {
        Ok(())
    }
}

/// Drives an [`Aggregate`].
pub struct AggregateDriver<A> {
    inner: A,
}

impl<A: Aggregate> Driver for AggregateDriver<A> {
    const KIND: PluginKind = PluginKind::Aggregate;
    const STATE_VERSION: u32 = A::STATE_VERSION;

    fn default_schema() -> SchemaRef {
        A::output_schema(&A::Config::default())
    }

    fn init(config: &str) -> Result<(Self, SchemaRef), Error> {
        let config: A::Config = parse_config(config)?;
        let schema = A::output_schema(&config);
        Ok((Self { inner: A::new(config)? }, schema))
    }

    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error> {
        self.inner.process(batch, ctx, out)
    }

    fn snapshot(&self) -> Result<Vec<u8>, Error> {
        postcard::to_stdvec(self.inner.state()).map_err(|e| Error::incompatible_state(format!("state cannot be serialized: {e}")))
    }

    fn restore(&mut self, bytes: &[u8], state_version: u32) -> Result<(), Error> {
        let state = if state_version == A::STATE_VERSION {
            postcard::from_bytes(bytes).map_err(|e| Error::incompatible_state(format!("state of {} bytes (state version {state_version}) cannot be read: {e}", bytes.len())))?
        } else {
            A::migrate(state_version, bytes)?
        };
        self.inner.set_state(state);
        Ok(())
    }
}

/// A configured instance and its output schema, as the glue and the harness hold it.
pub struct Instance<D> {
    driver: D,
    schema: SchemaRef,
}

impl<D: Driver> Instance<D> {
    /// Configure a new instance.
    pub fn init(config: &str) -> Result<Self, Error> {
        let (driver, schema) = D::init(config)?;
        Ok(Self { driver, schema })
    }

    /// The output schema for this instance's configuration.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Process one Arrow batch in the record schema.
    pub fn process_batch(&mut self, batch: RecordBatch, ctx: &Context) -> Result<Finished, Error> {
        let batch = Batch::new(batch)?;
        let mut out = Output::for_batch(self.schema.clone(), batch.len(), batch.values().values().len());
        self.driver.process(&batch, ctx, &mut out)?;
        out.finish()
    }

    /// Process one batch given as an Arrow IPC stream; returns the output as IPC too.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    pub fn process_ipc(&mut self, bytes: Vec<u8>, ctx: &Context) -> Result<(Vec<u8>, Finished), Error> {
        let (schema, batches) = decode_ipc(bytes).map_err(|e| Error::batch(format!("input is not a valid Arrow IPC stream: {e}")))?;
        if !is_record_schema(&schema) {
            return Err(Error::batch("input IPC stream is not in the Kafka record schema"));
        }
        let batch = match batches.len() {
            0 => RecordBatch::new_empty(record_schema()),
            1 => batches.into_iter().next().expect("one batch"),
            _ => arrow_select::concat::concat_batches(&record_schema(), &batches)?,
        };
        let mut finished = self.process_batch(batch, ctx)?;
        let data = if finished.batches.is_empty() { Vec::new() } else { encode_ipc(&self.schema, &std::mem::take(&mut finished.batches))? };
        Ok((data, finished))
    }

    /// Serialize the state.
    pub fn snapshot(&self) -> Result<Vec<u8>, Error> {
        self.driver.snapshot()
    }

    /// Restore state written by `state_version`.
    pub fn restore(&mut self, bytes: &[u8], state_version: u32) -> Result<(), Error> {
        self.driver.restore(bytes, state_version)
    }
}
