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
    Some(Event {
        campaign: v.get("campaign_id")?.as_str()?,
        user: v.get("user_id")?.as_str()?,
        cost: v.get("cost")?.as_f64()?,
        ts: v.get("timestamp")?.as_i64()?,
    })
}

/// The windows (all of them, as after a final flush) that the seed's aggregation outputs
/// for `events` in arrival order, fed in batches of `batch_size` (`None`: one batch).
///
/// Watermark semantics: before batch k the watermark is (max event time of all earlier
/// batches) − delay; an event counts in a window only if the window's end is after that
/// watermark. Values that are not valid click events are skipped.
pub fn ad_clicks(events: &[Value], params: AdClicksParams, batch_size: Option<usize>) -> Vec<WindowRow> {
    let batch_size = batch_size.unwrap_or(usize::MAX).max(1);
    #[derive(Default)]
    struct Acc<'a> {
        clicks: i64,
        cost: f64,
        users: BTreeSet<&'a str>,
    }
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
                    let acc = windows.entry((start, e.campaign)).or_default();
                    acc.clicks += 1;
                    acc.cost += e.cost;
                    acc.users.insert(e.user);
                }
                start -= params.slide_ms;
            }
        }
    }
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
