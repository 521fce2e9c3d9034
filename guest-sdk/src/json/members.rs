//! [`Members`]: one JSON object read as its member names and the raw JSON text of each
//! value, checked as strictly as `serde_json` checks it, in one pass with no allocation.
//!
//! This is the per-record hot path of JSON plugins. It scans strings eight bytes at a time
//! and makes no calls per byte, which matters most in WebAssembly, where every loop
//! iteration and every call also checks the plugin's time budget.

use std::borrow::Cow;

use serde_json::Value;

/// The members of one JSON object: each name (unescaped) with its value as JSON text,
/// borrowed from the record. Reuse one `Members` across the records of a batch.
///
/// ```
/// use sluice_sdk::json::Members;
/// let mut m = Members::new();
/// m.parse(br#"{"user": "u-1", "cost": 0.25, "tags": ["a"]}"#).unwrap();
/// assert_eq!(m.get("tags"), Some(r#"["a"]"#));
/// assert_eq!(m.str("user").as_deref(), Some("u-1"));
/// assert_eq!(m.f64("cost"), Some(0.25));
/// assert!(m.parse(b"[1, 2]").unwrap_err().contains("not an object"));
/// ```
#[derive(Debug, Default)]
pub struct Members<'a> {
    items: Vec<(Cow<'a, str>, &'a str)>,
    /// Open brackets while skipping a nested value.
    stack: Vec<u8>,
}

impl<'a> Members<'a> {
    /// An empty set of members.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read `bytes`, which must be one JSON object (whitespace around it is allowed),
    /// replacing the members read before. The whole document is checked as
    /// [`parse`](super::parse) checks it; when it is not a JSON object the error says why,
    /// in the same words, or what kind of JSON it is instead.
    pub fn parse(&mut self, bytes: &'a [u8]) -> Result<(), String> {
        self.items.clear();
        let read = super::utf8(bytes).and_then(|text| self.scan(text));
        if read.is_none() {
            self.items.clear();
            return Err(not_an_object(bytes));
        }
        Ok(())
    }

