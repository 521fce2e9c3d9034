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
use sluice_sdk::arrow_schema::{DataType, Field, Schema, SchemaRef};
use sluice_sdk::collections::{HashMap, HashSet};
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
        Self { window_ms: 60_000, slide_ms: 10_000, watermark_delay_ms: 60_000, output_mode: OutputMode::Append, late_policy: LatePolicy::Drop, avg_cost: false }
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
    unique_users: u64,
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
        self.unique_users
    }
}

/// The open windows that have counted one user of one campaign: window indices (window
/// start / slide) as bits of 64-window words, `(index div 64, bits)`. An event's windows
/// are a few neighbouring indices, so this is usually one word.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Seen(Vec<(i64, u64)>);

impl Seen {
    /// Mark window `index`; true when it was not marked yet.
    fn mark(&mut self, index: i64) -> bool {
        let (word, bit) = (index.div_euclid(64), 1u64 << index.rem_euclid(64));
        match self.0.iter_mut().find(|(w, _)| *w == word) {
            Some((_, bits)) => {
                let new = *bits & bit == 0;
                *bits |= bit;
                new
            }
            None => {
                self.0.push((word, bit));
                true
            }
        }
    }

    /// Forget the windows before `index`; true when none is left.
    fn forget_before(&mut self, index: i64) -> bool {
        let (word, first_bit) = (index.div_euclid(64), index.rem_euclid(64));
        self.0.retain_mut(|(w, bits)| {
            if *w == word {
                *bits &= !0u64 << first_bit;
            }
            *w >= word && *bits != 0
        });
        self.0.is_empty()
    }
}

/// The aggregation's state: totals per window and campaign, and which windows have counted
/// each user (so that a user is looked up once per event, not once per window, and kept
/// once per campaign, not once per window).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    windows: Windowed<String, Totals>,
    /// Per campaign, per user: the open windows that counted them.
    seen: HashMap<String, HashMap<String, Seen>>,
    /// Windows before this index are closed and forgotten in `seen`.
    forgotten_before: i64,
}

/// State version 1: each window kept the set of its users.
#[derive(Debug, Deserialize)]
struct TotalsV1 {
    clicks: u64,
    total_cost: f64,
    users: HashSet<String>,
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
    state: State,
}

