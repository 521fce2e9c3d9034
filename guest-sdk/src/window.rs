//! Event-time windowing: tumbling and sliding windows, a watermark, a late-data policy and
//! the append and update output modes, with state that serializes for checkpoints.
//!
//! Semantics follow Spark Structured Streaming:
//! * A window is `[start, end)`; sliding windows start at multiples of the slide, so an
//!   event belongs to `size / slide` windows.
//! * The watermark is `max event time seen − delay`. It moves at the end of a batch and
//!   never goes back; the host can raise it (see [`Context::watermark_ms`](crate::Context)).
//! * An event is late for a window when the watermark before its batch has reached the
//!   window's end. It is added to the windows that are still open; an event late for all of
//!   its windows is dropped and counted (or rejected, with [`LatePolicy::Reject`]).
//! * Append mode emits a window once, when the watermark passes its end. Update mode emits
//!   every window that changed in the batch, and forgets a window once the watermark
//!   passes its end.
//!
//! A complete aggregate: clicks per page in 1-minute tumbling windows (the README's example).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sluice_sdk::arrow_schema::{DataType, Field, Schema, SchemaRef};
//! use sluice_sdk::window::{OutputMode, WindowSpec, Windowed};
//! use sluice_sdk::{Aggregate, Batch, Context, Error, NoConfig, Output};
//! use std::sync::Arc;
//!
//! #[derive(Deserialize)]
//! struct Click { page: String, timestamp: i64 }
//!
//! #[derive(Serialize)]
//! struct Row<'a> { window_start: i64, page: &'a str, clicks: i64 }
//!
//! pub struct ClicksPerPage { windows: Windowed<String, i64> }
//!
//! impl Aggregate for ClicksPerPage {
//!     type Config = NoConfig;
//!     type State = Windowed<String, i64>;
//!
//!     fn output_schema(_: &NoConfig) -> SchemaRef {
//!         let column = |name, t| Field::new(name, t, false);
//!         Arc::new(Schema::new(vec![column("window_start", DataType::Int64), column("page", DataType::Utf8), column("clicks", DataType::Int64)]))
//!     }
//!
//!     fn new(_: NoConfig) -> Result<Self, Error> {
//!         Ok(Self { windows: Windowed::new(WindowSpec::tumbling(60_000)?, 10_000, OutputMode::Append)? })
//!     }
//!
//!     fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error> {
//!         for record in batch.records() {
//!             match record.json::<Click>() {
//!                 Ok(click) => drop(self.windows.add(click.timestamp, click.page.as_str(), |n| *n += 1)),
//!                 Err(reason) => out.reject(record.index(), reason),
//!             }
//!         }
//!         let mut rows = Vec::new();
//!         self.windows.finish_batch(ctx.watermark_ms, |w, page, n| rows.push((w.start, page.clone(), *n)));
//!         for (window_start, page, clicks) in &rows {
//!             out.push_row(&Row { window_start: *window_start, page, clicks: *clicks })?;
//!         }
//!         out.set_watermark(self.windows.watermark());
//!         Ok(())
//!     }
//!
//!     fn state(&self) -> &Self::State { &self.windows }
//!     fn set_state(&mut self, state: Self::State) { self.windows = state; }
//! }
//!
//! sluice_sdk::export_aggregate!(ClicksPerPage);
//!
//! // The window [0, 60 s) closes once an event at 70 s moves the watermark past its end.
//! let mut plugin = sluice_sdk::testing::AggregateHarness::<ClicksPerPage>::new(serde_json::json!({})).unwrap();
//! plugin.push_values(&[r#"{"page":"/a","timestamp":1000}"#, r#"{"page":"/a","timestamp":2000}"#]).unwrap();
//! let out = plugin.push_values(&[r#"{"page":"/b","timestamp":70000}"#]).unwrap();
//! assert_eq!(out.rows.len(), 1);
//! assert_eq!(serde_json::Value::Object(out.rows[0].clone()), serde_json::json!({"window_start": 0, "page": "/a", "clicks": 2}));
//! ```

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::collections::HashMap;
use crate::Error;

/// A window `[start, end)` in epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    /// Inclusive start.
    pub start: i64,
    /// Exclusive end.
    pub end: i64,
}

