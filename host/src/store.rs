//! Storage locations for sink output and checkpoints: a local directory or any
//! `object_store` URL, behind one small blocking API. Every write is a whole-object put,
//! which the stores make atomic (a local file is written under a temporary name, synced and
//! renamed), so a reader never sees half an object.

use std::collections::BTreeMap;
use std::path::PathBuf;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// URL schemes a location can have; anything without `://` is a local directory.
pub const SCHEMES: [&str; 10] = ["file", "memory", "s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss"];

/// Check a location as written in a pipeline file: a local path, or a URL with a known
/// scheme. Nothing is opened.
pub fn check_location(location: &str) -> Result<(), String> {
    let Some((scheme, _)) = location.split_once("://") else { return Ok(()) };
    if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
        return Err(format!("`{location}`: unknown scheme `{scheme}://`; use a local directory or one of {}", SCHEMES.map(|s| format!("{s}://")).join(", ")));
    }
    url::Url::parse(location).map(drop).map_err(|e| format!("`{location}` is not a valid URL: {e}"))
}

/// A failed storage operation, with the location and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {what}: {reason}")]
pub struct StoreError {
    /// The location as configured.
    pub location: String,
    /// What was being done.
    pub what: String,
    /// What the store said.
    pub reason: String,
}

/// Called before and after every operation of a location with what it is about to do or
/// has done (`"before put offsets/…"`, `"after put offsets/…"`, `"before get …"`); an
/// error fails the operation with it. The crash simulation stops its process model here.
pub type Hook = std::sync::Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A directory-like location: objects are named relative to it with `/`-separated names.
#[derive(Clone)]
pub struct Location {
    store: std::sync::Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    shown: String,
    io: std::sync::Arc<tokio::runtime::Runtime>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("location", &self.shown).finish_non_exhaustive()
    }
}

