//! `json-filter`: keep the records whose JSON value matches every predicate, and
//! optionally project some fields.
//!
//! Configuration (all keys optional):
//!
//! ```json
//! {
//!   "where":  [ {"field": "country", "op": "eq", "value": "KR"},
//!               {"field": "cost", "op": "gt", "value": 0.5},
//!               {"field": "user_id", "op": "exists"} ],
//!   "select": ["campaign_id", "geo.city"],
//!   "on_invalid": "reject"
//! }
//! ```
//!
//! * `where`: every predicate must hold. `field` is a dotted path (`geo.city`, `items.0`).
//!   Ops: `eq`, `ne`, `gt`, `gte`, `lt`, `lte` (numbers compare as numbers, strings
//!   lexicographically, other pairs never match), `in` (value is a list), `contains`
//!   (substring of a string, or element of a list), `exists` (present and not null),
//!   `missing` (absent or null). As in SQL, a comparison with an absent or null field is
//!   false — also for `ne`.
//! * `select`: output only these fields, keeping their nesting; absent fields are left out.
//!   Without `select` the value passes through unchanged.
//! * `on_invalid`: what to do with a value that is not a JSON object, or whose filtered
//!   field cannot be read (a number beyond the range of f64, say): `reject` (default:
//!   dead-letter it with the reason) or `drop` (skip it silently).
//!
//! Values are checked to be valid JSON, but only the fields named in `where` and `select`
//! are decoded; selected fields are copied as they were written.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sluice_sdk::json::Members;
use sluice_sdk::{Batch, Context, Error, Output, Record, Transform};

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Predicates that must all hold.
    #[serde(default, rename = "where")]
    pub predicates: Vec<PredicateConfig>,
    /// Fields to keep; `None` keeps the whole value.
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// What to do with values that are not JSON objects.
    #[serde(default)]
    pub on_invalid: OnInvalid,
}

/// One predicate as written in the configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredicateConfig {
    /// Dotted path of the field.
    pub field: String,
    /// Operator.
    pub op: Op,
    /// Operand, for the ops that take one.
    pub value: Option<Value>,
}

/// Predicate operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Equal.
    Eq,
    /// Not equal.
    Ne,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Equal to one of a list.
    In,
    /// Substring or list element.
    Contains,
    /// Present and not null.
    Exists,
    /// Absent or null.
    Missing,
}

/// Handling of values that are not JSON objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Send to the dead-letter policy with the reason.
    #[default]
    Reject,
    /// Skip silently.
    Drop,
}

struct Predicate {
    path: Vec<String>,
    op: Op,
    value: Value,
    /// For `eq`/`ne` with a string operand: the operand as JSON text, to compare raw
    /// values without parsing them.
    raw_string: Option<String>,
}

/// A tree of selected paths: `["a.b", "a.c", "d"]` is `a{b, c}, d`.
struct Selection {
    /// The member name, as it is looked up.
    name: String,
    /// The member name as a JSON string (with quotes), ready to write.
    key_json: String,
    /// Empty: keep the whole value.
    children: Vec<Selection>,
}

/// The transform.
pub struct JsonFilter {
    predicates: Vec<Predicate>,
    select: Option<Vec<Selection>>,
    on_invalid: OnInvalid,
}

/// Follow `path` from `object`: object members by name, array elements by index.
fn lookup<'a>(object: &Members<'a>, path: &[String]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    let mut current = object.get(first)?;
    let mut inner = Members::new();
    for segment in rest {
        current = match current.as_bytes().first() {
            Some(b'{') => {
                inner.parse(current.as_bytes()).ok()?;
                inner.get(segment)?
            }
            Some(b'[') => {
                let index: usize = segment.parse().ok()?;
                serde_json::from_str::<Vec<&RawValue>>(current).ok()?.get(index)?.get()
            }
            _ => return None,
        };
    }
    Some(current)
}

