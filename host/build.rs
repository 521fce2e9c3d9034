//! Builds the example plugins for wasm32-wasip2 so the binary can embed them
//! (`sluice demo`, `sluice plugin test builtin:NAME`).

#[path = "build_support.rs"]
mod build_support;

fn main() {
    build_support::build_and_export(&["plugins/json-filter", "plugins/ad-clicks"], "SLUICE_EXAMPLE_");
}
