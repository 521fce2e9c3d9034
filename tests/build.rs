//! Builds the test-only plugins (`tests/plugins/*`) for wasm32-wasip2 and exposes their
//! paths as constants (see `src/lib.rs`).

#[path = "../host/build_support.rs"]
mod build_support;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let plugins = [
        ("hostile", manifest.join("plugins/hostile")),
        ("other-world", manifest.join("plugins/other-world")),
    ];
    let packages: Vec<_> = plugins.iter().map(|(n, d)| (*n, d.as_path())).collect();
    for (package, path) in build_support::build_plugins(&workspace, &packages) {
        println!("cargo:rustc-env=SLUICE_TEST_PLUGIN_{}={}", build_support::const_name(&package), path.display());
    }
}
