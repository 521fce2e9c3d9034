//! `ad-clicks`: the seed's sliding-window ad-click aggregation.
//!
//! Input values are JSON objects such as
//! `{"campaign_id": "c-7", "user_id": "u-123", "cost": 0.25, "timestamp": 1700000000000}`
//! (`timestamp` is event time in epoch milliseconds). Per `campaign_id` and window it
//! outputs `clicks` (count), `total_cost` (sum of `cost`) and `unique_users` (exact count
//! of distinct `user_id`), in append mode by default: a window is emitted once, when the
//! watermark (newest event time − `watermark_delay_ms`) passes its end.
//!
//! Configuration (all optional, defaults shown):
//!
//! ```json
//! {"window_ms": 60000, "slide_ms": 10000, "watermark_delay_ms": 60000,
//!  "output_mode": "append", "late_policy": "drop", "avg_cost": false}
//! ```
//!
//! `avg_cost: true` adds an `avg_cost` column (`total_cost / clicks`).
//!
//! Records that are not valid click events are rejected with the reason (dead letters).

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_sdk::collections::HashSet;
use sluice_sdk::arrow_schema::{DataType, Field, Schema, SchemaRef};
use sluice_sdk::window::{Admission, LatePolicy, OutputMode, WindowSpec, Windowed};
use sluice_sdk::{Aggregate, Batch, Context, Error, Output};

/// The plugin's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Window length in milliseconds.
    pub window_ms: i64,
    /// Distance between window starts in milliseconds.
    pub slide_ms: i64,
    /// How far the watermark trails the newest event time, in milliseconds.
    pub watermark_delay_ms: i64,
    /// `append` (default) or `update`.
    pub output_mode: OutputMode,
    /// `drop` (default: drop and count) or `reject` (dead-letter late events).
    pub late_policy: LatePolicy,
    /// Add an `avg_cost` column (`total_cost / clicks`).
    pub avg_cost: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            slide_ms: 10_000,
            watermark_delay_ms: 60_000,
            output_mode: OutputMode::Append,
            late_policy: LatePolicy::Drop,
            avg_cost: false,
        }
    }
}

/// One click event as it arrives.
#[derive(Debug, Deserialize)]
struct Click<'a> {
    #[serde(borrow)]
    campaign_id: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    cost: f64,
    timestamp: i64,
}

/// Running totals of one campaign in one window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    clicks: u64,
    total_cost: f64,
    users: HashSet<String>,
}

impl Totals {
    /// Clicks counted.
    pub fn clicks(&self) -> u64 {
        self.clicks
    }

    /// Sum of their `cost`.
    pub fn total_cost(&self) -> f64 {
        self.total_cost
    }

    /// Distinct `user_id`s among them.
    pub fn unique_users(&self) -> u64 {
        self.users.len() as u64
    }
}

/// One output row.
#[derive(Debug, Serialize)]
struct Row<'a> {
    window_start: i64,
    window_end: i64,
    campaign_id: &'a str,
    clicks: u64,
    total_cost: f64,
    unique_users: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg_cost: Option<f64>,
}

/// The aggregate.
pub struct AdClicks {
    late_policy: LatePolicy,
    avg_cost: bool,
    windows: Windowed<String, Totals>,
}

impl Aggregate for AdClicks {
    type Config = Config;
    type State = Windowed<String, Totals>;
    const STATE_VERSION: u32 = 1;

    fn output_schema(config: &Config) -> SchemaRef {
        let mut fields = vec![
            Field::new("window_start", DataType::Int64, false),
            Field::new("window_end", DataType::Int64, false),
            Field::new("campaign_id", DataType::Utf8, false),
            Field::new("clicks", DataType::Int64, false),
            Field::new("total_cost", DataType::Float64, false),
            Field::new("unique_users", DataType::Int64, false),
        ];
        if config.avg_cost {
            fields.push(Field::new("avg_cost", DataType::Float64, false));
        }
        Arc::new(Schema::new(fields))
    }

    fn new(config: Config) -> Result<Self, Error> {
        let spec = WindowSpec::sliding(config.window_ms, config.slide_ms)?;
        Ok(Self {
            late_policy: config.late_policy,
            avg_cost: config.avg_cost,
            windows: Windowed::new(spec, config.watermark_delay_ms, config.output_mode)?,
        })
    }

    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error> {
        let mut late = 0;
        for record in batch.records() {
            let Some(value) = record.value() else {
                out.reject(record.index(), "value is null");
                continue;
            };
            match self.add_json(value) {
                Ok((_, Admission::Accepted)) => {}
                Ok((_, Admission::Late)) if self.late_policy == LatePolicy::Drop => late += 1,
                Ok((event_time, Admission::Late)) => {
                    let watermark = self.windows.watermark().unwrap_or(i64::MIN);
                    out.reject(record.index(), format!("late: event time {event_time} is behind the watermark {watermark} for all of its windows"));
                }
                Err(reason) => out.reject(record.index(), reason),
            }
        }
        out.add_late(late);
        let mut result = Ok(());
        let avg_cost = self.avg_cost;
        self.windows.finish_batch(ctx.watermark_ms, |window, campaign, t| {
            if result.is_ok() {
                result = out.push_row(&Row {
                    window_start: window.start,
                    window_end: window.end,
                    campaign_id: campaign,
                    clicks: t.clicks,
                    total_cost: t.total_cost,
                    unique_users: t.users.len() as u64,
                    avg_cost: avg_cost.then(|| t.total_cost / t.clicks as f64),
                });
            }
        });
        out.set_watermark(self.windows.watermark());
        result
    }

    fn state(&self) -> &Self::State {
        &self.windows
    }

    fn set_state(&mut self, state: Self::State) {
        self.windows = state;
    }
}

