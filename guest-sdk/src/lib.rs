//! # sluice-sdk: write sluice plugins
//!
//! A sluice plugin is a WebAssembly component that the sluice host calls once per
//! micro-batch of Kafka records. With this crate a plugin is a plain Rust type:
//!
//! * a stateless [`Transform`] (filter, project, enrich, parse…), or
//! * a stateful [`Aggregate`] (windowed counts, sums, distinct counts…) whose state the
//!   host checkpoints together with the offsets it belongs to,
//!
//! exported with [`export_transform!`] or [`export_aggregate!`]. A transform that looks at
//! one record at a time is shorter as a [`Filter`], [`Map`] or [`FlatMap`] (see
//! [`per_record`]), exported with [`export_filter!`], [`export_map!`] or
//! [`export_flat_map!`]. Build it with
//! `cargo build --release --target wasm32-wasip2` (crate type `cdylib`) and hand the
//! `.wasm` file to `sluice`.
//!
//! Records arrive as a [`Batch`]: iterate [`Record`]s (key, value, timestamp, partition,
//! offset, headers) or use the Arrow columns directly. Output goes to an [`Output`] as
//! `serde::Serialize` rows, Arrow batches, or forwarded records. Bad records are
//! [rejected](Output::reject) with a reason instead of failing the batch. The [`window`]
//! module has event-time windows, a watermark and a late-data policy; [`json`] has JSON
//! helpers; [`testing`] runs a plugin natively in unit tests.
//!
//! ```
//! use serde::Deserialize;
//! use sluice_sdk::{Batch, Context, Error, Output, Transform};
//!
//! #[derive(Default, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Config {
//!     min_cost: f64,
//! }
//!
//! #[derive(Deserialize)]
//! struct Click {
//!     cost: f64,
//! }
//!
//! /// Keeps the clicks that cost at least `min_cost`; rejects values that are not clicks.
//! pub struct BigSpenders {
//!     min_cost: f64,
//! }
//!
//! impl Transform for BigSpenders {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, Error> {
//!         if config.min_cost < 0.0 {
//!             return Err(Error::config("min_cost must not be negative"));
//!         }
//!         Ok(Self { min_cost: config.min_cost })
//!     }
//!
//!     fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
//!         for record in batch.records() {
//!             match record.json::<Click>() {
//!                 Ok(click) if click.cost >= self.min_cost => out.forward(&record, None)?,
//!                 Ok(_) => {}
//!                 Err(reason) => out.reject(record.index(), reason),
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! sluice_sdk::export_transform!(BigSpenders);
//!
//! // Unit-test it natively, without Kafka or WebAssembly:
//! use sluice_sdk::testing::TransformHarness;
//! let mut plugin = TransformHarness::<BigSpenders>::new(serde_json::json!({"min_cost": 1.0})).unwrap();
//! let out = plugin.push_values(&[r#"{"cost": 0.5}"#, r#"{"cost": 2}"#, "oops"]).unwrap();
//! assert_eq!(out.values(), vec![r#"{"cost": 2}"#]);
//! assert_eq!(out.record_errors[0].row, 2);
//! ```
//!
//! The contract behind this crate is `wit/plugin.wit` (package `sluice:plugin@0.1.0`).

#![deny(missing_docs)]

extern crate self as sluice_sdk;

mod batch;
pub mod collections;
mod driver;
pub mod json;
pub mod log;
#[cfg(any(target_arch = "wasm32", test))]
mod mem;
mod output;
pub mod per_record;
mod plugin;
mod schema;
#[cfg(test)]
mod test_rng;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod window;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use arrow_array;
pub use arrow_schema;
pub use batch::{Batch, Record};
pub use output::{Finished, Output, RecordError};
pub use per_record::{Filter, Filtered, FlatMap, FlatMapped, Map, Mapped};
pub use plugin::{Aggregate, Context, Error, ErrorKind, NoConfig, OffsetRange, PluginKind, Transform};
pub use schema::{columns, decode_ipc, encode_ipc, encode_ipc_into, is_record_schema, record_schema, same_columns, RecordParts, RecordsBuilder};
pub use serde_json;

