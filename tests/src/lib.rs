//! Support for sluice's integration tests (`tests/*.rs`, run as the host crate's tests):
//! paths of the test-only plugins, built from source by `build.rs`, and independent
//! reference computations to compare plugin output with.

pub mod reference;
pub mod rng;

/// A transform that loops, exhausts memory or stack, or panics, per its `mode` config.
pub const HOSTILE_WASM: &str = env!("SLUICE_TEST_PLUGIN_HOSTILE");

/// A valid component of another WIT world.
pub const OTHER_WORLD_WASM: &str = env!("SLUICE_TEST_PLUGIN_OTHER_WORLD");

/// A transform that speaks the WIT contract by hand and returns output the host must
/// refuse (config `"garbage"`, `"other-schema"` or `"bad-row"`).
pub const RAW_OUTPUT_WASM: &str = env!("SLUICE_TEST_PLUGIN_RAW_OUTPUT");

/// `ad-clicks` 2.0.0: the same aggregation and state as `plugins/ad-clicks`, plus an
/// `avg_cost` column.
pub const AD_CLICKS_V2_WASM: &str = env!("SLUICE_TEST_PLUGIN_AD_CLICKS_V2");
