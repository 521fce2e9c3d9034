//! One running plugin instance: its store, the calls of the world with a time budget each,
//! and the conversion of traps into [`CallError::Trap`]s that say what happened.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sluice_sdk::{decode_ipc, encode_ipc_into, record_schema, same_columns, Context, ErrorKind, Finished, RecordError};
use wasmtime::{Store, Trap};

use super::bindings::sluice::plugin::types as wit;
use super::bindings::Plugin;
use super::error::{CallError, TrapKind};
use super::load::{LoadedPlugin, PluginInfo};
use super::store::StoreState;
use super::{Limits, Runtime};

/// A configured instance of a plugin. Not `Sync`: one batch at a time.
pub struct PluginInstance {
    store: Store<StoreState>,
    plugin: Plugin,
    info: Arc<PluginInfo>,
    name: Arc<str>,
    output_schema: SchemaRef,
    limits: Limits,
    discarded: bool,
    /// What it was made from, to make a fresh one.
    loaded: LoadedPlugin,
    config: Arc<str>,
    /// The IPC encoding of the batch in flight, kept between batches so that its memory
    /// is reused.
    input: Vec<u8>,
}

pub(super) fn decode_schema(bytes: Vec<u8>) -> Result<SchemaRef, String> {
    decode_ipc(bytes).map(|(schema, _)| schema).map_err(|e| e.to_string())
}

/// Turn a wasmtime error from a call into a [`CallError::Trap`] naming the cause.
pub(super) fn trap_error(store: &mut Store<StoreState>, plugin: &str, call: &'static str, e: wasmtime::Error, limits: Limits) -> CallError {
    let stderr = store.data_mut().end_call();
    let memory_cap = store.data_mut().limits.take_memory_refused();
    // The innermost message, without the wasm backtrace wasmtime attaches as context.
    let root = e.chain().last().map(|c| c.to_string()).unwrap_or_default();
    let trap = if memory_cap {
        TrapKind::Memory(limits.memory_bytes)
    } else {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => TrapKind::Timeout(limits.call_timeout),
            Some(Trap::StackOverflow) => TrapKind::StackOverflow,
            Some(Trap::UnreachableCodeReached) => TrapKind::Panic(panic_message(&stderr)),
            Some(other) => TrapKind::Other(format!("{other}{}", if stderr.is_empty() { String::new() } else { format!(" (stderr: {stderr})") })),
            None => TrapKind::Other(root),
        }
    };
    CallError::Trap { plugin: plugin.to_string(), call, trap }
}

/// The useful part of Rust's panic output: `panicked at src/lib.rs:3:5:\nmessage`.
fn panic_message(stderr: &str) -> String {
    let text = stderr.trim();
    match text.find("panicked at ") {
        Some(i) => text[i + "panicked at ".len()..].lines().filter(|l| !l.starts_with("note: ")).collect::<Vec<_>>().join(" ").trim().to_string(),
        None => text.to_string(),
    }
}

fn plugin_error(plugin: &str, call: &'static str, e: wit::PluginError) -> CallError {
    let (kind, message) = match e {
        wit::PluginError::InvalidConfig(m) => (ErrorKind::InvalidConfig, m),
        wit::PluginError::BatchFailed(m) => (ErrorKind::BatchFailed, m),
        wit::PluginError::IncompatibleState(m) => (ErrorKind::IncompatibleState, m),
    };
    CallError::Plugin { plugin: plugin.to_string(), call, kind, message }
}

impl PluginInstance {
    pub(super) fn new(loaded: &LoadedPlugin, config: &str) -> Result<Self, CallError> {
        let info = loaded.info.clone();
        let name: Arc<str> = Arc::from(info.name.as_str());
        let limits = loaded.limits;
        let mut store = loaded.runtime.store(name.clone(), limits);
        store.data_mut().begin_call();
        let plugin = loaded.pre.instantiate(&mut store).map_err(|e| trap_error(&mut store, &name, "instantiate", e, limits))?;
        let mut instance = Self {
            store,
            plugin,
            output_schema: info.output_schema.clone(),
            info,
            name,
            limits,
            discarded: false,
            loaded: loaded.clone(),
            config: Arc::from(config),
            input: Vec::new(),
        };
        let schema = instance.call("init", |p, s| p.call_init(s, config))?;
        instance.output_schema = decode_schema(schema).map_err(|reason| CallError::BadOutput {
            plugin: instance.name.to_string(),
            call: "init",
            reason: format!("the output schema is not an Arrow IPC schema: {reason}"),
        })?;
        Ok(instance)
    }