/// Not public API: used by the export macros.
#[doc(hidden)]
pub mod __private {
    pub use crate::driver::{AggregateDriver, Driver, Meta, TransformDriver};
    #[cfg(target_arch = "wasm32")]
    pub use crate::guest::{bindings, describe, init, process, restore, snapshot};
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;
}

/// Export a [`Transform`] as the plugin of this crate (which must be a `cdylib`).
///
/// The plugin's name, version and description are taken from its `Cargo.toml`; a plugin
/// published under another name or version than its crate's says so:
/// `export_transform!(MyFilter, name = "filter", version = "2.1.0")`. On targets other
/// than WebAssembly the macro only checks that the type implements the trait, so the
/// crate still builds and unit-tests natively.
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        $crate::__export_driver!($crate::__private::TransformDriver<$plugin>, env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
    };
    ($plugin:ty, name = $name:literal, version = $version:literal) => {
        $crate::__export_driver!($crate::__private::TransformDriver<$plugin>, $name, $version);
    };
}

/// Export a [`Filter`] as the plugin of this crate (a transform; see [`export_transform!`]).
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        $crate::export_transform!($crate::Filtered<$plugin>);
    };
    ($plugin:ty, name = $name:literal, version = $version:literal) => {
        $crate::export_transform!($crate::Filtered<$plugin>, name = $name, version = $version);
    };
}

/// Export a [`Map`] as the plugin of this crate (a transform; see [`export_transform!`]).
#[macro_export]
macro_rules! export_map {
    ($plugin:ty) => {
        $crate::export_transform!($crate::Mapped<$plugin>);
    };
    ($plugin:ty, name = $name:literal, version = $version:literal) => {
        $crate::export_transform!($crate::Mapped<$plugin>, name = $name, version = $version);
    };
}

/// Export a [`FlatMap`] as the plugin of this crate (a transform; see [`export_transform!`]).
#[macro_export]
macro_rules! export_flat_map {
    ($plugin:ty) => {
        $crate::export_transform!($crate::FlatMapped<$plugin>);
    };
    ($plugin:ty, name = $name:literal, version = $version:literal) => {
        $crate::export_transform!($crate::FlatMapped<$plugin>, name = $name, version = $version);
    };
}

/// Export an [`Aggregate`] as the plugin of this crate (which must be a `cdylib`).
///
/// See [`export_transform!`].
#[macro_export]
macro_rules! export_aggregate {
    ($plugin:ty) => {
        $crate::__export_driver!($crate::__private::AggregateDriver<$plugin>, env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
    };
    ($plugin:ty, name = $name:literal, version = $version:literal) => {
        $crate::__export_driver!($crate::__private::AggregateDriver<$plugin>, $name, $version);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_driver {
    ($driver:ty, $name:expr, $version:expr) => {
        const _: fn() = || {
            fn assert_driver<D: $crate::__private::Driver>() {}
            assert_driver::<$driver>();
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SluiceGuest;

            static META: $crate::__private::Meta = $crate::__private::Meta { name: $name, version: $version, description: env!("CARGO_PKG_DESCRIPTION") };

            impl $crate::__private::bindings::Guest for SluiceGuest {
                fn describe() -> $crate::__private::bindings::PluginInfo {
                    $crate::__private::describe::<$driver>(&META)
                }
                fn init(config: String) -> Result<Vec<u8>, $crate::__private::bindings::PluginError> {
                    $crate::__private::init::<$driver>(config)
                }
                fn process(
                    batch: Vec<u8>,
                    context: $crate::__private::bindings::BatchContext,
                ) -> Result<$crate::__private::bindings::BatchOutput, $crate::__private::bindings::PluginError> {
                    $crate::__private::process::<$driver>(batch, context)
                }
                fn snapshot() -> Result<Vec<u8>, $crate::__private::bindings::PluginError> {
                    $crate::__private::snapshot::<$driver>()
                }
                fn restore(state: Vec<u8>, state_version: u32) -> Result<(), $crate::__private::bindings::PluginError> {
                    $crate::__private::restore::<$driver>(state, state_version)
                }
            }

    $crate::__private::bindings::__export_plugin_world!(SluiceGuest with_types_in $crate::__private::bindings);
        };
    };
}
