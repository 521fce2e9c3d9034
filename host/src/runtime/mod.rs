//! The plugin runtime: the one module that owns wasmtime.
//!
//! It configures the engine (component model, epoch interruption for time budgets), checks
//! that a component implements the `sluice:plugin` world, caches compiled components by
//! content hash, pre-instantiates them, and wraps each instance so that every call has a
//! memory cap and a time budget. A trap discards the instance and is reported with the
//! plugin's name and the reason; the host keeps running.
//!
//! It must not know about Kafka, batching policy or checkpoint layout: callers hand it Arrow
//! batches and state bytes.

mod bindings;
mod cache;
mod error;
mod instance;
mod load;
mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, OptLevel, ProfilingStrategy, Store};

pub use cache::default_cache_dir;
pub use error::{CallError, LoadError, TrapKind};
pub use instance::PluginInstance;
pub use load::{LoadedPlugin, PluginInfo};

use self::store::StoreState;

/// Set to `1` to write a perf map of compiled plugin code, for profiling with `perf`.
pub const PERFMAP_ENV: &str = "SLUICE_WASM_PERFMAP";

/// How often the engine's epoch advances; the granularity of time budgets.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Per-instance resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most linear memory an instance may have, in bytes.
    pub memory_bytes: usize,
    /// Longest a single call (init, process, snapshot, restore) may run.
    pub call_timeout: Duration,
    /// Largest output of one `process` call (Arrow IPC bytes).
    pub max_output_bytes: usize,
}

impl Limits {
    /// 512 MiB.
    pub const DEFAULT_MEMORY_BYTES: usize = 512 * 1024 * 1024;
    /// 10 seconds.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
    /// 256 MiB.
    pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 256 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self { memory_bytes: Self::DEFAULT_MEMORY_BYTES, call_timeout: Self::DEFAULT_CALL_TIMEOUT, max_output_bytes: Self::DEFAULT_MAX_OUTPUT_BYTES }
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch thread");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: cache::ArtifactCache,
    _ticker: EpochTicker,
}

/// Loads plugins and runs their instances. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// A runtime that caches compiled plugins in `cache_dir` (none: memory only).
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        if std::env::var_os(PERFMAP_ENV).is_some_and(|v| v == "1") {
            // Names compiled plugin functions in /tmp/perf-<pid>.map for `perf report`.
            config.profiler(ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot configure the WebAssembly engine: {e}"))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s).map_err(|e| anyhow::anyhow!("cannot link the sluice host interface: {e}"))?;

        let cache = cache::ArtifactCache::new(&engine, cache_dir);
        let ticker = EpochTicker::start(engine.clone());
        Ok(Self { shared: Arc::new(Shared { engine, linker, cache, _ticker: ticker }) })
    }

    /// A runtime with the [default cache directory](default_cache_dir).
    pub fn with_default_cache() -> anyhow::Result<Self> {
        Self::new(default_cache_dir())
    }

    /// Load and check a plugin from a file.
    pub fn load_file(&self, path: impl AsRef<std::path::Path>, limits: Limits) -> Result<LoadedPlugin, LoadError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| LoadError::Read { path: path.display().to_string(), error })?;
        self.load(&bytes, &path.display().to_string(), limits)
    }

    /// Load and check the plugin `spec` names, as the command line and the pipeline file
    /// do: `builtin:NAME` (an example plugin embedded in sluice) or a file path. The one
    /// loader of `plugin test`, `plugin inspect` and the pipeline's `builtin`/`path` steps;
    /// plugin-directory steps read their files first ([`crate::swap::read_plugin`]) and
    /// load the bytes with [`Runtime::load`].
    pub fn load_spec(&self, spec: &str, limits: Limits) -> Result<LoadedPlugin, LoadError> {
        match spec.strip_prefix("builtin:") {
            Some(name) => self.load_builtin(name, limits),
            None => self.load_file(spec, limits),
        }
    }

    /// Load the example plugin embedded in sluice as `name` (`builtin:NAME` in messages).
    pub fn load_builtin(&self, name: &str, limits: Limits) -> Result<LoadedPlugin, LoadError> {
        self.load(crate::examples::named(name).map_err(LoadError::NoBuiltin)?, &format!("builtin:{name}"), limits)
    }

    /// Load and check a plugin from bytes; `origin` names it in messages (a path, say).
    pub fn load(&self, bytes: &[u8], origin: &str, limits: Limits) -> Result<LoadedPlugin, LoadError> {
        load::load(self.clone(), bytes, origin, limits)
    }

    /// The store of one plugin instance (or of a load's `describe` call): an empty WASI
    /// context, the memory cap, and a time budget of `limits.call_timeout` per call.
    fn store(&self, plugin: Arc<str>, limits: Limits) -> Store<StoreState> {
        let mut store = Store::new(&self.shared.engine, StoreState::new(plugin, limits.memory_bytes));
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(Self::ticks(limits.call_timeout));
        store
    }

    fn ticks(timeout: Duration) -> u64 {
        (timeout.as_millis() as u64).div_ceil(EPOCH_TICK.as_millis() as u64).max(1)
    }
}
