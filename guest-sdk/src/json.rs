//! JSON helpers: parsing record values, looking up dotted paths, and (natively) turning Arrow
//! rows into JSON objects — the one conversion `sluice plugin test`, the JSON-lines and Kafka
//! sinks and the native test harness share.

use serde::Deserialize;
use serde_json::{Map, Value};

mod members;
#[cfg(not(target_arch = "wasm32"))]
mod rows;

pub use members::Members;
#[cfg(not(target_arch = "wasm32"))]
pub use rows::{batch_to_rows, bytes_value, encode_rows, JsonRows};

/// Parse JSON bytes into `T`. The error says what is wrong and where, e.g.
/// `invalid JSON: expected value at line 1 column 5`.
pub fn parse<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, String> {
    // Valid UTF-8 is checked once, and the parser then skips its per-string check;
    // anything else goes to the byte parser, which says where the bad bytes are.
    let parsed = match utf8(bytes) {
        Some(text) => serde_json::from_str(text),
        None => serde_json::from_slice(bytes),
    };
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("unexpected JSON content: {e}"),
        serde_json::error::Category::Eof => format!("truncated JSON: {e}"),
        _ => format!("invalid JSON: {e}"),
    })
}

/// `bytes` as text when it is valid UTF-8. ASCII, the common case for JSON, is recognised
/// by a loop the compiler vectorizes (WebAssembly SIMD too): in a plugin that is much
/// faster than the standard library's check, which reads 4 bytes at a time on wasm32.
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.iter().fold(0u8, |acc, &b| acc | b) < 0x80 {
        // SAFETY: every byte is below 0x80, so the bytes are ASCII, which is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// Look up a dotted path such as `geo.country` in a JSON value. Each segment names an
/// object member; a segment that is all digits also indexes into an array.
pub fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Insert `leaf` at a dotted path, creating intermediate objects. Used to project fields
/// while keeping their nesting: `geo.country` becomes `{"geo": {"country": ...}}`.
pub fn insert_path(target: &mut Map<String, Value>, path: &str, leaf: Value) {
    let mut segments = path.split('.').peekable();
    let mut map = target;
    while let Some(seg) = segments.next() {
        if segments.peek().is_none() {
            map.insert(seg.to_string(), leaf);
            return;
        }
        let slot = map.entry(seg.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        map = slot.as_object_mut().expect("just made an object");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn utf8_accepts_ascii_and_multibyte_text_and_refuses_invalid_bytes() {
        assert_eq!(utf8(br#"{"a": "b"}"#), Some(r#"{"a": "b"}"#));
        assert_eq!(utf8("{\"ü\": \"日本\"}".as_bytes()), Some("{\"ü\": \"日本\"}"));
        assert_eq!(utf8(b""), Some(""));
        assert_eq!(utf8(b"{\"a\": \"\xff\"}"), None);
        assert_eq!(utf8(b"\xe6\x97"), None, "a cut multibyte sequence");
    }

    #[test]
    fn parse_reads_text_and_says_where_bytes_are_not_utf8() {
        #[derive(Deserialize)]
        struct V<'a> {
            a: &'a str,
        }
        assert_eq!(parse::<V>("{\"a\": \"日本\"}".as_bytes()).unwrap().a, "日本");
        let e = parse::<V>(b"{\"a\": \"\xff\"}").err().unwrap();
        assert!(e.contains("invalid JSON") && e.contains("column"), "{e}");
        assert!(parse::<V>(b"{\"a\": \"x\"").err().unwrap().starts_with("truncated JSON"));
    }

    #[test]
    fn lookup_follows_objects_and_array_indexes() {
        let v = json!({"a": {"b": [10, {"c": true}]}});
        assert_eq!(lookup(&v, "a.b.0"), Some(&json!(10)));
        assert_eq!(lookup(&v, "a.b.1.c"), Some(&json!(true)));
        assert_eq!(lookup(&v, "a.x"), None);
        assert_eq!(lookup(&v, "a.b.c"), None);
    }

    #[test]
    fn insert_path_keeps_nesting() {
        let mut m = Map::new();
        insert_path(&mut m, "geo.country", json!("KR"));
        insert_path(&mut m, "geo.city", json!("Seoul"));
        insert_path(&mut m, "id", json!(1));
        assert_eq!(Value::Object(m), json!({"geo": {"country": "KR", "city": "Seoul"}, "id": 1}));
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        let e = parse::<Value>(b"{\"a\": }").unwrap_err();
        assert!(e.starts_with("invalid JSON") && e.contains("column 7"), "{e}");
        let e = parse::<Value>(b"{\"a\": 1").unwrap_err();
        assert!(e.starts_with("truncated JSON"), "{e}");
    }
}
