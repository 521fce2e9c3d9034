//! What each plugin instance's `Store` holds: a WASI context that grants nothing (no
//! preopened directories, no environment, no network, stdout discarded, stderr captured),
//! the memory limiter, and the `host` interface the WIT offers (logging).

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::sluice::plugin::host::{Host, LogLevel};

/// How many log lines one call may write before further lines are dropped (and counted).
const LOG_LINES_PER_CALL: u32 = 100;
/// How much of the guest's stderr is kept (panic messages land there).
const STDERR_CAPACITY: usize = 64 * 1024;

pub(crate) struct StoreState {
    pub(crate) plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: Limiter,
    stderr: MemoryOutputPipe,
    stderr_seen: usize,
    log_budget: u32,
    log_dropped: u64,
}

impl StoreState {
    pub(crate) fn new(plugin: Arc<str>, memory_bytes: usize) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // The builder starts from nothing: no args, env, preopens, or network access.
        let wasi = WasiCtx::builder().stderr(stderr.clone()).allow_ip_name_lookup(false).build();
        Self {
            plugin,
            wasi,
            table: ResourceTable::new(),
            limits: Limiter {
                inner: StoreLimitsBuilder::new().memory_size(memory_bytes).trap_on_grow_failure(true).instances(16).tables(16).memories(4).build(),
                memory_bytes,
                memory_refused: false,
            },
            stderr,
            stderr_seen: 0,
            log_budget: LOG_LINES_PER_CALL,
            log_dropped: 0,
        }
    }

    /// Called before each call into the guest.
    pub(crate) fn begin_call(&mut self) {
        self.log_budget = LOG_LINES_PER_CALL;
        self.limits.memory_refused = false;
    }

    /// Called after each call: forwards new stderr output to the log and reports dropped
    /// log lines. Returns the new stderr text (used to explain a panic).
    pub(crate) fn end_call(&mut self) -> String {
        if self.log_dropped > 0 {
            tracing::warn!(plugin = %self.plugin, dropped = self.log_dropped, "plugin log lines dropped (over {LOG_LINES_PER_CALL} per call)");
            self.log_dropped = 0;
        }
        let all = self.stderr.contents();
        let fresh = String::from_utf8_lossy(&all[self.stderr_seen.min(all.len())..]).trim().to_string();
        self.stderr_seen = all.len();
        fresh
    }
}

/// wasmtime's store limits, remembering when a memory growth was refused for the cap: how a
/// trap is known to be the memory cap's (wasmtime's message text is not an interface).
pub(crate) struct Limiter {
    inner: StoreLimits,
    memory_bytes: usize,
    /// A growth past the cap was refused since the last [`Limiter::take_memory_refused`].
    memory_refused: bool,
}

impl Limiter {
    /// Whether a growth past the cap was refused since the last call.
    pub(crate) fn take_memory_refused(&mut self) -> bool {
        std::mem::take(&mut self.memory_refused)
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_refused = true;
        }
        self.inner.memory_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl Host for StoreState {
    fn log(&mut self, level: LogLevel, message: String) {
        if self.log_budget == 0 {
            self.log_dropped += 1;
            return;
        }
        self.log_budget -= 1;
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(target: "sluice::plugin", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "sluice::plugin", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "sluice::plugin", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "sluice::plugin", plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: "sluice::plugin", plugin, "{message}"),
        }
    }
}

/// The `types` interface has no functions; the world imports it for its types only.
impl super::bindings::sluice::plugin::types::Host for StoreState {}
