//! The WebAssembly side of the WIT world: generated bindings, one instance per component,
//! and conversions between the bindings' types and the SDK's. Compiled for `wasm32` only.

use std::any::Any;
use std::cell::RefCell;

/// The bindings generated from `wit/plugin.wit`.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "sluice_sdk::__private::bindings",
        runtime_path: "sluice_sdk::__private::wit_bindgen::rt",
    });
}

use self::bindings::sluice::plugin::types as wit;
use crate::driver::{Driver, Instance, Meta};
use crate::{Context, Error, ErrorKind, OffsetRange, PluginKind};

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn with_instance<D: Driver, R>(f: impl FnOnce(&mut Instance<D>) -> Result<R, Error>) -> Result<R, wit::PluginError> {
    INSTANCE
        .with_borrow_mut(|slot| match slot.as_mut().and_then(|b| b.downcast_mut::<Instance<D>>()) {
            Some(instance) => f(instance),
            None => Err(Error::batch("the host called the plugin before init")),
        })
        .map_err(to_wit_error)
}

fn to_wit_error(e: Error) -> wit::PluginError {
    let message = e.message().to_string();
    match e.kind() {
        ErrorKind::InvalidConfig => wit::PluginError::InvalidConfig(message),
        ErrorKind::BatchFailed => wit::PluginError::BatchFailed(message),
        ErrorKind::IncompatibleState => wit::PluginError::IncompatibleState(message),
    }
}

fn schema_ipc(schema: &arrow_schema::Schema) -> Vec<u8> {
    crate::schema::encode_ipc(schema, &[]).expect("a schema always encodes")
}

/// `describe`.
pub fn describe<D: Driver>(meta: &Meta) -> wit::PluginInfo {
    wit::PluginInfo {
        name: meta.name.to_string(),
        version: meta.version.to_string(),
        description: meta.description.to_string(),
        kind: match D::KIND {
            PluginKind::Transform => wit::PluginKind::Transform,
            PluginKind::Aggregate => wit::PluginKind::Aggregate,
        },
        state_version: D::STATE_VERSION,
        output_schema: schema_ipc(&D::default_schema()),
    }
}

/// `init`.
pub fn init<D: Driver>(config: String) -> Result<Vec<u8>, wit::PluginError> {
    let instance = Instance::<D>::init(&config).map_err(to_wit_error)?;
    let schema = schema_ipc(instance.schema());
    INSTANCE.with_borrow_mut(|slot| *slot = Some(Box::new(instance)));
    Ok(schema)
}

/// `process`.
pub fn process<D: Driver>(batch: Vec<u8>, context: wit::BatchContext) -> Result<wit::BatchOutput, wit::PluginError> {
    let ctx = Context {
        batch_id: context.batch_id,
        offset_ranges: context.offset_ranges.into_iter().map(|r| OffsetRange { topic: r.topic, partition: r.partition, from: r.from, until: r.until }).collect(),
        processing_time_ms: context.processing_time_ms,
        watermark_ms: context.watermark_ms,
    };
    with_instance::<D, _>(|instance| {
        let (data, finished) = instance.process_ipc(batch, &ctx)?;
        Ok(wit::BatchOutput {
            data,
            record_errors: finished.record_errors.into_iter().map(|e| wit::RecordError { row: e.row, reason: e.reason }).collect(),
            watermark_ms: finished.watermark_ms,
            late_records: finished.late_records,
        })
    })
}

/// `snapshot`.
pub fn snapshot<D: Driver>() -> Result<Vec<u8>, wit::PluginError> {
    with_instance::<D, _>(|instance| instance.snapshot())
}

/// `restore`.
pub fn restore<D: Driver>(state: Vec<u8>, state_version: u32) -> Result<(), wit::PluginError> {
    with_instance::<D, _>(|instance| instance.restore(&state, state_version))
}

/// Write a log line through the host.
pub fn log(level: crate::log::Level, message: &str) {
    use self::bindings::sluice::plugin::host::{log, LogLevel};
    let level = match level {
        crate::log::Level::Trace => LogLevel::Trace,
        crate::log::Level::Debug => LogLevel::Debug,
        crate::log::Level::Info => LogLevel::Info,
        crate::log::Level::Warn => LogLevel::Warn,
        crate::log::Level::Error => LogLevel::Error,
    };
    log(level, message);
}