    /// A new instance of the same plugin with the same config, in its initial state.
    pub fn fresh(&self) -> Result<PluginInstance, CallError> {
        Self::new(&self.loaded, &self.config)
    }

    /// What the plugin says about itself.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The output schema for this instance's configuration.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Run one guest call with a fresh time budget; traps discard the instance.
    fn call<R>(&mut self, call: &'static str, f: impl FnOnce(&Plugin, &mut Store<StoreState>) -> wasmtime::Result<Result<R, wit::PluginError>>) -> Result<R, CallError> {
        if self.discarded {
            return Err(CallError::Discarded { plugin: self.name.to_string() });
        }
        self.store.set_epoch_deadline(Runtime::ticks(self.limits.call_timeout));
        self.store.data_mut().begin_call();
        let result = f(&self.plugin, &mut self.store);
        match result {
            Ok(answer) => {
                let stderr = self.store.data_mut().end_call();
                if !stderr.is_empty() {
                    tracing::info!(target: "sluice::plugin", plugin = %self.name, "stderr: {stderr}");
                }
                answer.map_err(|e| plugin_error(&self.name, call, e))
            }
            Err(e) => {
                self.discarded = true;
                Err(trap_error(&mut self.store, &self.name, call, e, self.limits))
            }
        }
    }

    /// Process one batch in the record schema.
    pub fn process(&mut self, batch: &RecordBatch, ctx: &Context) -> Result<Finished, CallError> {
        let bad = |reason: String| CallError::BadOutput { plugin: self.name.to_string(), call: "process", reason };
        let mut input = std::mem::take(&mut self.input);
        encode_ipc_into(&record_schema(), std::slice::from_ref(batch), &mut input).map_err(|e| bad(format!("cannot encode the input batch: {e}")))?;
        let wit_ctx = wit::BatchContext {
            batch_id: ctx.batch_id,
            offset_ranges: ctx.offset_ranges.iter().map(|r| wit::OffsetRange { topic: r.topic.clone(), partition: r.partition, from: r.from, until: r.until }).collect(),
            processing_time_ms: ctx.processing_time_ms,
            watermark_ms: ctx.watermark_ms,
        };
        let out = self.call("process", |p, s| p.call_process(s, &input, &wit_ctx));
        self.input = input;
        let out = out?;
        let bad = |reason: String| CallError::BadOutput { plugin: self.name.to_string(), call: "process", reason };
        if out.data.len() > self.limits.max_output_bytes {
            let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
            return Err(bad(format!("the output of {:.1} MiB exceeds the limit of {:.1} MiB per call (maxOutputMb)", mib(out.data.len()), mib(self.limits.max_output_bytes))));
        }
        let batches = if out.data.is_empty() {
            Vec::new()
        } else {
            let (schema, batches) = decode_ipc(out.data).map_err(|e| bad(format!("output is not an Arrow IPC stream: {e}")))?;
            if !same_columns(&schema, &self.output_schema) {
                return Err(bad(format!("output columns {:?} differ from the schema declared by init {:?}", columns(&schema), columns(&self.output_schema))));
            }
            batches
        };
        if let Some(e) = out.record_errors.iter().find(|e| e.row as usize >= batch.num_rows()) {
            return Err(bad(format!("rejected row {} of a batch of {} rows", e.row, batch.num_rows())));
        }
        Ok(Finished {
            batches,
            record_errors: out.record_errors.into_iter().map(|e| RecordError { row: e.row, reason: e.reason }).collect(),
            watermark_ms: out.watermark_ms,
            late_records: out.late_records,
        })
    }

    /// The plugin's state, for a checkpoint.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        self.call("snapshot", |p, s| p.call_snapshot(s))
    }

    /// Restore state written by a plugin whose state version was `state_version`.
    pub fn restore(&mut self, state: &[u8], state_version: u32) -> Result<(), CallError> {
        self.call("restore", |p, s| p.call_restore(s, state, state_version))
    }

    /// True after a trap: the instance cannot be called again.
    pub fn is_discarded(&self) -> bool {
        self.discarded
    }
}

fn columns(schema: &SchemaRef) -> Vec<String> {
    schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect()
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance").field("plugin", &self.info.name).field("version", &self.info.version).field("discarded", &self.discarded).finish_non_exhaustive()
    }
}