impl AdClicks {
    /// Count one event, a JSON click (the plugin's per-record work, usable natively): its
    /// event time and whether a window took it, or why the value is not a valid click.
    pub fn add_json(&mut self, value: &[u8]) -> Result<(i64, Admission), String> {
        let click: Click = sluice_sdk::json::parse(value)?;
        if !click.cost.is_finite() {
            return Err(format!("cost must be a finite number, got {}", click.cost));
        }
        let user = click.user_id.as_ref();
        let admission = self.windows.add(click.timestamp, click.campaign_id.as_ref(), |t| {
            t.clicks += 1;
            t.total_cost += click.cost;
            if !t.users.contains(user) {
                t.users.insert(user.to_owned());
            }
        });
        Ok((click.timestamp, admission))
    }

    /// Move the watermark (at least to `floor_ms`) and hand each window that closed to
    /// `emit`: the window, the campaign and its totals.
    pub fn close_windows(&mut self, floor_ms: Option<i64>, emit: impl FnMut(sluice_sdk::window::Window, &String, &Totals)) {
        self.windows.finish_batch(floor_ms, emit);
    }
}

#[cfg(feature = "export")]
sluice_sdk::export_aggregate!(AdClicks);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_sdk::testing::AggregateHarness;

    fn click(c: &str, u: &str, cost: f64, ts: i64) -> String {
        json!({"campaign_id": c, "user_id": u, "cost": cost, "timestamp": ts}).to_string()
    }

    #[test]
    fn counts_sums_and_distinct_users_per_window() {
        let mut h = AggregateHarness::<AdClicks>::new(json!({"window_ms": 10, "slide_ms": 10, "watermark_delay_ms": 0})).unwrap();
        let out = h.push_values(&[click("a", "u1", 1.0, 1), click("a", "u1", 2.0, 2), click("a", "u2", 0.5, 3), click("b", "u1", 1.0, 4)]).unwrap();
        assert!(out.rows.is_empty(), "nothing is final before the watermark passes 10");
        let out = h.push_values(&[click("a", "u3", 1.0, 25)]).unwrap();
        assert_eq!(
            serde_json::to_value(&out.rows).unwrap(),
            json!([
                {"window_start": 0, "window_end": 10, "campaign_id": "a", "clicks": 3, "total_cost": 3.5, "unique_users": 2},
                {"window_start": 0, "window_end": 10, "campaign_id": "b", "clicks": 1, "total_cost": 1.0, "unique_users": 1},
            ])
        );
        let out = h.flush().unwrap();
        assert_eq!(out.rows.len(), 1);
        assert_eq!(out.rows[0]["window_start"], json!(20));
    }

    #[test]
    fn avg_cost_adds_a_column() {
        let mut h = AggregateHarness::<AdClicks>::new(json!({"window_ms": 10, "slide_ms": 10, "watermark_delay_ms": 0, "avg_cost": true})).unwrap();
        h.push_values(&[click("a", "u1", 1.0, 1), click("a", "u2", 2.0, 2)]).unwrap();
        let out = h.flush().unwrap();
        assert_eq!(out.rows[0]["avg_cost"], json!(1.5));
        assert_eq!(out.rows[0].len(), 7, "{:?}", out.rows[0]);
    }

    #[test]
    fn bad_events_are_rejected_and_late_ones_counted() {
        let mut h = AggregateHarness::<AdClicks>::new(json!({"window_ms": 10, "slide_ms": 10, "watermark_delay_ms": 0})).unwrap();
        h.push_values(&[click("a", "u", 1.0, 100)]).unwrap();
        let out = h
            .push_values(&[
                click("a", "u", 1.0, 5),
                r#"{"campaign_id": "a", "user_id": "u", "cost": 1}"#.to_string(),
                r#"{"campaign_id": 5, "user_id": "u", "cost": 1, "timestamp": 1}"#.to_string(),
                "{".to_string(),
            ])
            .unwrap();
        assert_eq!(out.late_records, 1);
        let rows: Vec<u32> = out.record_errors.iter().map(|e| e.row).collect();
        assert_eq!(rows, vec![1, 2, 3]);
        assert!(out.record_errors[0].reason.contains("missing field `timestamp`"), "{:?}", out.record_errors);
    }

    #[test]
    fn snapshot_restore_carries_open_windows() {
        let cfg = json!({"window_ms": 10, "slide_ms": 5, "watermark_delay_ms": 0});
        let mut a = AggregateHarness::<AdClicks>::new(cfg.clone()).unwrap();
        a.push_values(&[click("a", "u1", 1.0, 7)]).unwrap();
        let state = a.snapshot().unwrap();
        let mut b = AggregateHarness::<AdClicks>::new(cfg).unwrap();
        b.restore(&state, 1).unwrap();
        b.push_values(&[click("a", "u2", 1.0, 8)]).unwrap();
        let out = b.flush().unwrap();
        let clicks: Vec<_> = out.rows.iter().map(|r| (r["window_start"].clone(), r["clicks"].clone(), r["unique_users"].clone())).collect();
        assert_eq!(clicks, vec![(json!(0), json!(2), json!(2)), (json!(5), json!(2), json!(2))]);
        let err = b.restore(&state, 7).unwrap_err();
        assert!(err.to_string().contains("state version 7"), "{err}");
        assert!(b.restore(b"garbage!", 1).is_err());
    }

    #[test]
    fn bad_config_is_explained() {
        let e = AggregateHarness::<AdClicks>::new(json!({"window_ms": 10, "slide_ms": 20})).err().unwrap();
        assert!(e.to_string().contains("must not exceed the window size"), "{e}");
        let e = AggregateHarness::<AdClicks>::new(json!({"window": 10})).err().unwrap();
        assert!(e.to_string().contains("unknown field `window`"), "{e}");
    }
}
