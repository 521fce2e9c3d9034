//! Loading a plugin: recognise the file, compile it (or take it from the cache), check it
//! against the `sluice:plugin` world, pre-instantiate it, and ask it to describe itself.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use sha2::{Digest, Sha256};
use sluice_sdk::PluginKind;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::Component;

use super::bindings::{self, PluginPre};
use super::error::LoadError;
use super::instance::{self, PluginInstance};
use super::store::StoreState;
use super::{CallError, Limits, Runtime};

/// The exports every plugin has (see `wit/plugin.wit`).
const EXPORTS: [&str; 5] = ["describe", "init", "process", "snapshot", "restore"];
/// The interfaces of ours the world imports (`types` only for its type definitions).
const OWN_IMPORTS: [&str; 2] = ["sluice:plugin/host@0.1.0", "sluice:plugin/types@0.1.0"];

/// What a plugin says about itself, plus the hash of its bytes.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// One line for humans.
    pub description: String,
    /// Transform or aggregate.
    pub kind: PluginKind,
    /// Layout version of its snapshots.
    pub state_version: u32,
    /// Output schema for the default configuration.
    pub output_schema: SchemaRef,
    /// SHA-256 of the component bytes, hex.
    pub content_hash: String,
}

/// A checked, compiled, pre-instantiated plugin: instances are cheap to make from it.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub(super) runtime: Runtime,
    pub(super) pre: PluginPre<StoreState>,
    pub(super) info: Arc<PluginInfo>,
    pub(super) limits: Limits,
}

fn chain(e: &wasmtime::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

pub(super) fn load(runtime: Runtime, bytes: &[u8], origin: &str, limits: Limits) -> Result<LoadedPlugin, LoadError> {
    let plugin = origin.to_string();
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm { plugin });
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule { plugin });
    }
    let hash = hex::encode(Sha256::digest(bytes));
    let engine = &runtime.shared.engine;
    let component = runtime.shared.cache.component(engine, &hash, bytes).map_err(|e| LoadError::Invalid { plugin: plugin.clone(), reason: chain(&e) })?;
    check_world(&component, engine).map_err(|reason| LoadError::WrongWorld { plugin: plugin.clone(), reason })?;
    let pre = runtime.shared.linker.instantiate_pre(&component).and_then(PluginPre::new).map_err(|e| LoadError::WrongWorld { plugin: plugin.clone(), reason: chain(&e) })?;

    let info = describe(&runtime, &pre, &plugin, &hash, limits)?;
    Ok(LoadedPlugin { runtime, pre, info: Arc::new(info), limits })
}

/// Compare the component's exports and imports with the world, so that a component of
/// another world gets a message that names what is missing or extra.
fn check_world(component: &Component, engine: &wasmtime::Engine) -> Result<(), String> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let missing: Vec<&str> = EXPORTS.iter().copied().filter(|e| !exports.contains(e)).collect();
    if !missing.is_empty() {
        return Err(format!("it does not export {} (it exports: {})", quoted(&missing), if exports.is_empty() { "nothing".to_string() } else { quoted(&exports) }));
    }
    let foreign: Vec<&str> = ty
        .imports(engine)
        .filter(|(name, item)| {
            let allowed = OWN_IMPORTS.contains(name) || (name.starts_with("wasi:") && matches!(item.ty, ComponentItem::ComponentInstance(_)));
            !allowed
        })
        .map(|(name, _)| name)
        .collect();
    if !foreign.is_empty() {
        return Err(format!("it imports {}, which sluice does not provide", quoted(&foreign)));
    }
    Ok(())
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

fn describe(runtime: &Runtime, pre: &PluginPre<StoreState>, origin: &str, hash: &str, limits: Limits) -> Result<PluginInfo, LoadError> {
    let err = |reason: String| LoadError::Describe { plugin: origin.to_string(), reason };
    let name: Arc<str> = Arc::from(origin);
    let mut store = runtime.store(name.clone(), limits);
    let described = pre
        .instantiate(&mut store)
        .and_then(|plugin| plugin.call_describe(&mut store))
        .map_err(|e| instance::trap_error(&mut store, &name, "describe", e, limits))
        .map_err(|e: CallError| err(e.to_string()))?;
    let output_schema = instance::decode_schema(described.output_schema).map_err(|reason| err(format!("its output schema is not an Arrow IPC schema: {reason}")))?;
    if described.name.trim().is_empty() {
        return Err(err("it reports an empty name".into()));
    }
    Ok(PluginInfo {
        name: described.name,
        version: described.version,
        description: described.description,
        kind: match described.kind {
            bindings::sluice::plugin::types::PluginKind::Transform => PluginKind::Transform,
            bindings::sluice::plugin::types::PluginKind::Aggregate => PluginKind::Aggregate,
        },
        state_version: described.state_version,
        output_schema,
        content_hash: hash.to_string(),
    })
}

impl LoadedPlugin {
    /// What the plugin says about itself.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The limits new instances get.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Change the limits for instances made from now on.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A new instance, initialised with `config` (JSON text; empty for none).
    pub fn instantiate(&self, config: &str) -> Result<PluginInstance, CallError> {
        PluginInstance::new(self, config)
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("info", &self.info).field("limits", &self.limits).finish_non_exhaustive()
    }
}
