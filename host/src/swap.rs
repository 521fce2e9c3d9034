//! Hot swap. A step given by `name` runs `<name>.wasm` from the plugin directory, configured
//! by `<name>.toml` when that file exists (else by the step's inline `config`). While the
//! pipeline runs, a thread watches those files. A new or changed plugin, or a changed config,
//! is compiled, instantiated and initialised on that thread, off the batch loop; the loop
//! hands it to [`Chain::swap`](crate::chain::Chain::swap) at the next batch boundary.
//!
//! A file is read only once its size and modification time have stayed the same for one
//! poll, and a plugin that does not compile is never swapped in, so a half-written file is
//! not loaded (writing elsewhere and renaming into the directory is the safe way to
//! publish). A version that fails is reported once; saving the file again retries.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::control::Control;
use crate::runtime::{Limits, PluginInstance, Runtime};

/// How often the plugin directory is looked at.
pub const POLL: Duration = Duration::from_millis(200);

/// A plugin's files, read.
pub struct PluginFiles {
    /// `<dir>/<name>.wasm`.
    pub wasm_path: PathBuf,
    /// Its bytes.
    pub wasm: Vec<u8>,
    /// Its config as JSON text: `<name>.toml` converted, or the inline config.
    pub config: String,
    /// Digest of the component and the config: what is running.
    pub digest: [u8; 32],
}

/// The files of plugin `name` in `dir`; `inline_config` (JSON) is used when there is no
/// `<name>.toml`. The error names the file at fault and what is wrong with it.
pub fn read_plugin(dir: &Path, name: &str, inline_config: &str) -> Result<PluginFiles, (PathBuf, String)> {
    let wasm_path = dir.join(format!("{name}.wasm"));
    let wasm = std::fs::read(&wasm_path).map_err(|e| (wasm_path.clone(), format!("cannot read {}: {e}", wasm_path.display())))?;
    let toml_path = dir.join(format!("{name}.toml"));
    let bad_toml = |e: String| (toml_path.clone(), format!("{}: {e}", toml_path.display()));
    let config = match std::fs::read_to_string(&toml_path) {
        Ok(text) => {
            let table: toml::Table = toml::from_str(&text).map_err(|e| bad_toml(e.to_string().trim_end().to_string()))?;
            serde_json::to_string(&table).map_err(|e| bad_toml(e.to_string()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => inline_config.to_string(),
        Err(e) => return Err(bad_toml(format!("cannot read it: {e}"))),
    };
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(&wasm));
    hasher.update(Sha256::digest(config.as_bytes()));
    Ok(PluginFiles { wasm_path, wasm, config, digest: hasher.finalize().into() })
}

/// Compile, instantiate and initialise `files`.
pub fn prepare(runtime: &Runtime, files: &PluginFiles, limits: Limits) -> Result<PluginInstance, String> {
    let origin = files.wasm_path.display().to_string();
    let loaded = runtime.load(&files.wasm, &origin, limits).map_err(|e| e.to_string())?;
    loaded.instantiate(&files.config).map_err(|e| format!("{origin}: {e}"))
}

/// A step the watcher looks after.
#[derive(Debug, Clone)]
pub struct WatchedStep {
    /// Its index in the chain.
    pub step: usize,
    /// Plugin name: the files are `<name>.wasm` and `<name>.toml`.
    pub name: String,
    /// Config used when there is no `<name>.toml`.
    pub inline_config: String,
    /// Sandbox limits.
    pub limits: Limits,
    /// Digest of what runs now ([`PluginFiles::digest`]).
    pub digest: [u8; 32],
}

/// What the watcher found.
pub enum Found {
    /// A new version, compiled and initialised, to take over `step`.
    Ready {
        /// Step index.
        step: usize,
        /// The instance.
        instance: Box<PluginInstance>,
        /// The component file it came from.
        file: PathBuf,
    },
    /// A new version that cannot run; the running one stays.
    Rejected {
        /// Step index.
        step: usize,
        /// The file at fault (or the component, when it is not clear).
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The watching thread; stopped when dropped.
pub struct Watcher {
    found: Receiver<Found>,
    /// The watcher's own channel: a stop when the watcher is dropped ends its wait.
    own: Control,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Watch `steps` in `dir`, looking every `poll`; each new version found is announced
    /// on `run`, the run's control channel.
    pub fn start(runtime: Runtime, dir: PathBuf, steps: Vec<WatchedStep>, poll: Duration, run: Control) -> Self {
        let (tx, found) = mpsc::channel();
        let own = Control::new();
        let thread = {
            let own = own.clone();
            std::thread::Builder::new().name("sluice-plugin-watch".into()).spawn(move || watch(&runtime, &dir, steps, poll, &tx, &own, &run)).expect("spawn the plugin watcher")
        };
        Self { found, own, thread: Some(thread) }
    }

    /// What was found since the last call, oldest first.
    pub fn found(&self) -> Vec<Found> {
        self.found.try_iter().collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.own.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Size and modification time of a file, `None` when it is missing.
type Stamp = Option<(u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

struct StepWatch {
    step: WatchedStep,
    /// Digest of the last version that failed to prepare: not tried again until changed.
    failed: Option<[u8; 32]>,
    /// The stamps of the wasm and toml files at the last look.
    seen: Option<(Stamp, Stamp)>,
    /// Whether the files under `seen` were dealt with.
    handled: bool,
}

fn watch(runtime: &Runtime, dir: &Path, steps: Vec<WatchedStep>, poll: Duration, tx: &Sender<Found>, own: &Control, run: &Control) {
    let mut watched: Vec<StepWatch> = steps.into_iter().map(|step| StepWatch { step, failed: None, seen: None, handled: false }).collect();
    while !own.is_stopped() {
        for w in &mut watched {
            let name = &w.step.name;
            let stamps = (stamp(&dir.join(format!("{name}.wasm"))), stamp(&dir.join(format!("{name}.toml"))));
            if w.seen != Some(stamps) {
                // Changed since the last look: wait until it settles.
                w.seen = Some(stamps);
                w.handled = false;
                continue;
            }
            if w.handled {
                continue;
            }
            w.handled = true;
            if stamps.0.is_none() {
                tracing::warn!("plugin {name}: {}.wasm is gone from {}; the running version stays", name, dir.display());
                continue;
            }
            let found = match read_plugin(dir, name, &w.step.inline_config) {
                Err((file, reason)) => Some(Found::Rejected { step: w.step.step, file, reason }),
                Ok(files) if files.digest == w.step.digest || Some(files.digest) == w.failed => None,
                Ok(files) => {
                    tracing::info!("plugin {name}: a new version in {}; compiling it", files.wasm_path.display());
                    Some(match prepare(runtime, &files, w.step.limits) {
                        Ok(instance) => {
                            // From here on the chain has it (or reports why not).
                            w.step.digest = files.digest;
                            Found::Ready { step: w.step.step, instance: Box::new(instance), file: files.wasm_path }
                        }
                        Err(reason) => {
                            w.failed = Some(files.digest);
                            Found::Rejected { step: w.step.step, file: files.wasm_path, reason }
                        }
                    })
                }
            };
            if let Some(found) = found {
                if tx.send(found).is_err() {
                    return;
                }
                run.swap_ready();
            }
        }
        own.sleep(poll);
    }
}