impl Location {
    /// Open `location`: a local directory (created if missing) or an object-store URL;
    /// `options` configure a cloud store (credentials, region, endpoint …), after the
    /// variables each cloud's own tools read from the environment.
    pub fn open(location: &str, options: &BTreeMap<String, String>) -> Result<Self, StoreError> {
        let fail = |what: &str, reason: String| StoreError { location: location.to_string(), what: what.to_string(), reason };
        let url = match location.split_once("://") {
            None => None,
            Some(_) => Some(url::Url::parse(location).map_err(|e| fail("not a valid URL", e.to_string()))?),
        };
        let local_dir = match &url {
            None => Some(PathBuf::from(location)),
            Some(u) if u.scheme() == "file" => Some(u.to_file_path().map_err(|()| fail("cannot open", "a file:// URL needs an absolute path, like file:///data/out".into()))?),
            Some(_) => None,
        };
        if local_dir.is_some() && !options.is_empty() {
            return Err(fail("cannot open", "options apply to cloud URLs like `s3://bucket/prefix`; remove them for a local directory".into()));
        }
        let (store, prefix): (Box<dyn ObjectStore>, ObjectPath) = match (local_dir, url) {
            (Some(dir), _) => {
                std::fs::create_dir_all(&dir).map_err(|e| fail("cannot create the directory", e.to_string()))?;
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| fail("cannot open", e.to_string()))?.with_fsync(true);
                (Box::new(store), ObjectPath::default())
            }
            (None, Some(url)) => open_cloud(&url, options).map_err(|reason| fail("cannot open", reason))?,
            (None, None) => unreachable!("a location is a local directory or a URL"),
        };
        Self::on(store.into(), prefix, location, None)
    }

    /// A location on a store the caller keeps (an `InMemory` store that outlives one run,
    /// in tests and the crash simulation), with `hook` called around every operation.
    pub fn shared(store: std::sync::Arc<dyn ObjectStore>, shown: &str, hook: Option<Hook>) -> Result<Self, StoreError> {
        Self::on(store, ObjectPath::default(), shown, hook)
    }

    fn on(store: std::sync::Arc<dyn ObjectStore>, prefix: ObjectPath, shown: &str, hook: Option<Hook>) -> Result<Self, StoreError> {
        let io = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| StoreError {
            location: shown.to_string(),
            what: "cannot start I/O".into(),
            reason: e.to_string(),
        })?;
        Ok(Self { store, prefix, shown: shown.to_string(), io: std::sync::Arc::new(io), hook })
    }

    /// The directory `dir` of this location as a location of its own (same store, same hook).
    pub fn sub(&self, dir: &str) -> Self {
        Self { store: self.store.clone(), prefix: self.path(dir), shown: format!("{}/{dir}", self.shown.trim_end_matches('/')), io: self.io.clone(), hook: self.hook.clone() }
    }

    /// Call the hook, if any, with `what`.
    fn hook(&self, what: std::fmt::Arguments<'_>, failing: &str) -> Result<(), StoreError> {
        match &self.hook {
            Some(hook) => hook(&what.to_string()).map_err(|reason| self.fail(failing.to_string(), reason)),
            None => Ok(()),
        }
    }

    /// The location as configured.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn path(&self, name: &str) -> ObjectPath {
        name.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn fail(&self, what: String, e: impl std::fmt::Display) -> StoreError {
        StoreError { location: self.shown.clone(), what, reason: e.to_string() }
    }

    /// Write `bytes` as `name`, replacing what was there, atomically.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let failing = format!("cannot write {name}");
        self.hook(format_args!("before put {name}"), &failing)?;
        self.io.block_on(self.store.put(&self.path(name), PutPayload::from(bytes))).map(drop).map_err(|e| self.fail(failing.clone(), e))?;
        self.hook(format_args!("after put {name}"), &failing)
    }

    /// Write `bytes` as `name` only if nothing is there yet (object_store's
    /// `PutMode::Create`; local disk, S3, GCS, Azure and memory stores make it atomic):
    /// `false`, and nothing written, when `name` exists. Of two writers racing for one name,
    /// exactly one creates it: what fences an old owner of a task off its checkpoints.
    pub fn create(&self, name: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let failing = format!("cannot create {name}");
        self.hook(format_args!("before create {name}"), &failing)?;
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        let created = match self.io.block_on(self.store.put_opts(&self.path(name), PutPayload::from(bytes), options)) {
            Ok(_) => true,
            Err(object_store::Error::AlreadyExists { .. }) => false,
            Err(object_store::Error::NotImplemented { .. }) => {
                return Err(self.fail(
                    failing,
                    "this store does not support create-only writes (conditional puts), which sluice needs so that two writers never commit the same batch; for an S3-compatible store, remove `aws_conditional_put = \"disabled\"` or use a store with conditional writes",
                ))
            }
            Err(e) => return Err(self.fail(failing, e)),
        };
        self.hook(format_args!("after create {name}"), &failing)?;
        Ok(created)
    }

    /// Read `name`; `None` when it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.hook(format_args!("before get {name}"), &format!("cannot read {name}"))?;
        let path = self.path(name);
        let result = self.io.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        result.map(|b| b.map(|b| b.to_vec())).map_err(|e| self.fail(format!("cannot read {name}"), e))
    }

    /// Whether `name` exists (its metadata is read, not its content).
    pub fn exists(&self, name: &str) -> Result<bool, StoreError> {
        self.hook(format_args!("before get {name}"), &format!("cannot read {name}"))?;
        match self.io.block_on(self.store.head(&self.path(name))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(format!("cannot read {name}"), e)),
        }
    }

    /// Names (without the directory) and sizes of the objects directly in `dir` (`""` for
    /// the top), sorted by name; empty when the directory does not exist.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.hook(format_args!("before list {dir}"), &format!("cannot list {dir}"))?;
        let prefix = if dir.is_empty() { self.prefix.clone() } else { self.path(dir) };
        let listing = self
            .io
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| self.fail(format!("cannot list {}", if dir.is_empty() { "the location" } else { dir }), e))?;
        let mut names: Vec<(String, u64)> = listing.objects.iter().filter_map(|o| o.location.filename().map(|n| (n.to_string(), o.size))).collect();
        names.sort();
        Ok(names)
    }

    /// Names of the directories directly in `dir` (`""` for the top), sorted.
    pub fn dirs(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        self.hook(format_args!("before list {dir}"), &format!("cannot list {dir}"))?;
        let prefix = if dir.is_empty() { self.prefix.clone() } else { self.path(dir) };
        let listing = self.io.block_on(self.store.list_with_delimiter(Some(&prefix))).map_err(|e| self.fail(format!("cannot list {dir}"), e))?;
        let mut names: Vec<String> = listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// Delete `name`; deleting what does not exist is not an error.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let failing = format!("cannot delete {name}");
        self.hook(format_args!("before delete {name}"), &failing)?;
        match self.io.block_on(self.store.delete(&self.path(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.fail(failing, e)),
        }
        self.hook(format_args!("after delete {name}"), &failing)
    }

    /// Move `from` to `to`, replacing `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let failing = format!("cannot move {from} to {to}");
        self.hook(format_args!("before rename {from} {to}"), &failing)?;
        self.io.block_on(self.store.rename(&self.path(from), &self.path(to))).map_err(|e| self.fail(failing.clone(), e))?;
        self.hook(format_args!("after rename {from} {to}"), &failing)
    }
}