/// How windows are laid out on the time axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    size_ms: i64,
    slide_ms: i64,
}

impl WindowSpec {
    /// Non-overlapping windows of `size_ms`.
    pub fn tumbling(size_ms: i64) -> Result<Self, Error> {
        Self::sliding(size_ms, size_ms)
    }

    /// Windows of `size_ms` starting every `slide_ms` (`0 < slide_ms <= size_ms`).
    pub fn sliding(size_ms: i64, slide_ms: i64) -> Result<Self, Error> {
        if size_ms <= 0 || slide_ms <= 0 {
            return Err(Error::config(format!("window size and slide must be positive milliseconds, got size {size_ms} and slide {slide_ms}")));
        }
        if slide_ms > size_ms {
            return Err(Error::config(format!("window slide ({slide_ms} ms) must not exceed the window size ({size_ms} ms): events between windows would be lost")));
        }
        Ok(Self { size_ms, slide_ms })
    }

    /// Window length.
    pub fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// Distance between window starts.
    pub fn slide_ms(&self) -> i64 {
        self.slide_ms
    }

    /// The windows an event at `ts` belongs to, oldest first.
    pub fn windows_of(&self, ts: i64) -> impl Iterator<Item = Window> {
        let (size, slide) = (self.size_ms, self.slide_ms);
        let last_start = ts.div_euclid(slide) * slide;
        // The earliest start is the first multiple of `slide` strictly after `ts - size`.
        let first_start = (ts - size).div_euclid(slide) * slide + slide;
        (0..).map(move |k| first_start + k * slide).take_while(move |&s| s <= last_start).map(move |start| Window { start, end: start + size })
    }
}

/// When a window's result is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Once, final, when the watermark passes the window's end.
    #[default]
    Append,
    /// Whenever the window changed in a batch; may emit the same window several times.
    Update,
}

/// What happens to an event that is late for all of its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatePolicy {
    /// Drop it and count it in the batch output's `late-records`.
    #[default]
    Drop,
    /// Reject it, so it goes to the dead-letter policy with a reason.
    Reject,
}

/// What [`Windowed::add`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Added to at least one open window.
    Accepted,
    /// Late for all of its windows; not added.
    Late,
}

/// Keyed window state: one accumulator `A` per (window, key), plus the watermark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Windowed<K: Ord + Hash, A> {
    spec: WindowSpec,
    delay_ms: i64,
    mode: OutputMode,
    max_event_ms: Option<i64>,
    watermark_ms: Option<i64>,
    open: BTreeMap<Window, HashMap<K, A>>,
    changed: BTreeSet<(Window, K)>,
}

impl<K: Ord + Hash, A> Windowed<K, A> {
    /// The same windows, keys and watermark with each accumulator turned into another type
    /// (for a state migration).
    pub fn map_accumulators<B>(self, mut f: impl FnMut(Window, &K, A) -> B) -> Windowed<K, B> {
        Windowed {
            spec: self.spec,
            delay_ms: self.delay_ms,
            mode: self.mode,
            max_event_ms: self.max_event_ms,
            watermark_ms: self.watermark_ms,
            open: self
                .open
                .into_iter()
                .map(|(window, per_key)| {
                    (
                        window,
                        per_key
                            .into_iter()
                            .map(|(k, a)| {
                                let b = f(window, &k, a);
                                (k, b)
                            })
                            .collect(),
                    )
                })
                .collect(),
            changed: self.changed,
        }
    }

    /// The window layout.
    pub fn spec(&self) -> WindowSpec {
        self.spec
    }
}

impl<K: Ord + Hash + Clone, A: Default> Windowed<K, A> {
    /// Empty state with the watermark `delay_ms` behind the newest event.
    pub fn new(spec: WindowSpec, delay_ms: i64, mode: OutputMode) -> Result<Self, Error> {
        if delay_ms < 0 {
            return Err(Error::config(format!("watermark delay must not be negative, got {delay_ms} ms")));
        }
        Ok(Self { spec, delay_ms, mode, max_event_ms: None, watermark_ms: None, open: BTreeMap::new(), changed: BTreeSet::new() })
    }