impl Predicate {
    fn new(i: usize, p: PredicateConfig) -> Result<Self, Error> {
        let needs_value = !matches!(p.op, Op::Exists | Op::Missing);
        let value = match (needs_value, p.value) {
            (true, None) => return Err(Error::config(format!("where[{i}] (field `{}`): op `{:?}` needs a `value`", p.field, p.op))),
            (false, Some(_)) => return Err(Error::config(format!("where[{i}] (field `{}`): op `{:?}` takes no `value`; remove it", p.field, p.op))),
            (_, v) => v.unwrap_or(Value::Null),
        };
        if p.op == Op::In && !value.is_array() {
            return Err(Error::config(format!("where[{i}] (field `{}`): op `in` needs a list as `value`, got {value}", p.field)));
        }
        if p.field.is_empty() || p.field.split('.').any(str::is_empty) {
            return Err(Error::config(format!("where[{i}]: `{}` is not a field path like `a` or `a.b`", p.field)));
        }
        let raw_string = match (p.op, &value) {
            (Op::Eq | Op::Ne, Value::String(_)) => Some(value.to_string()),
            _ => None,
        };
        Ok(Self { path: p.field.split('.').map(str::to_string).collect(), op: p.op, value, raw_string })
    }

    /// Whether the record matches; an error when the field's value cannot be read (a
    /// number out of range, for example), which rejects the record.
    fn matches(&self, doc: &Members<'_>) -> Result<bool, String> {
        let raw = lookup(doc, &self.path);
        if let (Some(expected), Some(text)) = (&self.raw_string, raw) {
            // A string without escapes equals the operand exactly when its text does.
            if text.starts_with('"') && !text.contains('\\') {
                return Ok((text == expected) == (self.op == Op::Eq));
            }
        }
        let found: Option<Value> = match raw {
            None => None,
            Some(raw) => serde_json::from_str::<Value>(raw).map_err(|e| format!("field `{}`: {e}", self.path.join(".")))?.into(),
        };
        let found = found.as_ref().filter(|v| !v.is_null());
        Ok(match (self.op, found) {
            (Op::Exists, found) => found.is_some(),
            (Op::Missing, found) => found.is_none(),
            (_, None) => false,
            (Op::Eq, Some(v)) => same(v, &self.value),
            (Op::Ne, Some(v)) => !same(v, &self.value),
            (Op::Gt, Some(v)) => order(v, &self.value).is_some_and(|o| o.is_gt()),
            (Op::Gte, Some(v)) => order(v, &self.value).is_some_and(|o| o.is_ge()),
            (Op::Lt, Some(v)) => order(v, &self.value).is_some_and(|o| o.is_lt()),
            (Op::Lte, Some(v)) => order(v, &self.value).is_some_and(|o| o.is_le()),
            (Op::In, Some(v)) => self.value.as_array().is_some_and(|xs| xs.iter().any(|x| same(v, x))),
            (Op::Contains, Some(Value::String(s))) => self.value.as_str().is_some_and(|x| s.contains(x)),
            (Op::Contains, Some(Value::Array(items))) => items.iter().any(|x| same(x, &self.value)),
            (Op::Contains, Some(_)) => false,
        })
    }
}

/// JSON equality where numbers compare by value (`1 == 1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl JsonFilter {
    fn handle<'a>(&self, record: &Record<'a>, out: &mut Output, members: &mut Members<'a>, buf: &mut Vec<u8>) -> Result<(), Error> {
        let Some(value) = record.value() else {
            return self.invalid(record, out, "value is null".to_string());
        };
        if let Err(reason) = members.parse(value) {
            return self.invalid(record, out, reason);
        }
        for predicate in &self.predicates {
            match predicate.matches(members) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(reason) => return self.invalid(record, out, reason),
            }
        }
        match &self.select {
            None => out.forward(record, None),
            Some(selection) => {
                buf.clear();
                write_selected(members, selection, buf);
                out.forward(record, Some(Some(buf)))
            }
        }
    }

    fn invalid(&self, record: &Record<'_>, out: &mut Output, reason: String) -> Result<(), Error> {
        if self.on_invalid == OnInvalid::Reject {
            out.reject(record.index(), reason);
        }
        Ok(())
    }
}

