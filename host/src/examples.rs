//! The example plugins from `plugins/`, compiled for wasm32-wasip2 by `build.rs` and
//! embedded in the binary, so the demo and `sluice plugin test builtin:NAME` need no files.

/// `json-filter`: keep records whose JSON matches predicates, project fields.
pub const JSON_FILTER: &[u8] = include_bytes!(env!("SLUICE_EXAMPLE_JSON_FILTER"));

/// `ad-clicks`: the seed's sliding-window ad-click aggregation.
pub const AD_CLICKS: &[u8] = include_bytes!(env!("SLUICE_EXAMPLE_AD_CLICKS"));

/// Names accepted by [`by_name`].
pub const NAMES: [&str; 2] = ["json-filter", "ad-clicks"];

/// The embedded component called `name`.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "json-filter" => Some(JSON_FILTER),
        "ad-clicks" => Some(AD_CLICKS),
        _ => None,
    }
}

/// The embedded component called `name`, or a message listing the names there are.
pub fn named(name: &str) -> Result<&'static [u8], String> {
    by_name(name).ok_or_else(|| format!("there is no built-in plugin `{name}`; built-in plugins are: {}", NAMES.join(", ")))
}
