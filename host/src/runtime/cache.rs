//! Compiled-plugin cache, keyed by the SHA-256 of the component bytes and the engine's
//! compatibility hash: in memory for this process, and on disk so that a restart loads a
//! plugin in milliseconds instead of JIT-compiling it again.
//!
//! Only artifacts this module wrote are ever deserialized: files are named by content hash,
//! written to a temporary name and renamed into place, in a directory created with mode
//! 0700. A file that fails to deserialize is recompiled and replaced.
//!
//! The directory is bounded: after writing an artifact, the least recently used ones (by
//! modification time, renewed on every load) are removed until the artifacts take at most
//! `$SLUICE_CACHE_MAX_MB` (default [`DEFAULT_MAX_BYTES`]). Every build or swap of a plugin
//! adds an artifact of ~6.5 MB, so without a bound the directory would only grow.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use wasmtime::component::Component;
use wasmtime::Engine;

pub(crate) struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_hash: u64,
    max_bytes: u64,
    memo: Mutex<HashMap<String, Component>>,
}

/// Default bound on the artifacts in the cache directory: 1 GiB, some 150 plugin builds.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// Environment variable bounding the cache directory, in MiB.
pub const MAX_MB_ENV: &str = "SLUICE_CACHE_MAX_MB";

/// A temporary file older than this was left by a process that stopped while writing.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// The bound on the cache directory from `$SLUICE_CACHE_MAX_MB`, or the default.
fn max_bytes_from_env() -> u64 {
    max_bytes(std::env::var(MAX_MB_ENV).ok().as_deref())
}

/// The bound for a value of `$SLUICE_CACHE_MAX_MB` (MiB); an unreadable value is reported
/// and the default used.
fn max_bytes(value: Option<&str>) -> u64 {
    match value {
        None => DEFAULT_MAX_BYTES,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(mb) => mb.saturating_mul(1 << 20),
            Err(_) => {
                tracing::warn!(value = %v, "{MAX_MB_ENV} is not a whole number of MiB; using the default of {} MiB", DEFAULT_MAX_BYTES >> 20);
                DEFAULT_MAX_BYTES
            }
        },
    }
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
        Self { dir, engine_hash: hasher.finish(), max_bytes: max_bytes_from_env(), memo: Mutex::new(HashMap::new()) }
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
                    match store(&c, f) {
                        Ok(()) => prune(f.parent().expect("a file in the cache directory"), self.max_bytes, f),
                        Err(e) => tracing::warn!(file = %f.display(), error = %e, "cannot write compiled plugin to the cache"),
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
        Ok(c) => {
            // Mark it used, so that pruning removes artifacts nobody loads first.
            let _ = std::fs::File::options().write(true).open(file).and_then(|f| f.set_modified(SystemTime::now()));
            Some(c)
        }
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

/// Remove the least recently used artifacts in `dir` until they take at most `max_bytes`,
/// never `keep` (the one just written), and temporary files left by interrupted writes.
/// Failures are logged: a cache that cannot be pruned still works.
fn prune(dir: &Path, max_bytes: u64, keep: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the plugin cache to prune it");
            return;
        }
    };
    let now = SystemTime::now();
    let mut artifacts = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.contains(".tmp") && now.duration_since(modified).is_ok_and(|age| age > STALE_TMP) {
            remove(&path);
        } else if name.ends_with(".cwasm") && meta.is_file() {
            artifacts.push((modified, meta.len(), path));
        }
    }
    let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
    artifacts.sort();
    for (_, len, path) in artifacts {
        if total <= max_bytes {
            break;
        }
        if path != keep {
            remove(&path);
            total -= len;
        }
    }
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(file = %path.display(), "removed from the plugin cache"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot remove from the plugin cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, len: usize, age_s: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
        path
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn the_bound_is_read_in_mib_and_an_unreadable_value_leaves_the_default() {
        assert_eq!(max_bytes(None), DEFAULT_MAX_BYTES);
        assert_eq!(max_bytes(Some(" 10 ")), 10 << 20);
        assert_eq!(max_bytes(Some("0")), 0, "0 keeps only the artifact just written");
        assert_eq!(max_bytes(Some("ten")), DEFAULT_MAX_BYTES);
        assert_eq!(max_bytes(Some("-5")), DEFAULT_MAX_BYTES);
    }

    #[test]
    fn prune_removes_least_recently_used_artifacts_down_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a.cwasm", 100, 400);
        file(dir.path(), "b.cwasm", 100, 300);
        file(dir.path(), "c.cwasm", 100, 200);
        let newest = file(dir.path(), "d.cwasm", 100, 0);
        file(dir.path(), "notes.txt", 1000, 500);
        prune(dir.path(), 250, &newest);
        assert_eq!(names(dir.path()), ["c.cwasm", "d.cwasm", "notes.txt"]);
        prune(dir.path(), 250, &newest);
        assert_eq!(names(dir.path()), ["c.cwasm", "d.cwasm", "notes.txt"], "within the bound: nothing more removed");
    }

    #[test]
    fn prune_keeps_the_artifact_just_written_even_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "old.cwasm", 10, 100);
        // Written now but with an older clock reading than `old` (a clock step, a copy).
        let keep = file(dir.path(), "new.cwasm", 500, 200);
        prune(dir.path(), 100, &keep);
        assert_eq!(names(dir.path()), ["new.cwasm"]);
    }

    /// An empty component with a custom section named `tag`, so that each tag differs.
    fn component_bytes(tag: &str) -> Vec<u8> {
        let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
        bytes.extend([0, tag.len() as u8 + 1, tag.len() as u8]);
        bytes.extend(tag.as_bytes());
        bytes
    }

    #[test]
    fn the_cache_directory_stays_within_its_bound_and_loads_renew_use() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let mut cache = ArtifactCache::new(&engine, Some(dir.path().to_path_buf()));
        let (a, b) = (component_bytes("a"), component_bytes("b"));
        cache.component(&engine, "a", &a).unwrap();
        let one = std::fs::metadata(dir.path().join(&names(dir.path())[0])).unwrap().len();
        // Room for two artifacts: `a`, then `b`; loading `a` again (a restart) makes `b`
        // the least recently used, so a third artifact replaces `b`.
        cache.max_bytes = 2 * one + one / 2;
        cache.component(&engine, "b", &b).unwrap();
        assert_eq!(names(dir.path()).len(), 2);
        std::thread::sleep(Duration::from_millis(20));
        let restarted = ArtifactCache { max_bytes: cache.max_bytes, ..ArtifactCache::new(&engine, Some(dir.path().to_path_buf())) };
        restarted.component(&engine, "a", &a).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        restarted.component(&engine, "c", &component_bytes("c")).unwrap();
        let left = names(dir.path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left[0].starts_with("a-") && left[1].starts_with("c-"), "{left:?}");
    }

    #[test]
    fn prune_removes_stale_temporary_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let keep = file(dir.path(), "x.cwasm", 10, 0);
        file(dir.path(), "y.tmp123", 10, 2 * 3600);
        file(dir.path(), "z.tmp456", 10, 10);
        prune(dir.path(), u64::MAX, &keep);
        assert_eq!(names(dir.path()), ["x.cwasm", "z.tmp456"], "a write in progress is left alone");
    }
}