/// Write the selected members of `object` as a JSON object, copying their raw text.
/// A nested selection whose parent is not an object, or that finds nothing, is left out.
fn write_selected(object: &Members<'_>, selection: &[Selection], out: &mut Vec<u8>) -> bool {
    out.push(b'{');
    let mut wrote = false;
    for s in selection {
        let Some(raw) = object.get(&s.name) else { continue };
        let mark = out.len();
        if wrote {
            out.push(b',');
        }
        out.extend_from_slice(s.key_json.as_bytes());
        out.push(b':');
        let kept = if s.children.is_empty() {
            out.extend_from_slice(raw.as_bytes());
            true
        } else {
            let mut inner = Members::new();
            match inner.parse(raw.as_bytes()) {
                Ok(()) => write_selected(&inner, &s.children, out),
                Err(_) => false,
            }
        };
        if kept {
            wrote = true;
        } else {
            out.truncate(mark);
        }
    }
    out.push(b'}');
    wrote
}

/// Build the selection tree from dotted paths, keeping first-mention order.
fn selection_tree(paths: &[String]) -> Vec<Selection> {
    let mut tree: Vec<Selection> = Vec::new();
    for path in paths {
        let mut level = &mut tree;
        for segment in path.split('.') {
            let at = match level.iter().position(|s| s.name == segment) {
                Some(at) => at,
                None => {
                    level.push(Selection { name: segment.to_string(), key_json: serde_json::to_string(segment).expect("a string serializes"), children: Vec::new() });
                    level.len() - 1
                }
            };
            level = &mut level[at].children;
        }
    }
    tree
}

impl Transform for JsonFilter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        let predicates = config.predicates.into_iter().enumerate().map(|(i, p)| Predicate::new(i, p)).collect::<Result<_, _>>()?;
        if let Some(fields) = &config.select {
            if let Some(bad) = fields.iter().find(|f| f.is_empty() || f.split('.').any(str::is_empty)) {
                return Err(Error::config(format!("select: `{bad}` is not a field path like `a` or `a.b`")));
            }
        }
        Ok(Self { predicates, select: config.select.as_deref().map(selection_tree), on_invalid: config.on_invalid })
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        let (mut members, mut buf) = (Members::new(), Vec::new());
        for record in batch.records() {
            self.handle(&record, out, &mut members, &mut buf)?;
        }
        Ok(())
    }
}