    /// The value of member `name` as JSON text; the last one if the name repeats, as
    /// `serde_json` keeps it.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.items.iter().rev().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Member `name` if it is a JSON string, unescaped.
    pub fn str(&self, name: &str) -> Option<Cow<'a, str>> {
        string(self.get(name)?)
    }

    /// Member `name` if it is a JSON number written as an integer within the range of
    /// `i64`, as `serde_json` reads an `i64`.
    pub fn i64(&self, name: &str) -> Option<i64> {
        integer(self.get(name)?)
    }

    /// Member `name` if it is a JSON number within the range of `f64`, as `serde_json`
    /// reads an `f64`.
    pub fn f64(&self, name: &str) -> Option<f64> {
        number(self.get(name)?)
    }

    /// The members in document order, repeated names included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a str)> + '_ {
        self.items.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// How many members were read (repeated names counted each time).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the object had no members.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `None` when `text` is not exactly one JSON object.
    fn scan(&mut self, text: &'a str) -> Option<()> {
        let b = text.as_bytes();
        let mut i = skip_ws(b, 0);
        if *b.get(i)? != b'{' {
            return None;
        }
        i = skip_ws(b, i + 1);
        if *b.get(i)? == b'}' {
            i += 1;
        } else {
            loop {
                let (end, escaped, start) = member_name(b, i)?;
                let key = if escaped {
                    // Escapes in names are decoded (and checked) exactly as serde_json does.
                    Cow::Owned(serde_json::from_str::<String>(&text[i..=end]).ok()?)
                } else {
                    Cow::Borrowed(&text[i + 1..end])
                };
                i = self.value_end(b, start)?;
                self.items.push((key, &text[start..i]));
                i = skip_ws(b, i);
                match *b.get(i)? {
                    b',' => i = skip_ws(b, i + 1),
                    b'}' => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (skip_ws(b, i) == b.len()).then_some(())
    }

    /// The end of the value that starts at `i`.
    fn value_end(&mut self, b: &[u8], i: usize) -> Option<usize> {
        match *b.get(i)? {
            b'[' | b'{' => container_end(&mut self.stack, b, i),
            _ => scalar_end(b, i),
        }
    }
}

/// Why `bytes` is not one JSON object, in serde_json's words.
fn not_an_object(bytes: &[u8]) -> String {
    match super::parse::<Value>(bytes) {
        Err(reason) => reason,
        Ok(Value::Object(_)) => "value is a JSON object this reader does not understand".to_string(),
        Ok(other) => format!("value is JSON but not an object: {}", kind(&other)),
    }
}

/// "a number", "an array", … for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` that is `"`, `\` or a control character (below
/// 0x20). Higher bytes can be marked wrongly by a borrow, but the lowest mark is right.
#[inline]
fn specials(w: u64) -> u64 {
    let quote = w ^ (ONES * b'"' as u64);
    let backslash = w ^ (ONES * b'\\' as u64);
    ((quote.wrapping_sub(ONES) & !quote) | (backslash.wrapping_sub(ONES) & !backslash) | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGH
}

/// The index of the closing quote of the string whose text starts at `i`, and whether the
/// string had escapes; `None` if it is not a valid JSON string.
fn string_end(b: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        // Eight bytes at a time to the next quote, backslash or control character.
        while let Some(chunk) = b.get(i..i + 8) {
            let marks = specials(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
            if marks != 0 {
                i += (marks.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match *b.get(i)? {
            b'"' => return Some((i, escaped)),
            b'\\' => {
                escaped = true;
                i += match *b.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                    b'u' if b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => 6,
                    _ => return None,
                };
            }
            c if c < 0x20 => return None,
            _ => i += 1,
        }
    }
}

fn digits_end(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// The end of the number, string or literal that starts at `i`.
fn scalar_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i + 1).map(|(end, _)| end + 1),
        b'-' | b'0'..=b'9' => number_end(b, i),
        b't' => literal_end(b, i, b"true"),
        b'f' => literal_end(b, i, b"false"),
        b'n' => literal_end(b, i, b"null"),
        _ => None,
    }
}

fn literal_end(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b[i..].starts_with(word).then_some(i + word.len())
}

/// The end of the JSON number at `i`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    if b[i] == b'-' {
        i += 1;
    }
    i = match *b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits_end(b, i + 1),
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        let end = digits_end(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits_end(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

/// A member name whose opening quote is at `i`, and the colon after it: the index of the
/// name's closing quote, whether the name has escapes, and where the member's value starts.
fn member_name(b: &[u8], i: usize) -> Option<(usize, bool, usize)> {
    if *b.get(i)? != b'"' {
        return None;
    }
    let (end, escaped) = string_end(b, i + 1)?;
    let colon = skip_ws(b, end + 1);
    if *b.get(colon)? != b':' {
        return None;
    }
    Some((end, escaped, skip_ws(b, colon + 1)))
}

/// The end of the array or object that starts at `i`. Nesting is not limited, as
/// serde_json does not limit it in values it skips.
fn container_end(stack: &mut Vec<u8>, b: &[u8], mut i: usize) -> Option<usize> {
    stack.clear();
    loop {
        // A value starts at `i`.
        match *b.get(i)? {
            open @ (b'[' | b'{') => {
                stack.push(open);
                i = skip_ws(b, i + 1);
                // `]` and `}` are two past `[` and `{`.
                if *b.get(i)? == open + 2 {
                    stack.pop();
                    i += 1;
                } else {
                    if open == b'{' {
                        i = member_name(b, i)?.2;
                    }
                    continue;
                }
            }
            _ => i = scalar_end(b, i)?,
        }
        // After a value: close containers up to the next comma.
        loop {
            let Some(&open) = stack.last() else { return Some(i) };
            i = skip_ws(b, i);
            match *b.get(i)? {
                b',' => {
                    i = skip_ws(b, i + 1);
                    if open == b'{' {
                        i = member_name(b, i)?.2;
                    }
                    break;
                }
                close if close == open + 2 => {
                    stack.pop();
                    i += 1;
                }
                _ => return None,
            }
        }
    }
}

/// A JSON string value, unescaped.
fn string(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// A JSON integer within `i64`; what serde_json gives for an `i64` field.
fn integer(raw: &str) -> Option<i64> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // serde_json reads `-0` as the float -0.0, which is not an `i64`.
    raw.parse().ok().filter(|&n| n != 0 || digits.len() == raw.len())
}

/// A JSON number as `f64`; what serde_json gives for an `f64` field.
fn number(raw: &str) -> Option<f64> {
    if let Some(n) = integer(raw) {
        return Some(n as f64);
    }
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    if !whole.is_empty() && !fraction.is_empty() && plain(whole) && plain(fraction) && whole.len() + fraction.len() <= 15 {
        // Up to 15 digits and no exponent: exact in both parsers, which round correctly.
        return raw.parse().ok();
    }
    serde_json::from_str(raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(text: &str) -> Result<Vec<(String, String)>, String> {
        let mut m = Members::new();
        m.parse(text.as_bytes())?;
        Ok(m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// What serde_json makes of `text` as an object of raw values (the way json-filter
    /// read records before `Members`).
    fn serde_members(text: &str) -> Result<Vec<(String, String)>, String> {
        let raw: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(raw.into_iter().map(|(k, v)| (k, v.get().to_string())).collect())
    }

    #[test]
    fn reads_names_and_raw_values() {
        let got = members(r#" { "a" : 1 , "b":"x\"y", "c": [1, {"d": [ ]}, "]"], "e": {}, "f": null, "g": -0.5e-3 } "#).unwrap();
        let want = [("a", "1"), ("b", r#""x\"y""#), ("c", r#"[1, {"d": [ ]}, "]"]"#), ("e", "{}"), ("f", "null"), ("g", "-0.5e-3")];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(members("{}").unwrap(), []);
        assert_eq!(members(r#"{"a\u00e9\n": true}"#).unwrap(), [("aé\n".to_string(), "true".to_string())]);
    }

    #[test]
    fn repeated_names_keep_the_last_for_get() {
        let mut m = Members::new();
        m.parse(br#"{"a": 1, "a": 2}"#).unwrap();
        assert_eq!((m.len(), m.get("a")), (2, Some("2")));
    }

    #[test]
    fn accepts_and_refuses_exactly_what_serde_json_does() {
        // Each document is checked against serde_json's verdict (values as raw JSON).
        let docs = [
            r#"{"a": 1}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": .5}"#,
            r#"{"a": -}"#,
            r#"{"a": 1e}"#,
            r#"{"a": 1e+5}"#,
            r#"{"a": 1E-0}"#,
            r#"{"a": -0}"#,
            r#"{"a": +1}"#,
            r#"{"a": 1,}"#,
            r#"{,}"#,
            r#"{"a" 1}"#,
            r#"{"a": 1 "b": 2}"#,
            r#"{"a": tru}"#,
            r#"{"a": true}"#,
            r#"{"a": nul}"#,
            r#"{"a": falsey}"#,
            r#"{"a": [1,]}"#,
            r#"{"a": [,1]}"#,
            r#"{"a": [1 2]}"#,
            r#"{"a": {"b"}}"#,
            r#"{"a": {"b": 1,}}"#,
            r#"{"a": {1: 2}}"#,
            r#"{"a": [}"#,
            r#"{"a": {]}"#,
            r#"{"a": [[[[]]]]}"#,
            r#"{"a": "\q"}"#,
            r#"{"a": "\u12"}"#,
            r#"{"a": "\u12G4"}"#,
            r#"{"a": "\uD800"}"#,
            r#"{"\uD800": 1}"#,
            r#"{"a": "tab	in"}"#,
            "{\"a\": \"nl\nin\"}",
            r#"{"a": "ok"} x"#,
            r#"{"a": 1}}"#,
            "{\"a\": \"\u{7f}\u{1F600}\"}",
            r#"{"a": "0123456789abcdef\"0123456789"}"#,
            r#"[1]"#,
            r#""s""#,
            "",
            " ",
            "{",
            r#"{"a""#,
            r#"{"a":"#,
            r#"{"a": "unterminated}"#,
            r#"{"a": 1"#,
            r#"{"a": [1"#,
            r#"{"a": {"b": 1"#,
            "\u{feff}{}",
        ];
        for doc in docs {
            let ours = members(doc);
            let theirs = serde_members(doc);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{doc:?}: ours {ours:?}, serde_json {theirs:?}");
            if let (Ok(mut ours), Ok(theirs)) = (ours, theirs) {
                ours.sort();
                assert_eq!(ours, theirs, "{doc:?}");
            }
        }
    }

    #[test]
    fn random_documents_get_serde_json_s_verdict() {
        // Documents glued from JSON fragments, valid and broken, by a fixed-seed generator.
        const PIECES: [&str; 28] = [
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            " ",
            "\"a\"",
            "\"b\"",
            "\"k\\n\"",
            "\"\\u00e9\"",
            "\"\\x\"",
            "\"",
            "\\",
            "1",
            "-",
            "0",
            ".5",
            "e3",
            "E-1",
            "12345678901234567890",
            "true",
            "false",
            "null",
            "nul",
            "\u{e9}",
            "\t",
            "\"0123456789abcdef\"",
        ];
        let mut rng = crate::test_rng::TestRng::new(0x2545_f491_4f6c_dd1d);
        let mut next = |n: usize| rng.below(n);
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..20_000 {
            let mut doc = String::from(if next(8) == 0 { "" } else { "{" });
            for _ in 0..next(12) {
                doc.push_str(PIECES[next(PIECES.len())]);
            }
            // Often a well-formed member, so that many documents are valid.
            if next(2) == 0 {
                doc = format!("{{\"m\": {}}}", PIECES[14 + next(12)]);
            }
            let (ours, theirs) = (members(&doc), serde_members(&doc));
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{doc:?}: ours {ours:?}, serde_json {theirs:?}");
            if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                // serde_json's map keeps the last of a repeated name, as `get` does.
                let ours: Vec<(String, String)> = ours.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect();
                assert_eq!(ours, theirs, "{doc:?}");
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        assert!(valid > 1_000 && invalid > 1_000, "both kinds are exercised: {valid} valid, {invalid} invalid");
    }

    #[test]
    fn errors_say_why_in_serde_json_words() {
        let e = members(r#"{"a": }"#).unwrap_err();
        assert!(e.starts_with("invalid JSON") && e.contains("column 7"), "{e}");
        assert!(members(r#"{"a": 1"#).unwrap_err().starts_with("truncated JSON"));
        assert_eq!(members("[1]").unwrap_err(), "value is JSON but not an object: an array");
        assert_eq!(members("5").unwrap_err(), "value is JSON but not an object: a number");
        let e = Members::new().parse(b"{\"a\": \"\xff\"}").unwrap_err();
        assert!(e.contains("invalid JSON") && e.contains("column"), "{e}");
    }

    #[test]
    fn a_failed_parse_leaves_no_members() {
        let mut m = Members::new();
        m.parse(br#"{"a": 1}"#).unwrap();
        assert!(m.parse(br#"{"b": 2, "c": }"#).is_err());
        assert!(m.is_empty() && m.get("b").is_none());
    }

    #[test]
    fn deep_nesting_is_read_without_recursion() {
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(members(&deep).unwrap().len(), 1);
        let unbalanced = format!("{{\"a\": {}{}}}", "[".repeat(1000), "]".repeat(999));
        assert!(members(&unbalanced).is_err());
    }

    #[test]
    fn typed_values_match_serde_json() {
        #[derive(serde::Deserialize)]
        struct F {
            v: f64,
        }
        #[derive(serde::Deserialize)]
        struct I {
            v: i64,
        }
        let numbers = [
            "0",
            "-0",
            "-0.0",
            "1",
            "0.1",
            "0.37",
            "123456789012345",
            "1234567890123456789",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "1.5e3",
            "2.2250738585072014e-308",
            "0.30000000000000004",
            "123456.789012345",
            "1234567.89012345678",
            "1e400",
            "\"1\"",
            "null",
        ];
        for n in numbers {
            let doc = format!("{{\"v\": {n}}}");
            let mut m = Members::new();
            m.parse(doc.as_bytes()).unwrap();
            let f = serde_json::from_str::<F>(&doc).ok().map(|f| f.v);
            assert_eq!(m.f64("v").map(f64::to_bits), f.map(f64::to_bits), "f64 {n}");
            let i = serde_json::from_str::<I>(&doc).ok().map(|i| i.v);
            assert_eq!(m.i64("v"), i, "i64 {n}");
        }
        let mut m = Members::new();
        m.parse(br#"{"s": "plain", "e": "a\"b\u00e9", "n": 5}"#).unwrap();
        assert_eq!(m.str("s"), Some(Cow::Borrowed("plain")));
        assert_eq!(m.str("e").as_deref(), Some("a\"bé"));
        assert_eq!((m.str("n"), m.str("missing")), (None, None));
    }
}
