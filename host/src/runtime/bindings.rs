//! Host bindings generated from `wit/plugin.wit` — the same file the SDK generates from.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});