/// The store behind a cloud or memory URL, and the path under it.
fn open_cloud(url: &url::Url, options: &BTreeMap<String, String>) -> Result<(Box<dyn ObjectStore>, ObjectPath), String> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    use object_store::ObjectStoreScheme;

    // The HTTPS clients of the cloud stores use rustls with the process's default crypto
    // provider: ring (an error only says one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();

    fn keys<K: std::str::FromStr>(options: &BTreeMap<String, String>, store: &str) -> Result<Vec<(K, String)>, String> {
        options
            .iter()
            .map(|(k, v)| {
                k.to_ascii_lowercase().parse().map(|key| (key, v.clone())).map_err(|_| format!("`{k}` is not an option of the {store} store (see the README for examples)"))
            })
            .collect()
    }
    let (scheme, path) = ObjectStoreScheme::parse(url).map_err(|e| e.to_string())?;
    let path = ObjectPath::parse(path).map_err(|e| e.to_string())?;
    let built = |e: object_store::Error| format!("cannot open the object store: {e}");
    let store: Box<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Memory if options.is_empty() => Box::new(object_store::memory::InMemory::new()),
        ObjectStoreScheme::Memory => return Err("the memory:// store takes no options".into()),
        ObjectStoreScheme::AmazonS3 => {
            let builder = keys::<AmazonS3ConfigKey>(options, "S3")?.into_iter().fold(AmazonS3Builder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let builder = keys::<GoogleConfigKey>(options, "Google Cloud Storage")?
                .into_iter()
                .fold(GoogleCloudStorageBuilder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let builder = keys::<AzureConfigKey>(options, "Azure")?.into_iter().fold(MicrosoftAzureBuilder::from_env().with_url(url.as_str()), |b, (k, v)| b.with_config(k, v));
            Box::new(builder.build().map_err(built)?)
        }
        other => return Err(format!("{other:?} URLs are not supported")),
    };
    Ok((store, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_rename_delete_on_a_local_directory_and_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("a/b");
        for shown in [local.to_str().unwrap().to_string(), "memory://".to_string()] {
            let loc = Location::open(&shown, &BTreeMap::new()).unwrap();
            assert_eq!(loc.list("sub").unwrap(), vec![], "a missing directory lists as empty");
            assert_eq!(loc.get("sub/x").unwrap(), None);
            loc.put("sub/x", b"one".to_vec()).unwrap();
            loc.put("sub/x", b"two".to_vec()).unwrap();
            loc.put("top", b"3".to_vec()).unwrap();
            assert_eq!(loc.get("sub/x").unwrap().as_deref(), Some(&b"two"[..]));
            assert_eq!(loc.list("sub").unwrap(), vec![("x".to_string(), 3)]);
            assert_eq!(loc.list("").unwrap(), vec![("top".to_string(), 1)], "only objects directly in the directory");
            loc.rename("sub/x", "sub/y").unwrap();
            assert_eq!(loc.list("sub").unwrap(), vec![("y".to_string(), 3)]);
            loc.delete("sub/y").unwrap();
            loc.delete("sub/y").unwrap();
            assert_eq!(loc.list("sub").unwrap(), vec![]);
        }
    }

    #[test]
    fn create_writes_only_what_is_not_there_and_of_racing_writers_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        for shown in [dir.path().to_str().unwrap().to_string(), "memory://".to_string()] {
            let loc = std::sync::Arc::new(Location::open(&shown, &BTreeMap::new()).unwrap());
            assert!(loc.create("a/x", b"first".to_vec()).unwrap());
            assert!(!loc.create("a/x", b"second".to_vec()).unwrap());
            assert_eq!(loc.get("a/x").unwrap().as_deref(), Some(&b"first"[..]), "a refused create changes nothing");
            for round in 0..20 {
                let name = format!("race/{round}");
                let won: Vec<bool> = std::thread::scope(|s| {
                    let racers: Vec<_> = (0..4u8)
                        .map(|i| {
                            let (loc, name) = (loc.clone(), name.clone());
                            s.spawn(move || loc.create(&name, vec![i]).unwrap())
                        })
                        .collect();
                    racers.into_iter().map(|r| r.join().unwrap()).collect()
                });
                assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{shown}, round {round}: {won:?}");
                let winner = won.iter().position(|&w| w).unwrap() as u8;
                assert_eq!(loc.get(&name).unwrap(), Some(vec![winner]), "the winner's bytes are what is there");
            }
            let sub = loc.sub("tasks/t");
            sub.put("p/x", b"1".to_vec()).unwrap();
            assert_eq!(loc.get("tasks/t/p/x").unwrap().as_deref(), Some(&b"1"[..]), "a sub-location writes under its directory");
            assert_eq!(loc.dirs("tasks").unwrap(), vec!["t".to_string()]);
            assert_eq!(sub.dirs("").unwrap(), vec!["p".to_string()]);
        }
    }

    #[test]
    fn options_for_a_local_directory_or_a_wrong_cloud_key_are_refused_by_name() {
        let options = BTreeMap::from([("aws_region".to_string(), "eu-west-1".to_string())]);
        let error = Location::open("/tmp/x", &options).unwrap_err().to_string();
        assert!(error.contains("options apply to cloud URLs"), "{error}");
        let wrong = BTreeMap::from([("aws_regoin".to_string(), "eu-west-1".to_string())]);
        let error = Location::open("s3://bucket/out", &wrong).unwrap_err().to_string();
        assert!(error.contains("`aws_regoin` is not an option of the S3 store"), "{error}");
        let error = Location::open("gs://bucket/out", &options).unwrap_err().to_string();
        assert!(error.contains("`aws_region` is not an option of the Google Cloud Storage store"), "{error}");
        assert!(Location::open("s3://bucket/out", &options).is_ok(), "opening does not reach the store");
    }
}