impl Aggregate for AdClicks {
    type Config = Config;
    type State = State;
    const STATE_VERSION: u32 = 2;

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
            state: State { windows: Windowed::new(spec, config.watermark_delay_ms, config.output_mode)?, seen: HashMap::default(), forgotten_before: i64::MIN },
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
                    let watermark = self.state.windows.watermark().unwrap_or(i64::MIN);
                    out.reject(record.index(), format!("late: event time {event_time} is behind the watermark {watermark} for all of its windows"));
                }
                Err(reason) => out.reject(record.index(), reason),
            }
        }
        out.add_late(late);
        let mut result = Ok(());
        let avg_cost = self.avg_cost;
        self.close_windows(ctx.watermark_ms, |window, campaign, t| {
            if result.is_ok() {
                result = out.push_row(&Row {
                    window_start: window.start,
                    window_end: window.end,
                    campaign_id: campaign,
                    clicks: t.clicks,
                    total_cost: t.total_cost,
                    unique_users: t.unique_users,
                    avg_cost: avg_cost.then(|| t.total_cost / t.clicks as f64),
                });
            }
        });
        out.set_watermark(self.state.windows.watermark());
        result
    }

    fn state(&self) -> &Self::State {
        &self.state
    }

    fn set_state(&mut self, state: Self::State) {
        self.state = state;
    }

    /// Version 1 kept each window's set of users; version 2 counts them and marks, per
    /// user, the windows that counted them.
    fn migrate(from_version: u32, bytes: &[u8]) -> Result<State, Error> {
        if from_version != 1 {
            return Err(Error::incompatible_state(format!("state version {from_version} is not one ad-clicks reads (1 and 2)")));
        }
        let old: Windowed<String, TotalsV1> = postcard::from_bytes(bytes).map_err(|e| Error::incompatible_state(format!("state version 1 does not read: {e}")))?;
        let slide = old.spec().slide_ms();
        let mut seen: HashMap<String, HashMap<String, Seen>> = HashMap::default();
        let windows = old.map_accumulators(|window, campaign, t| {
            let users = seen.entry(campaign.clone()).or_default();
            for user in &t.users {
                users.entry(user.clone()).or_default().mark(window.start.div_euclid(slide));
            }
            Totals { clicks: t.clicks, total_cost: t.total_cost, unique_users: t.users.len() as u64 }
        });
        Ok(State { windows, seen, forgotten_before: i64::MIN })
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
        let (campaign, user, cost) = (click.campaign_id.as_ref(), click.user_id.as_ref(), click.cost);
        let State { windows, seen, .. } = &mut self.state;
        let slide = windows.spec().slide_ms();
        // One lookup of the campaign and of the user per event; each window then takes the
        // event and, if it has not counted this user yet, one more unique user.
        let mut count = |users: &mut Seen| {
            windows.add_to_windows(click.timestamp, campaign, |window, t| {
                t.clicks += 1;
                t.total_cost += cost;
                if users.mark(window.start.div_euclid(slide)) {
                    t.unique_users += 1;
                }
            })
        };
        let mut in_campaign = |users: &mut HashMap<String, Seen>| match users.get_mut(user) {
            Some(s) => count(s),
            None => {
                let mut s = Seen::default();
                let admission = count(&mut s);
                if admission == Admission::Accepted {
                    users.insert(user.to_owned(), s);
                }
                admission
            }
        };
        let admission = match seen.get_mut(campaign) {
            Some(users) => in_campaign(users),
            None => {
                let mut users = HashMap::default();
                let admission = in_campaign(&mut users);
                if !users.is_empty() {
                    seen.insert(campaign.to_owned(), users);
                }
                admission
            }
        };
        Ok((click.timestamp, admission))
    }

    /// Move the watermark (at least to `floor_ms`) and hand each window that closed to
    /// `emit`: the window, the campaign and its totals. Users are forgotten for the windows
    /// that closed.
    pub fn close_windows(&mut self, floor_ms: Option<i64>, emit: impl FnMut(sluice_sdk::window::Window, &String, &Totals)) {
        let State { windows, seen, forgotten_before } = &mut self.state;
        windows.finish_batch(floor_ms, emit);
        let Some(watermark) = windows.watermark() else { return };
        // Window k ([k·slide, k·slide + size)) is closed once the watermark reaches its end.
        let spec = windows.spec();
        let first_open = watermark.saturating_sub(spec.size_ms()).div_euclid(spec.slide_ms()).saturating_add(1);
        if first_open > *forgotten_before {
            seen.retain(|_, users| {
                users.retain(|_, s| !s.forget_before(first_open));
                !users.is_empty()
            });
            *forgotten_before = first_open;
        }
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
        b.restore(&state, AdClicks::STATE_VERSION).unwrap();
        b.push_values(&[click("a", "u2", 1.0, 8)]).unwrap();
        let out = b.flush().unwrap();
        let clicks: Vec<_> = out.rows.iter().map(|r| (r["window_start"].clone(), r["clicks"].clone(), r["unique_users"].clone())).collect();
        assert_eq!(clicks, vec![(json!(0), json!(2), json!(2)), (json!(5), json!(2), json!(2))]);
        let err = b.restore(&state, 7).unwrap_err();
        assert!(err.to_string().contains("state version 7"), "{err}");
        assert!(b.restore(b"garbage!", AdClicks::STATE_VERSION).is_err());
    }

    #[test]
    fn state_version_1_migrates_and_goes_on_counting_as_if_never_stopped() {
        use sluice_sdk::window::Windowed;
        /// Version 1's accumulator, as it serialized.
        #[derive(Default, Serialize)]
        struct V1 {
            clicks: u64,
            total_cost: f64,
            users: std::collections::BTreeSet<String>,
        }
        let cfg = json!({"window_ms": 30, "slide_ms": 10, "watermark_delay_ms": 30});
        let first = [("a", "u1", 1.0, 7), ("a", "u2", 2.0, 12), ("b", "u1", 0.5, 25), ("a", "u1", 1.0, 26)];
        let then = [click("a", "u1", 1.0, 31), click("a", "u3", 1.0, 33), click("b", "u1", 1.0, 40)];
        // What version 1 would have saved after the first batch (no window closed yet: the
        // watermark is -4).
        let spec = WindowSpec::sliding(30, 10).unwrap();
        let mut v1: Windowed<String, V1> = Windowed::new(spec, 30, OutputMode::Append).unwrap();
        for (c, u, cost, ts) in first {
            v1.add(ts, c, |t| {
                t.clicks += 1;
                t.total_cost += cost;
                t.users.insert(u.to_string());
            });
        }
        v1.finish_batch(None, |_, _, _| panic!("nothing closes yet"));
        let bytes = postcard::to_allocvec(&v1).unwrap();

        let mut migrated = AggregateHarness::<AdClicks>::new(cfg.clone()).unwrap();
        migrated.restore(&bytes, 1).unwrap();
        let mut rows = migrated.push_values(&then).unwrap().rows;
        rows.extend(migrated.flush().unwrap().rows);
        let mut never_stopped = AggregateHarness::<AdClicks>::new(cfg).unwrap();
        never_stopped.push_values(&first.map(|(c, u, cost, ts)| click(c, u, cost, ts))).unwrap();
        let mut expected = never_stopped.push_values(&then).unwrap().rows;
        expected.extend(never_stopped.flush().unwrap().rows);
        assert_eq!(rows, expected);
        assert!(expected.iter().any(|r| r["campaign_id"] == json!("a") && r["window_start"] == json!(10) && r["unique_users"] == json!(3)), "{expected:?}");
    }

    #[test]
    fn users_are_counted_once_per_window_and_forgotten_when_their_windows_close() {
        let mut h = AggregateHarness::<AdClicks>::new(json!({"window_ms": 20, "slide_ms": 10, "watermark_delay_ms": 0})).unwrap();
        // u1 twice in [0, 20) and [10, 20); out of order; then much later again.
        let counts = |rows: &[serde_json::Map<String, serde_json::Value>]| -> Vec<(i64, u64, u64)> {
            rows.iter().map(|r| (r["window_start"].as_i64().unwrap(), r["clicks"].as_u64().unwrap(), r["unique_users"].as_u64().unwrap())).collect()
        };
        let out = h.push_values(&[click("a", "u1", 1.0, 15), click("a", "u1", 1.0, 5), click("a", "u2", 1.0, 16)]).unwrap();
        assert_eq!(counts(&out.rows), vec![(-10, 1, 1)], "closed by the watermark at 16");
        let out = h.push_values(&[click("a", "u1", 1.0, 95)]).unwrap();
        assert_eq!(counts(&out.rows), vec![(0, 3, 2), (10, 2, 2)]);
        // Only the user of the windows still open is kept.
        let state = h.snapshot().unwrap();
        let state: State = postcard::from_bytes(&state).unwrap();
        assert_eq!(state.seen["a"].keys().collect::<Vec<_>>(), ["u1"]);
        assert_eq!(state.seen["a"]["u1"], Seen(vec![(0, (1 << 8) | (1 << 9))]), "windows 80 and 90");
        let out = h.flush().unwrap();
        assert_eq!(out.rows.iter().map(|r| r["unique_users"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn window_marks_span_words() {
        let mut s = Seen::default();
        assert!(s.mark(63) && s.mark(64) && s.mark(-1) && !s.mark(64));
        assert!(!s.forget_before(64));
        assert_eq!(s, Seen(vec![(1, 1)]));
        assert!(s.forget_before(65));
    }

    #[test]
    fn bad_config_is_explained() {
        let e = AggregateHarness::<AdClicks>::new(json!({"window_ms": 10, "slide_ms": 20})).err().unwrap();
        assert!(e.to_string().contains("must not exceed the window size"), "{e}");
        let e = AggregateHarness::<AdClicks>::new(json!({"window": 10})).err().unwrap();
        assert!(e.to_string().contains("unknown field `window`"), "{e}");
    }
}