    /// The current watermark (none before the first batch).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark_ms
    }

    /// Number of open (window, key) accumulators.
    pub fn open_len(&self) -> usize {
        self.open.values().map(HashMap::len).sum()
    }

    /// Add an event at `ts` for `key` to every window of it that is still open, calling
    /// `update` once per window. `key` may be borrowed (`&str` for `String` keys): it is
    /// copied only when a window sees the key for the first time.
    pub fn add<Q>(&mut self, ts: i64, key: &Q, mut update: impl FnMut(&mut A)) -> Admission
    where
        K: Borrow<Q>,
        Q: Ord + Hash + ToOwned<Owned = K> + ?Sized,
    {
        self.add_to_windows(ts, key, |_, acc| update(acc))
    }

    /// [`add`](Self::add), with each window handed to `update` along with its accumulator.
    pub fn add_to_windows<Q>(&mut self, ts: i64, key: &Q, mut update: impl FnMut(Window, &mut A)) -> Admission
    where
        K: Borrow<Q>,
        Q: Ord + Hash + ToOwned<Owned = K> + ?Sized,
    {
        self.max_event_ms = Some(self.max_event_ms.map_or(ts, |m| m.max(ts)));
        let mut accepted = false;
        for window in self.spec.windows_of(ts) {
            if self.watermark_ms.is_some_and(|wm| window.end <= wm) {
                continue;
            }
            accepted = true;
            if self.mode == OutputMode::Update {
                self.changed.insert((window, key.to_owned()));
            }
            let per_key = self.open.entry(window).or_default();
            // One lookup for the common case (the key is already in the window).
            match per_key.get_mut(key) {
                Some(acc) => update(window, acc),
                None => {
                    let mut acc = A::default();
                    update(window, &mut acc);
                    per_key.insert(key.to_owned(), acc);
                }
            }
        }
        if accepted {
            Admission::Accepted
        } else {
            Admission::Late
        }
    }

    /// End the batch: move the watermark (to at least `floor_ms`, the host's bound) and
    /// call `emit` for each result due, ordered by window then key.
    pub fn finish_batch(&mut self, floor_ms: Option<i64>, mut emit: impl FnMut(Window, &K, &A)) {
        let candidate = self.max_event_ms.map(|m| m.saturating_sub(self.delay_ms));
        let wm = [self.watermark_ms, candidate, floor_ms].into_iter().flatten().max();
        self.watermark_ms = wm;
        if self.mode == OutputMode::Update {
            for (window, key) in std::mem::take(&mut self.changed) {
                if let Some(acc) = self.open.get(&window).and_then(|m| m.get(&key)) {
                    emit(window, &key, acc);
                }
            }
        }
        let Some(wm) = wm else { return };
        while let Some(entry) = self.open.first_entry() {
            if entry.key().end > wm {
                break;
            }
            let (window, per_key) = entry.remove_entry();
            if self.mode == OutputMode::Append {
                let mut keys: Vec<(&K, &A)> = per_key.iter().collect();
                keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (key, acc) in keys {
                    emit(window, key, acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(spec: WindowSpec, ts: i64) -> Vec<i64> {
        spec.windows_of(ts).map(|w| w.start).collect()
    }

    #[test]
    fn sliding_windows_cover_each_event_size_over_slide_times() {
        let spec = WindowSpec::sliding(60_000, 10_000).unwrap();
        assert_eq!(starts(spec, 65_000), vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000]);
        assert_eq!(starts(spec, 60_000), vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000]);
        assert_eq!(starts(spec, 59_999), vec![0, 10_000, 20_000, 30_000, 40_000, 50_000]);
        assert_eq!(starts(spec, -1), vec![-60_000, -50_000, -40_000, -30_000, -20_000, -10_000]);
        let tumbling = WindowSpec::tumbling(1000).unwrap();
        assert_eq!(starts(tumbling, 1999), vec![1000]);
        let uneven = WindowSpec::sliding(25, 10).unwrap();
        assert_eq!(starts(uneven, 30), vec![10, 20, 30]);
        assert_eq!(starts(uneven, 34), vec![10, 20, 30]);
        assert_eq!(starts(uneven, 35), vec![20, 30]);
    }

    #[test]
    fn bad_specs_are_config_errors() {
        assert!(WindowSpec::sliding(10, 20).is_err());
        assert!(WindowSpec::sliding(0, 0).is_err());
        assert!(WindowSpec::tumbling(-5).is_err());
    }

    #[test]
    fn events_reach_every_window_whichever_exist_already() {
        // Windows of 30 sliding by 10: each event belongs to three. Later events find
        // their windows all there, some missing at the front, at the back or in between.
        let spec = WindowSpec::sliding(30, 10).unwrap();
        let mut w: Windowed<&str, Vec<i64>> = Windowed::new(spec, 1_000, OutputMode::Append).unwrap();
        let events = [0, 50, 25, 35, 15, 5, 45, 10];
        let mut calls = Vec::new();
        for ts in events {
            w.add_to_windows(ts, &"k", |window, events| {
                calls.push((ts, window.start));
                events.push(ts);
            });
        }
        // Each event's windows are updated once each, oldest first.
        for ts in events {
            let updated: Vec<i64> = calls.iter().filter(|c| c.0 == ts).map(|c| c.1).collect();
            assert_eq!(updated, starts(spec, ts), "event at {ts}");
        }
        let mut got = Vec::new();
        w.finish_batch(Some(i64::MAX), |window, _, events| got.push((window.start, events.clone())));
        let mut expected = Vec::new();
        for start in (-20..=50).step_by(10) {
            expected.push((start, events.into_iter().filter(|&t| t >= start && t < start + 30).collect::<Vec<i64>>()));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn append_mode_emits_once_when_the_watermark_passes_and_drops_late_events() {
        let mut w: Windowed<&str, u64> = Windowed::new(WindowSpec::tumbling(10).unwrap(), 5, OutputMode::Append).unwrap();
        let mut emitted = Vec::new();
        assert_eq!(w.add(3, &"a", |c| *c += 1), Admission::Accepted);
        assert_eq!(w.add(12, &"a", |c| *c += 1), Admission::Accepted);
        w.finish_batch(None, |win, k, c| emitted.push((win.start, *k, *c)));
        assert_eq!(w.watermark(), Some(7));
        assert!(emitted.is_empty());
        assert_eq!(w.add(16, &"a", |c| *c += 1), Admission::Accepted);
        w.finish_batch(None, |win, k, c| emitted.push((win.start, *k, *c)));
        assert_eq!(emitted, vec![(0, "a", 1)]);
        // Window [0, 10) is closed: an event at 9 is late for all of its windows.
        assert_eq!(w.add(9, &"a", |c| *c += 1), Admission::Late);
        w.finish_batch(Some(i64::MAX), |win, k, c| emitted.push((win.start, *k, *c)));
        assert_eq!(emitted, vec![(0, "a", 1), (10, "a", 2)]);
        assert_eq!(w.open_len(), 0);
    }

    #[test]
    fn update_mode_emits_changed_windows_every_batch() {
        let mut w: Windowed<u8, u64> = Windowed::new(WindowSpec::tumbling(10).unwrap(), 100, OutputMode::Update).unwrap();
        let mut emitted = Vec::new();
        w.add(1, &1, |c| *c += 1);
        w.finish_batch(None, |win, k, c| emitted.push((win.start, *k, *c)));
        w.add(2, &1, |c| *c += 1);
        w.add(15, &2, |c| *c += 1);
        w.finish_batch(None, |win, k, c| emitted.push((win.start, *k, *c)));
        w.finish_batch(None, |win, k, c| emitted.push((win.start, *k, *c)));
        assert_eq!(emitted, vec![(0, 1, 1), (0, 1, 2), (10, 2, 1)]);
    }

    #[test]
    fn host_floor_never_moves_the_watermark_back() {
        let mut w: Windowed<u8, u64> = Windowed::new(WindowSpec::tumbling(10).unwrap(), 0, OutputMode::Append).unwrap();
        w.add(50, &1, |c| *c += 1);
        w.finish_batch(Some(10), |_, _, _| {});
        assert_eq!(w.watermark(), Some(50));
        w.finish_batch(Some(20), |_, _, _| {});
        assert_eq!(w.watermark(), Some(50));
    }
}
