//! Compiled-plugin cache, keyed by the SHA-256 of the component bytes and the engine's
//! compatibility hash: in memory for this process, and on disk so that a restart loads a
//! plugin in milliseconds instead of JIT-compiling it again.
//!
//! Only artifacts this module wrote are ever deserialized: files are named by content hash,
//! written to a temporary name and renamed into place, in a directory created with mode
//! 0700. A file that fails to deserialize is recompiled and replaced.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wasmtime::component::Component;
use wasmtime::Engine;

pub(crate) struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_hash: u64,
    memo: Mutex<HashMap<String, Component>>,
}

/// The default cache directory: `$SLUICE_CACHE_DIR`, else `$XDG_CACHE_HOME/sluice`, else
/// `$HOME/.cache/sluice`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SLUICE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("sluice"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("sluice"))
}

impl ArtifactCache {
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = dir.and_then(|d| match create_private_dir(&d) {
            Ok(()) => Some(d),
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "plugin cache directory unusable; plugins will be compiled on every start");
                None
            }
        });
        Self { dir, engine_hash: hasher.finish(), memo: Mutex::new(HashMap::new()) }
    }

    /// The compiled component for `bytes` (whose SHA-256 is `hash`).
    pub(crate) fn component(&self, engine: &Engine, hash: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        if let Some(c) = self.memo.lock().expect("cache lock").get(hash) {
            return Ok(c.clone());
        }
        let file = self.dir.as_ref().map(|d| d.join(format!("{hash}-{:016x}.cwasm", self.engine_hash)));
        let cached = file.as_deref().and_then(|f| load(engine, f));
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(engine, bytes)?;
                if let Some(f) = &file {
                    if let Err(e) = store(&c, f) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot write compiled plugin to the cache");
                    }
                }
                c
            }
        };
        self.memo.lock().expect("cache lock").insert(hash.to_string(), component.clone());
        Ok(component)
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn load(engine: &Engine, file: &Path) -> Option<Component> {
    let bytes = std::fs::read(file).ok()?;
    // SAFETY: the file is named by the content hash of the source component and was written
    // by `store` below from `Component::serialize` of an engine with the same compatibility
    // hash (part of the file name). wasmtime additionally checks the artifact header.
    match unsafe { Component::deserialize(engine, &bytes) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring unreadable cached plugin; recompiling");
            None
        }
    }
}

fn store(component: &Component, file: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}
