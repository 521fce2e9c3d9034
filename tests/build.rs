//! Builds the test-only plugins (`tests/plugins/*`) for wasm32-wasip2 and exposes their
//! paths as constants (see `src/lib.rs`).

#[path = "../host/build_support.rs"]
mod build_support;

fn main() {
    build_support::build_and_export(&["tests/plugins/hostile", "tests/plugins/other-world", "tests/plugins/ad-clicks-v2", "tests/plugins/raw-output"], "SLUICE_TEST_PLUGIN_");
}
