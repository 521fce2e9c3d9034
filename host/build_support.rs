// Builds WebAssembly plugin crates of this workspace for `wasm32-wasip2` from a build
// script, into a target directory of their own (so the inner cargo never waits on the
// outer cargo's lock), and copies each `.wasm` into OUT_DIR.
//
// Shared by `host/build.rs` (example plugins embedded in the binary) and
// `tests/build.rs` (test-only plugins); included with `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `packages` (crate names, each with a `cdylib`) and return `(package, wasm path in
/// OUT_DIR)` pairs. `dirs` are the crates' folders, watched for changes.
fn build_plugins(workspace: &Path, packages: &[(&str, &Path)]) -> Vec<(String, PathBuf)> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    let target_dir = std::env::var_os("SLUICE_WASM_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target").join("wasm"));

    for watched in ["guest-sdk/src", "guest-sdk/Cargo.toml", "wit", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=SLUICE_WASM_TARGET_DIR");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args(["build", "--target", "wasm32-wasip2", "--profile", "plugin", "--target-dir"]).arg(&target_dir);
    for (package, dir) in packages {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!("cargo:rerun-if-changed={}", dir.join("Cargo.toml").display());
        cmd.args(["-p", package]);
    }
    // Flags meant for the outer (host) build must not leak into the wasm build.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PROFILE_") || key.to_string_lossy().starts_with("CARGO_FEATURE_") {
            cmd.env_remove(key);
        }
    }
    // WebAssembly SIMD: wasmtime supports it on every host sluice runs on, and byte-wise
    // work (JSON scanning, copying) gets markedly faster.
    cmd.env("CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS", "-C target-feature=+simd128");
    let status = cmd.status().expect("failed to run cargo to build the wasm plugins");
    if !status.success() {
        panic!(
            "building the WebAssembly plugins failed (see the cargo output above). \
             The wasm32-wasip2 target comes from rust-toolchain.toml; if rustup could not add it, run \
             `rustup target add wasm32-wasip2`."
        );
    }

    packages
        .iter()
        .map(|(package, _)| {
            let file = format!("{}.wasm", package.replace('-', "_"));
            let built = target_dir.join("wasm32-wasip2").join("plugin").join(&file);
            let copied = out_dir.join(&file);
            std::fs::copy(&built, &copied).unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), copied.display()));
            (package.to_string(), copied)
        })
        .collect()
}

/// Build the plugin crates in `dirs` (relative to the workspace; the folder name is the
/// package name) and emit `cargo:rustc-env={prefix}{NAME}=<path of the .wasm>` for each,
/// `ad-clicks` becoming `{prefix}AD_CLICKS`.
pub fn build_and_export(dirs: &[&str], prefix: &str) {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("crates live one level below the workspace").to_path_buf();
    let packages: Vec<(&str, PathBuf)> = dirs.iter().map(|d| (Path::new(d).file_name().and_then(|n| n.to_str()).expect("plugin folder name"), workspace.join(d))).collect();
    let refs: Vec<(&str, &Path)> = packages.iter().map(|(n, d)| (*n, d.as_path())).collect();
    for (package, path) in build_plugins(&workspace, &refs) {
        println!("cargo:rustc-env={prefix}{}={}", package.replace('-', "_").to_uppercase(), path.display());
    }
}