sluice_sdk::export_transform!(JsonFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_sdk::testing::TransformHarness;

    fn run(config: Value, values: &[&str]) -> sluice_sdk::testing::TestOutput {
        TransformHarness::<JsonFilter>::new(config).unwrap().push_values(values).unwrap()
    }

    #[test]
    fn predicates_all_must_hold() {
        let out = run(
            json!({"where": [{"field": "n", "op": "gt", "value": 1}, {"field": "c", "op": "eq", "value": "KR"}]}),
            &[r#"{"n": 2, "c": "KR"}"#, r#"{"n": 1, "c": "KR"}"#, r#"{"n": 5, "c": "US"}"#, r#"{"n": 2.5, "c": "KR"}"#],
        );
        assert_eq!(out.values(), vec![r#"{"n": 2, "c": "KR"}"#, r#"{"n": 2.5, "c": "KR"}"#]);
    }

    #[test]
    fn missing_and_null_fields_never_compare_true_even_for_ne() {
        let out = run(json!({"where": [{"field": "x", "op": "ne", "value": 1}]}), &[r#"{"x": 2}"#, r#"{}"#, r#"{"x": null}"#]);
        assert_eq!(out.values(), vec![r#"{"x": 2}"#]);
        let out = run(json!({"where": [{"field": "x", "op": "missing"}]}), &[r#"{"x": 2}"#, r#"{}"#, r#"{"x": null}"#]);
        assert_eq!(out.values(), vec![r#"{}"#, r#"{"x": null}"#]);
    }

    #[test]
    fn numbers_compare_by_value_and_mixed_types_never_order() {
        let out = run(json!({"where": [{"field": "x", "op": "eq", "value": 1}]}), &[r#"{"x": 1.0}"#, r#"{"x": "1"}"#]);
        assert_eq!(out.values(), vec![r#"{"x": 1.0}"#]);
        let out = run(json!({"where": [{"field": "x", "op": "lt", "value": 10}]}), &[r#"{"x": "5"}"#, r#"{"x": 9.99}"#]);
        assert_eq!(out.values(), vec![r#"{"x": 9.99}"#]);
        let big = i64::MAX;
        let out = run(json!({"where": [{"field": "x", "op": "gte", "value": big}]}), &[&format!(r#"{{"x": {big}}}"#), &format!(r#"{{"x": {}}}"#, big - 1)]);
        assert_eq!(out.values().len(), 1, "large integers must not lose precision through f64");
    }

    #[test]
    fn string_equality_sees_through_escapes() {
        let out = run(json!({"where": [{"field": "c", "op": "eq", "value": "KR"}]}), &[r#"{"c": "K\u0052"}"#, r#"{"c": "KR"}"#, r#"{"c": "KRX"}"#]);
        assert_eq!(out.values(), vec![r#"{"c": "K\u0052"}"#, r#"{"c": "KR"}"#]);
        let out = run(json!({"where": [{"field": "c", "op": "ne", "value": "KR"}]}), &[r#"{"c": "K\u0052"}"#, r#"{"c": "US"}"#, r#"{"c": null}"#]);
        assert_eq!(out.values(), vec![r#"{"c": "US"}"#]);
    }

    #[test]
    fn in_and_contains() {
        let out = run(json!({"where": [{"field": "c", "op": "in", "value": ["a", "b"]}]}), &[r#"{"c": "a"}"#, r#"{"c": "z"}"#]);
        assert_eq!(out.values(), vec![r#"{"c": "a"}"#]);
        let out = run(json!({"where": [{"field": "t", "op": "contains", "value": "x"}]}), &[r#"{"t": "axb"}"#, r#"{"t": ["x"]}"#, r#"{"t": ["y"]}"#, r#"{"t": 5}"#]);
        assert_eq!(out.values(), vec![r#"{"t": "axb"}"#, r#"{"t": ["x"]}"#]);
    }

    #[test]
    fn select_projects_nested_fields_and_skips_absent_ones() {
        let out = run(json!({"select": ["id", "geo.city", "nope"]}), &[r#"{"id": 7, "geo": {"city": "Seoul", "zip": "1"}, "x": 1}"#]);
        assert_eq!(out.values(), vec![r#"{"id":7,"geo":{"city":"Seoul"}}"#], "fields in select order, nesting kept");
    }

    #[test]
    fn invalid_values_are_rejected_with_a_reason_and_others_continue() {
        let out = run(json!({}), &["{\"ok\":1}", "not json", "[1,2]", "", "{\"a\":", "\u{FEFF}{}"]);
        assert_eq!(out.values(), vec!["{\"ok\":1}"]);
        let rows: Vec<u32> = out.record_errors.iter().map(|e| e.row).collect();
        assert_eq!(rows, vec![1, 2, 3, 4, 5]);
        assert!(out.record_errors[0].reason.contains("invalid JSON"), "{:?}", out.record_errors[0]);
        assert!(out.record_errors[1].reason.contains("not an object: an array"), "{:?}", out.record_errors[1]);
        assert!(out.record_errors[3].reason.contains("truncated JSON"), "{:?}", out.record_errors[3]);
        let out = run(json!({"on_invalid": "drop"}), &["nope", "{}"]);
        assert!(out.record_errors.is_empty());
        assert_eq!(out.values(), vec!["{}"]);
    }

    #[test]
    fn invalid_utf8_and_null_values_are_rejected() {
        let mut h = TransformHarness::<JsonFilter>::new(json!({})).unwrap();
        let out = h.push_values(&[&b"{\"a\":\"\xff\"}"[..]]).unwrap();
        assert_eq!(out.record_errors.len(), 1);
        assert!(out.record_errors[0].reason.contains("invalid JSON"), "{:?}", out.record_errors);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let err = |c: Value| TransformHarness::<JsonFilter>::new(c).err().expect("must fail").to_string();
        assert!(err(json!({"wher": []})).contains("unknown field `wher`"));
        assert!(err(json!({"where": [{"field": "a", "op": "gt"}]})).contains("needs a `value`"));
        assert!(err(json!({"where": [{"field": "a", "op": "exists", "value": 1}]})).contains("takes no `value`"));
        assert!(err(json!({"where": [{"field": "a", "op": "in", "value": 1}]})).contains("needs a list"));
        assert!(err(json!({"where": [{"field": "a", "op": "like", "value": 1}]})).contains("unknown variant `like`"));
        assert!(err(json!({"select": ["a..b"]})).contains("not a field path"));
    }
}
