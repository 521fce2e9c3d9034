//! Builds the example plugins for wasm32-wasip2 so the binary can embed them
//! (`sluice demo`, `sluice plugin test` with a built-in name).

#[path = "build_support.rs"]
mod build_support;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let plugins = [
        ("json-filter", workspace.join("plugins/json-filter")),
        ("ad-clicks", workspace.join("plugins/ad-clicks")),
    ];
    let packages: Vec<_> = plugins.iter().map(|(n, d)| (*n, d.as_path())).collect();
    for (package, path) in build_support::build_plugins(&workspace, &packages) {
        println!("cargo:rustc-env=SLUICE_EXAMPLE_{}={}", build_support::const_name(&package), path.display());
    }
}
