//! Seed-style ad events: JSON objects with `event` (`click` or `view`), `campaign_id`,
//! `user_id`, `cost`, `timestamp` (event time, epoch ms) and `country`, slightly out of
//! order. Deterministic for a given seed, so tests and benchmarks can reproduce a data set.

use serde::Serialize;

/// A small, fast, deterministic PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// One generated event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdEvent {
    /// `click` or `view`.
    pub event: &'static str,
    /// e.g. `campaign-07`.
    pub campaign_id: String,
    /// e.g. `user-01234`.
    pub user_id: String,
    /// Price of the event, two decimals.
    pub cost: f64,
    /// Event time, epoch milliseconds.
    pub timestamp: i64,
    /// Two-letter country code.
    pub country: &'static str,
}

/// Shape of a generated data set.
#[derive(Debug, Clone)]
pub struct EventSpec {
    /// PRNG seed.
    pub seed: u64,
    /// Event time of the first event, epoch ms.
    pub start_ms: i64,
    /// Events per second of event time.
    pub events_per_sec: u64,
    /// Number of campaigns.
    pub campaigns: u64,
    /// Number of distinct users.
    pub users: u64,
    /// Events arrive up to this much behind their nominal time (out of order).
    pub max_disorder_ms: i64,
    /// Share of `click` events, in percent (the rest are `view`s).
    pub click_percent: u64,
}

impl Default for EventSpec {
    fn default() -> Self {
        Self {
            seed: 42,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            events_per_sec: 5_000,
            campaigns: 12,
            users: 5_000,
            max_disorder_ms: 5_000,
            click_percent: 80,
        }
    }
}

const COUNTRIES: [&str; 5] = ["KR", "US", "JP", "DE", "BR"];

/// An endless, deterministic stream of events following `spec`.
#[derive(Debug, Clone)]
pub struct EventGenerator {
    spec: EventSpec,
    rng: Rng,
    index: u64,
}

impl EventGenerator {
    /// Start a stream.
    pub fn new(spec: EventSpec) -> Self {
        Self { rng: Rng::new(spec.seed), spec, index: 0 }
    }

    /// The next event.
    pub fn next_event(&mut self) -> AdEvent {
        let s = &self.spec;
        let nominal = s.start_ms + (self.index as i128 * 1000 / s.events_per_sec.max(1) as i128) as i64;
        self.index += 1;
        let disorder = if s.max_disorder_ms > 0 { self.rng.below(s.max_disorder_ms as u64 + 1) as i64 } else { 0 };
        let campaign = self.rng.below(s.campaigns.max(1));
        let user = self.rng.below(s.users.max(1));
        let click = self.rng.below(100) < s.click_percent;
        let cents = 5 + self.rng.below(200);
        let country = COUNTRIES[self.rng.below(COUNTRIES.len() as u64) as usize];
        AdEvent {
            event: if click { "click" } else { "view" },
            campaign_id: format!("campaign-{campaign:02}"),
            user_id: format!("user-{user:05}"),
            cost: cents as f64 / 100.0,
            timestamp: nominal - disorder,
            country,
        }
    }

    /// The next event as a JSON value (record value bytes).
    pub fn next_json(&mut self) -> Vec<u8> {
        serde_json::to_vec(&self.next_event()).expect("events serialize")
    }

    /// Event time up to which events have been generated (nominal, without disorder).
    pub fn event_time_ms(&self) -> i64 {
        self.spec.start_ms + (self.index as i128 * 1000 / self.spec.events_per_sec.max(1) as i128) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events_and_disorder_is_bounded() {
        let spec = EventSpec { max_disorder_ms: 3000, ..EventSpec::default() };
        let a: Vec<_> = {
            let mut g = EventGenerator::new(spec.clone());
            (0..1000).map(|_| g.next_event()).collect()
        };
        let b: Vec<_> = {
            let mut g = EventGenerator::new(spec.clone());
            (0..1000).map(|_| g.next_event()).collect()
        };
        assert_eq!(a, b);
        let out_of_order = a.windows(2).filter(|w| w[1].timestamp < w[0].timestamp).count();
        assert!(out_of_order > 100, "events should be out of order, got {out_of_order} inversions");
        for (i, e) in a.iter().enumerate() {
            let nominal = spec.start_ms + i as i64 * 1000 / spec.events_per_sec as i64;
            assert!(e.timestamp <= nominal && e.timestamp >= nominal - 3000);
        }
    }
}
