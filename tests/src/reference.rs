//! Independent, brute-force computations of what the example plugins must output. They
//! share no code with the plugins or the SDK.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// One output row of the ad-click aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    /// Window start, epoch ms.
    pub window_start: i64,
    /// Window end, epoch ms.
    pub window_end: i64,
    /// Campaign.
    pub campaign_id: String,
    /// Number of clicks.
    pub clicks: i64,
    /// Sum of cost, added in arrival order.
    pub total_cost: f64,
    /// Distinct users.
    pub unique_users: i64,
}

impl WindowRow {
    /// Read a row from the plugin's JSON output.
    pub fn from_json(v: &Value) -> Self {
        Self {
            window_start: v["window_start"].as_i64().expect("window_start"),
            window_end: v["window_end"].as_i64().expect("window_end"),
            campaign_id: v["campaign_id"].as_str().expect("campaign_id").to_string(),
            clicks: v["clicks"].as_i64().expect("clicks"),
            total_cost: v["total_cost"].as_f64().expect("total_cost"),
            unique_users: v["unique_users"].as_i64().expect("unique_users"),
        }
    }
}

/// Parameters of the aggregation.
#[derive(Debug, Clone, Copy)]
pub struct AdClicksParams {
    /// Window length.
    pub window_ms: i64,
    /// Slide.
    pub slide_ms: i64,
    /// Watermark delay.
    pub delay_ms: i64,
}

impl Default for AdClicksParams {
    fn default() -> Self {
        Self { window_ms: 60_000, slide_ms: 10_000, delay_ms: 60_000 }
    }
}

struct Event<'a> {
    campaign: &'a str,
    user: &'a str,
    cost: f64,
    ts: i64,
}

fn event(v: &Value) -> Option<Event<'_>> {
    Some(Event { campaign: v.get("campaign_id")?.as_str()?, user: v.get("user_id")?.as_str()?, cost: v.get("cost")?.as_f64()?, ts: v.get("timestamp")?.as_i64()? })
}

/// The windows (all of them, as after a final flush) that the seed's aggregation outputs
/// for `events` in arrival order, fed in batches of `batch_size` (`None`: one batch).
///
/// Watermark semantics: before batch k the watermark is (max event time of all earlier
/// batches) − delay; an event counts in a window only if the window's end is after that
/// watermark. Values that are not valid click events are skipped.
pub fn ad_clicks(events: &[Value], params: AdClicksParams, batch_size: Option<usize>) -> Vec<WindowRow> {
    let batch_size = batch_size.unwrap_or(usize::MAX).max(1);
    let mut windows: BTreeMap<(i64, &str), Acc> = BTreeMap::new();
    let mut max_seen: Option<i64> = None;
    for batch in events.chunks(batch_size.min(events.len().max(1))) {
        let watermark = max_seen.map(|m| m - params.delay_ms);
        for e in batch.iter().filter_map(event) {
            max_seen = Some(max_seen.map_or(e.ts, |m| m.max(e.ts)));
            // Every window start s with s <= ts < s + window, s a multiple of slide.
            let mut start = e.ts - e.ts.rem_euclid(params.slide_ms);
            while start > e.ts - params.window_ms {
                let end = start + params.window_ms;
                if watermark.is_none_or(|wm| end > wm) {
                    windows.entry((start, e.campaign)).or_default().add(&e);
                }
                start -= params.slide_ms;
            }
        }
    }
    rows(windows, params)
}

/// One window's running totals in a reference computation.
#[derive(Default)]
struct Acc<'a> {
    clicks: i64,
    cost: f64,
    users: BTreeSet<&'a str>,
}

impl<'a> Acc<'a> {
    fn add(&mut self, e: &Event<'a>) {
        self.clicks += 1;
        self.cost += e.cost;
        self.users.insert(e.user);
    }
}

/// Totals per (window start, campaign) as output rows, in key order.
fn rows(windows: BTreeMap<(i64, &str), Acc<'_>>, params: AdClicksParams) -> Vec<WindowRow> {
    windows
        .into_iter()
        .map(|((start, campaign), acc)| WindowRow {
            window_start: start,
            window_end: start + params.window_ms,
            campaign_id: campaign.to_string(),
            clicks: acc.clicks,
            total_cost: acc.cost,
            unique_users: acc.users.len() as i64,
        })
        .collect()
}

/// The seed's query as a batch computation over every event, the way Spark's batch
/// result computes it: per window (`slide`-aligned starts, `window` long) and campaign,
/// clicks, total cost and distinct users, for every window that has events. With
/// `closed_only`, only the windows a streaming run has closed once all events are read:
/// those ending at or before the final watermark, max event time − delay. (No event is
/// late when events are at most `delay` out of order, so the streaming result is exactly
/// this.) Values that are not click events are skipped.
pub fn windows_of_all(events: &[Value], params: AdClicksParams, closed_only: bool) -> Vec<WindowRow> {
    let clicks: Vec<Event> = events.iter().filter_map(event).collect();
    let Some(max_ts) = clicks.iter().map(|e| e.ts).max() else { return Vec::new() };
    let watermark = max_ts - params.delay_ms;
    let mut windows: BTreeMap<(i64, &str), Acc> = BTreeMap::new();
    for e in &clicks {
        let first = (e.ts - params.window_ms).div_euclid(params.slide_ms) * params.slide_ms + params.slide_ms;
        for start in (first..=e.ts).step_by(params.slide_ms as usize) {
            windows.entry((start, e.campaign)).or_default().add(e);
        }
    }
    windows.retain(|(start, _), _| !closed_only || start + params.window_ms <= watermark);
    rows(windows, params)
}

/// How `actual` window rows differ from `expected` (both any order): rows missing, rows
/// with other values, and rows there more than once. Costs are equal within 1e-9
/// (relative), as sums of the same numbers in another order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowDiff {
    /// Expected windows not in `actual`.
    pub lost: usize,
    /// Windows in both with other clicks, cost or users, or windows not expected at all.
    pub wrong: usize,
    /// Windows in `actual` more than once.
    pub duplicated: usize,
}

impl WindowDiff {
    /// Whether nothing differs.
    pub fn is_exact(&self) -> bool {
        *self == Self::default()
    }
}

/// Compare window rows (see [`WindowDiff`]).
pub fn compare_windows(expected: &[WindowRow], actual: &[WindowRow]) -> WindowDiff {
    let key = |r: &WindowRow| (r.window_start, r.window_end, r.campaign_id.clone());
    let mut seen: BTreeMap<(i64, i64, String), Vec<&WindowRow>> = BTreeMap::new();
    for r in actual {
        seen.entry(key(r)).or_default().push(r);
    }
    let mut diff = WindowDiff::default();
    let same = |a: &WindowRow, b: &WindowRow| a.clicks == b.clicks && a.unique_users == b.unique_users && (a.total_cost - b.total_cost).abs() <= 1e-9 * a.total_cost.abs().max(1.0);
    for e in expected {
        match seen.remove(&key(e)) {
            None => diff.lost += 1,
            Some(rows) => {
                diff.duplicated += rows.len() - 1;
                if !same(e, rows[0]) {
                    diff.wrong += 1;
                }
            }
        }
    }
    diff.wrong += seen.len();
    diff
}
