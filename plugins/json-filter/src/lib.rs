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
//! * `on_invalid`: what to do with a value that is not a JSON object: `reject` (default:
//!   dead-letter it with the reason) or `drop` (skip it silently).

use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_sdk::{json, Batch, Context, Error, Output, Record, Transform};

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
    field: String,
    op: Op,
    value: Value,
}

/// The transform.
pub struct JsonFilter {
    predicates: Vec<Predicate>,
    select: Option<Vec<String>>,
    on_invalid: OnInvalid,
}

impl Predicate {
    fn new(i: usize, p: PredicateConfig) -> Result<Self, Error> {
        let needs_value = !matches!(p.op, Op::Exists | Op::Missing);
        let value = match (needs_value, p.value) {
            (true, None) => {
                return Err(Error::config(format!(
                    "where[{i}] (field `{}`): op `{:?}` needs a `value`",
                    p.field,
                    p.op
                )))
            }
            (false, Some(_)) => {
                return Err(Error::config(format!(
                    "where[{i}] (field `{}`): op `{:?}` takes no `value`; remove it",
                    p.field, p.op
                )))
            }
            (_, v) => v.unwrap_or(Value::Null),
        };
        if p.op == Op::In && !value.is_array() {
            return Err(Error::config(format!(
                "where[{i}] (field `{}`): op `in` needs a list as `value`, got {value}",
                p.field
            )));
        }
        if p.field.is_empty() {
            return Err(Error::config(format!("where[{i}]: `field` must not be empty")));
        }
        Ok(Self { field: p.field, op: p.op, value })
    }

    fn matches(&self, doc: &Value) -> bool {
        let found = json::lookup(doc, &self.field).filter(|v| !v.is_null());
        match (self.op, found) {
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
        }
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
    fn handle(&self, record: &Record<'_>, out: &mut Output) -> Result<(), Error> {
        let doc: Value = match record.json() {
            Ok(doc @ Value::Object(_)) => doc,
            Ok(other) => return self.invalid(record, out, format!("value is JSON but not an object: {}", kind(&other))),
            Err(reason) => return self.invalid(record, out, reason),
        };
        if !self.predicates.iter().all(|p| p.matches(&doc)) {
            return Ok(());
        }
        match &self.select {
            None => out.forward(record, None),
            Some(fields) => {
                let mut projected = Map::new();
                for field in fields {
                    if let Some(v) = json::lookup(&doc, field) {
                        json::insert_path(&mut projected, field, v.clone());
                    }
                }
                let bytes = serde_json::to_vec(&projected).expect("a JSON map always serializes");
                out.forward(record, Some(Some(&bytes)))
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

impl Transform for JsonFilter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        let predicates = config
            .predicates
            .into_iter()
            .enumerate()
            .map(|(i, p)| Predicate::new(i, p))
            .collect::<Result<_, _>>()?;
        if let Some(fields) = &config.select {
            if let Some(bad) = fields.iter().find(|f| f.is_empty() || f.split('.').any(str::is_empty)) {
                return Err(Error::config(format!("select: `{bad}` is not a field path like `a` or `a.b`")));
            }
        }
        Ok(Self { predicates, select: config.select, on_invalid: config.on_invalid })
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        for record in batch.records() {
            self.handle(&record, out)?;
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
    fn in_and_contains() {
        let out = run(json!({"where": [{"field": "c", "op": "in", "value": ["a", "b"]}]}), &[r#"{"c": "a"}"#, r#"{"c": "z"}"#]);
        assert_eq!(out.values(), vec![r#"{"c": "a"}"#]);
        let out = run(
            json!({"where": [{"field": "t", "op": "contains", "value": "x"}]}),
            &[r#"{"t": "axb"}"#, r#"{"t": ["x"]}"#, r#"{"t": ["y"]}"#, r#"{"t": 5}"#],
        );
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
