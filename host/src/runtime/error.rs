//! Errors of the plugin runtime, kept apart by what the caller can do about them:
//! a plugin that cannot be loaded ([`LoadError`]), and a call that failed ([`CallError`]):
//! either the plugin said no (a plugin error: the instance is fine) or it trapped (the
//! instance is gone and must be rebuilt from the last snapshot).

use std::time::Duration;

use sluice_sdk::ErrorKind;

/// Why a plugin file could not be turned into something the host can run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read plugin file {path}: {error}")]
    Read {
        /// The path given.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// `builtin:NAME` names no built-in plugin.
    #[error("{0}")]
    NoBuiltin(String),
    /// Not WebAssembly at all.
    #[error(
        "{plugin}: not a WebAssembly file (it does not start with the `\\0asm` magic bytes); a plugin is a .wasm component built with sluice-sdk for the wasm32-wasip2 target"
    )]
    NotWasm {
        /// Where the bytes came from.
        plugin: String,
    },
    /// A core module, not a component.
    #[error("{plugin}: this is a core WebAssembly module, not a component; build the plugin for the wasm32-wasip2 target (`cargo build --release --target wasm32-wasip2`), which produces a component")]
    CoreModule {
        /// Where the bytes came from.
        plugin: String,
    },
    /// Malformed or unsupported component.
    #[error("{plugin}: not a valid WebAssembly component: {reason}")]
    Invalid {
        /// Where the bytes came from.
        plugin: String,
        /// What wasmtime said.
        reason: String,
    },
    /// A component, but not of the `sluice:plugin` world.
    #[error("{plugin}: not a sluice plugin: {reason}. Plugins implement the world `sluice:plugin/plugin@0.1.0` (wit/plugin.wit); build them with the sluice-sdk crate")]
    WrongWorld {
        /// Where the bytes came from.
        plugin: String,
        /// What does not match.
        reason: String,
    },
    /// The plugin loaded but could not describe itself.
    #[error("{plugin}: `describe` failed: {reason}")]
    Describe {
        /// Where the bytes came from.
        plugin: String,
        /// Why.
        reason: String,
    },
}

/// What stopped a plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrapKind {
    /// The call ran past its time budget.
    Timeout(Duration),
    /// The instance tried to grow its memory past the cap (bytes).
    Memory(usize),
    /// The guest's call stack overflowed.
    StackOverflow,
    /// The guest panicked or aborted; the message is what it wrote to stderr, if anything.
    Panic(String),
    /// Any other trap, with wasmtime's description.
    Other(String),
}

impl std::fmt::Display for TrapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrapKind::Timeout(d) => write!(f, "time budget of {} ms per call exceeded", d.as_millis()),
            TrapKind::Memory(cap) => write!(f, "memory limit of {} MiB exceeded", cap / (1024 * 1024)),
            TrapKind::StackOverflow => write!(f, "stack overflow"),
            TrapKind::Panic(msg) if msg.is_empty() => write!(f, "panicked (no message)"),
            TrapKind::Panic(msg) => write!(f, "panicked: {msg}"),
            TrapKind::Other(msg) => write!(f, "{msg}"),
        }
    }
}

/// A failed call into a plugin instance.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin returned an error; the instance is still usable.
    #[error("plugin {plugin}: {call} failed: {}: {message}", kind_name(*.kind))]
    Plugin {
        /// Plugin name.
        plugin: String,
        /// Which call.
        call: &'static str,
        /// Kind of failure.
        kind: ErrorKind,
        /// The plugin's message.
        message: String,
    },
    /// The plugin trapped; the instance was discarded.
    #[error("plugin {plugin} trapped in {call}: {trap}; the instance was discarded")]
    Trap {
        /// Plugin name.
        plugin: String,
        /// Which call.
        call: &'static str,
        /// Why.
        trap: TrapKind,
    },
    /// The plugin answered with something that breaks the contract.
    #[error("plugin {plugin} returned invalid output from {call}: {reason}")]
    BadOutput {
        /// Plugin name.
        plugin: String,
        /// Which call.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The run was stopped while a failed batch waited to be retried in this plugin.
    #[error("stopped while plugin {plugin} waited to retry batch {batch_id}; the batch is not committed and runs again on restart")]
    Stopped {
        /// Plugin name and version.
        plugin: String,
        /// The batch.
        batch_id: u64,
        /// The failure that was to be retried.
        #[source]
        after: Box<CallError>,
    },
    /// A call on an instance that trapped earlier.
    #[error("plugin {plugin}: this instance trapped earlier and cannot be called again; build a new one")]
    Discarded {
        /// Plugin name.
        plugin: String,
    },
}

impl CallError {
    /// True when the instance is gone and must be rebuilt.
    pub fn is_trap(&self) -> bool {
        matches!(self, CallError::Trap { .. } | CallError::Discarded { .. })
    }
}

fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidConfig => "invalid config",
        ErrorKind::BatchFailed => "batch failed",
        ErrorKind::IncompatibleState => "incompatible state",
    }
}
