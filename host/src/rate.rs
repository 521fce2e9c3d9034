//! Rate control: how many records the next batch may take.
//!
//! [`PidRateEstimator`] is Spark Streaming's `PIDRateEstimator`, term for term: after each
//! batch it compares the rate the batch was planned at with the rate it was processed at,
//! and moves the rate toward what the pipeline can take. [`partition_budgets`] turns a rate
//! into per-partition record counts for one batch, like Spark's Kafka source: by share of
//! lag, capped by `maxRatePerPartition`, at least `minRatePerPartition`. Records over the
//! budget stay in Kafka for a later batch; nothing is dropped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The PID gains and floor (Spark's `spark.streaming.backpressure.pid.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PidSettings {
    /// Weight of the current error (records/s).
    pub proportional: f64,
    /// Weight of the accumulated error (records waiting because batches ran late).
    pub integral: f64,
    /// Weight of the change of the error.
    pub derived: f64,
    /// The rate never goes below this (records/s).
    pub min_rate: f64,
}

impl Default for PidSettings {
    /// Spark's defaults.
    fn default() -> Self {
        Self { proportional: 1.0, integral: 0.2, derived: 0.0, min_rate: 100.0 }
    }
}

/// What the estimator remembers between batches; saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PidState {
    /// No update has been made yet.
    pub first_run: bool,
    /// Time of the last update, ms (−1 before the first).
    pub latest_time_ms: i64,
    /// The last estimated rate, records/s.
    pub latest_rate: f64,
    /// The error at the last update.
    pub latest_error: f64,
}

impl Default for PidState {
    fn default() -> Self {
        Self { first_run: true, latest_time_ms: -1, latest_rate: -1.0, latest_error: -1.0 }
    }
}

/// Spark Streaming's PID rate estimator.
#[derive(Debug, Clone)]
pub struct PidRateEstimator {
    batch_interval_ms: f64,
    pub(crate) settings: PidSettings,
    state: PidState,
}

impl PidRateEstimator {
    /// An estimator for batches every `batch_interval`.
    pub fn new(batch_interval: Duration, settings: PidSettings) -> Self {
        Self { batch_interval_ms: batch_interval.as_secs_f64() * 1000.0, settings, state: PidState::default() }
    }

    /// Its state, for a checkpoint.
    pub fn state(&self) -> &PidState {
        &self.state
    }

    /// Continue from a checkpoint's state.
    pub fn restore(&mut self, state: PidState) {
        self.state = state;
    }

    /// Change the gains and floor (live tuning); the state is kept.
    pub fn set_settings(&mut self, settings: PidSettings) {
        self.settings = settings;
    }

    /// Change the batch interval the scheduling delay is measured against.
    pub fn set_batch_interval(&mut self, batch_interval: Duration) {
        self.batch_interval_ms = batch_interval.as_secs_f64() * 1000.0;
    }

    /// Update after a batch that finished at `time_ms` with `records`, which took
    /// `processing_delay_ms` to process and started `scheduling_delay_ms` after it was
    /// due. The new rate in records/s, or `None` when there is none: the first update
    /// only learns the processing rate, and batches without records or without
    /// processing time (or not after the last update) teach nothing.
    ///
    /// Delays are in (fractional) milliseconds: Spark counts whole ones, which would make
    /// batches processed in under a millisecond teach nothing.
    pub fn compute(&mut self, time_ms: i64, records: u64, processing_delay_ms: f64, scheduling_delay_ms: f64) -> Option<f64> {
        let s = &mut self.state;
        if time_ms <= s.latest_time_ms || records == 0 || processing_delay_ms <= 0.0 {
            return None;
        }
        let since_update_secs = (time_ms - s.latest_time_ms) as f64 / 1000.0;
        let processing_rate = records as f64 / processing_delay_ms * 1000.0;
        let error = s.latest_rate - processing_rate;
        let historical_error = scheduling_delay_ms * processing_rate / self.batch_interval_ms;
        let d_error = (error - s.latest_error) / since_update_secs;
        let p = self.settings;
        let new_rate = (s.latest_rate - p.proportional * error - p.integral * historical_error - p.derived * d_error).max(p.min_rate);
        s.latest_time_ms = time_ms;
        if s.first_run {
            s.latest_rate = processing_rate;
            s.latest_error = 0.0;
            s.first_run = false;
            None
        } else {
            s.latest_rate = new_rate;
            s.latest_error = error;
            Some(new_rate)
        }
    }
}

/// Per-partition caps on a batch, in records per second of batch interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartitionRates {
    /// At most this many records/s per partition (`maxRatePerPartition`).
    pub max: Option<f64>,
    /// At least this many records/s per partition, when it has them (`minRatePerPartition`).
    pub min: Option<f64>,
}

/// Records each partition may contribute to the next batch, given its lag, the estimated
/// `rate` (records/s over all partitions; `None` before there is one) and the batch
/// `interval`. `None` means no limit from rate control. Like Spark's Kafka source: the
/// rate is shared by lag and capped by `max`; without a rate, `max` alone; then at least
/// `min`. Never more than the lag.
pub fn partition_budgets(lags: &[u64], rate: Option<f64>, caps: PartitionRates, interval: Duration) -> Option<Vec<u64>> {
    let total: u64 = lags.iter().sum();
    let per_sec: Vec<f64> = match rate.filter(|r| *r > 0.0) {
        Some(rate) => lags
            .iter()
            .map(|&lag| {
                let share = if total == 0 { 0.0 } else { lag as f64 / total as f64 * rate };
                caps.max.map_or(share, |m| share.min(m))
            })
            .collect(),
        None => match caps.max {
            Some(m) => vec![m; lags.len()],
            None => return None,
        },
    };
    let secs = interval.as_secs_f64();
    Some(
        lags.iter()
            .zip(per_sec)
            .map(|(&lag, r)| {
                let mut n = (r * secs).floor().max(0.0) as u64;
                if let Some(min) = caps.min {
                    n = n.max((min * secs).floor() as u64);
                }
                n.min(lag)
            })
            .collect(),
    )
}

/// Bounds of the adaptive batch interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveInterval {
    /// Shortest interval.
    pub min: Duration,
    /// Longest interval.
    pub max: Duration,
}

impl AdaptiveInterval {
    /// The seed's rule: double the interval when a batch took more than 1.5× it, halve it
    /// when a batch took less than half of it, within the bounds.
    pub fn next(&self, current: Duration, processing: Duration) -> Duration {
        if processing.as_secs_f64() > current.as_secs_f64() * 1.5 {
            (current * 2).min(self.max)
        } else if processing.as_secs_f64() < current.as_secs_f64() * 0.5 {
            (current / 2).max(self.min)
        } else {
            current
        }
    }
}

/// What the batch loop asks: the per-partition budget of the next batch, and what it
/// tells after each batch. Owns the estimator (when backpressure is on) and the caps.
#[derive(Debug, Clone)]
pub struct RateController {
    estimator: Option<PidRateEstimator>,
    rate: Option<f64>,
    caps: PartitionRates,
    interval: Duration,
    adaptive: Option<AdaptiveInterval>,
}

/// The part of a [`RateController`] that a checkpoint keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateState {
    /// The current rate, records/s, if there is one.
    pub rate: Option<f64>,
    /// The estimator's memory, when backpressure is on.
    pub pid: Option<PidState>,
    /// The batch interval, ms, when it adapts.
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

impl RateController {
    /// `backpressure`: the PID settings and the rate before the first estimate, or `None`
    /// for no backpressure (then only `caps` limit a batch).
    /// With `adaptive`, the batch interval starts at `interval` and adapts after each
    /// batch.
    pub fn new(backpressure: Option<(PidSettings, Option<f64>)>, caps: PartitionRates, interval: Duration, adaptive: Option<AdaptiveInterval>) -> Self {
        Self { estimator: backpressure.map(|(pid, _)| PidRateEstimator::new(interval, pid)), rate: backpressure.and_then(|(_, initial)| initial), caps, interval, adaptive }
    }

    /// The current batch interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The rate the next batch is planned at (records/s), if any.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Records each partition may add to the next batch, given their lags; `None` for no
    /// limit.
    pub fn budgets(&self, lags: &[u64]) -> Option<Vec<u64>> {
        partition_budgets(lags, self.rate, self.caps, self.interval)
    }

    /// Learn from a finished batch (see [`PidRateEstimator::compute`]), then adapt the
    /// interval.
    pub fn after_batch(&mut self, time_ms: i64, records: u64, processing: Duration, scheduling_delay: Duration) {
        if let Some(e) = &mut self.estimator {
            if let Some(rate) = e.compute(time_ms, records, processing.as_secs_f64() * 1000.0, scheduling_delay.as_secs_f64() * 1000.0) {
                self.rate = Some(rate);
            }
        }
        if let Some(a) = self.adaptive {
            self.set_interval(a.next(self.interval, processing));
        }
    }

    fn set_interval(&mut self, interval: Duration) {
        if interval != self.interval {
            tracing::info!("batch interval {} ms -> {} ms", self.interval.as_millis(), interval.as_millis());
        }
        self.interval = interval;
        if let Some(e) = &mut self.estimator {
            e.set_batch_interval(interval);
        }
    }

    /// Apply new settings while running (live tuning): backpressure on, off or with other
    /// gains (turning it on starts a new estimator at `initial_rate`), caps, and the
    /// interval with its bounds. Returns what changed, for the log.
    pub fn retune(&mut self, backpressure: Option<(PidSettings, Option<f64>)>, caps: PartitionRates, interval: Duration, adaptive: Option<AdaptiveInterval>) -> Vec<String> {
        let mut changed = Vec::new();
        match (&mut self.estimator, backpressure) {
            (Some(e), Some((pid, _))) => {
                if e.settings != pid {
                    changed.push(format!("PID gains {:?} -> {:?}", e.settings, pid));
                    e.set_settings(pid);
                }
            }
            (None, Some((pid, initial))) => {
                changed.push("backpressure on".into());
                self.estimator = Some(PidRateEstimator::new(self.interval, pid));
                self.rate = initial;
            }
            (Some(_), None) => {
                changed.push("backpressure off".into());
                self.estimator = None;
                self.rate = None;
            }
            (None, None) => {}
        }
        if self.caps != caps {
            changed.push(format!("partition rates {:?} -> {:?}", self.caps, caps));
            self.caps = caps;
        }
        if self.adaptive != adaptive {
            changed.push(format!("adaptive interval {:?} -> {:?}", self.adaptive, adaptive));
            self.adaptive = adaptive;
        }
        let interval = match adaptive {
            // An adapting interval keeps its current value, within the new bounds.
            Some(a) => self.interval.clamp(a.min, a.max),
            None => interval,
        };
        if interval != self.interval {
            changed.push(format!("batch interval {} ms -> {} ms", self.interval.as_millis(), interval.as_millis()));
            self.set_interval(interval);
        }
        changed
    }

    /// The state to checkpoint.
    pub fn state(&self) -> RateState {
        RateState { rate: self.rate, pid: self.estimator.as_ref().map(|e| e.state().clone()), interval_ms: self.adaptive.map(|_| self.interval.as_millis() as u64) }
    }

    /// Continue from a checkpoint's state (an estimator only if backpressure is on now).
    pub fn restore(&mut self, state: RateState) {
        if let (Some(e), Some(pid)) = (&mut self.estimator, state.pid) {
            e.restore(pid);
            self.rate = state.rate.or(self.rate);
        }
        if let (Some(a), Some(ms)) = (self.adaptive, state.interval_ms) {
            self.set_interval(Duration::from_millis(ms).clamp(a.min, a.max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimator(settings: PidSettings) -> PidRateEstimator {
        PidRateEstimator::new(Duration::from_secs(1), settings)
    }

    #[test]
    fn the_first_update_only_learns_the_processing_rate() {
        let mut e = estimator(PidSettings::default());
        assert_eq!(e.compute(1_000, 1_000, 500.0, 0.0), None);
        assert_eq!(e.state(), &PidState { first_run: false, latest_time_ms: 1_000, latest_rate: 2_000.0, latest_error: 0.0 });
    }

    #[test]
    fn a_hand_computed_sequence_with_spark_defaults() {
        let mut e = estimator(PidSettings::default());
        e.compute(1_000, 1_000, 500.0, 0.0); // rate 2000
                                             // processing 1000/s: error 1000, no scheduling delay: 2000 - 1000 = 1000
        assert_eq!(e.compute(2_000, 1_000, 1000.0, 0.0), Some(1_000.0));
        // processing 500/s: error 500, historical 1000 ms * 500/s / 1000 ms = 500:
        // 1000 - 500 - 0.2 * 500 = 400
        assert_eq!(e.compute(3_000, 1_000, 2000.0, 1000.0), Some(400.0));
        // the floor: 400 - 390 - 0.2 * 50 = 0 -> minRate 100
        assert_eq!(e.compute(5_000, 10, 1000.0, 5000.0), Some(100.0));
    }

    #[test]
    fn the_derivative_term_uses_the_error_change_per_second() {
        let mut e = estimator(PidSettings { proportional: 0.5, integral: 0.0, derived: 0.5, min_rate: 1.0 });
        e.compute(1_000, 1_000, 1000.0, 0.0); // rate 1000
                                              // processing 500/s, 2 s after: error 500, d = (500 - 0) / 2 = 250: 1000 - 250 - 125 = 625
        assert_eq!(e.compute(3_000, 500, 1000.0, 0.0), Some(625.0));
        // processing 625/s: error 0, d = (0 - 500) / 1 = -500: 625 - 0 + 250 = 875
        assert_eq!(e.compute(4_000, 625, 1000.0, 0.0), Some(875.0));
    }

    #[test]
    fn batches_without_records_or_time_or_out_of_order_teach_nothing() {
        let mut e = estimator(PidSettings::default());
        e.compute(1_000, 1_000, 500.0, 0.0);
        let before = e.state().clone();
        assert_eq!(e.compute(2_000, 0, 500.0, 0.0), None, "zero input");
        assert_eq!(e.compute(2_000, 100, 0.0, 0.0), None, "zero processing time");
        assert_eq!(e.compute(1_000, 100, 100.0, 0.0), None, "not after the last update");
        assert_eq!(e.state(), &before);
        let mut restored = estimator(PidSettings::default());
        restored.restore(before);
        assert_eq!(restored.compute(2_000, 1_000, 1000.0, 0.0), Some(1_000.0), "a restored estimator continues where it was");
    }

    #[test]
    fn budgets_share_the_rate_by_lag_within_the_partition_caps() {
        let second = Duration::from_secs(1);
        assert_eq!(partition_budgets(&[100, 300], None, PartitionRates::default(), second), None, "no limit without rate or caps");
        assert_eq!(partition_budgets(&[100, 300], Some(200.0), PartitionRates::default(), second), Some(vec![50, 150]));
        let caps = PartitionRates { max: Some(120.0), min: None };
        assert_eq!(partition_budgets(&[100, 300], Some(200.0), caps, second), Some(vec![50, 120]));
        assert_eq!(partition_budgets(&[100, 300], None, caps, Duration::from_millis(500)), Some(vec![60, 60]), "max alone, per interval");
        let caps = PartitionRates { max: None, min: Some(80.0) };
        assert_eq!(partition_budgets(&[100, 300, 0], Some(200.0), caps, second), Some(vec![80, 150, 0]), "at least min, never beyond the lag");
    }

    #[test]
    fn the_controller_plans_at_the_initial_rate_then_at_the_estimate_and_survives_a_restore() {
        let second = Duration::from_secs(1);
        let mut c = RateController::new(Some((PidSettings::default(), Some(1_000.0))), PartitionRates::default(), second, None);
        assert_eq!(c.budgets(&[5_000, 5_000]), Some(vec![500, 500]), "initialRate before the first estimate");
        c.after_batch(1_000, 1_000, Duration::from_millis(500), Duration::ZERO);
        assert_eq!(c.rate(), Some(1_000.0), "the first update only learns");
        c.after_batch(2_000, 1_000, Duration::from_millis(2_000), Duration::ZERO);
        assert_eq!(c.rate(), Some(500.0), "2000 - 1.0 × (2000 - 500): down to what was processed");
        let mut again = RateController::new(Some((PidSettings::default(), Some(1_000.0))), PartitionRates::default(), second, None);
        again.restore(c.state());
        assert_eq!(again.state(), c.state());
        assert_eq!(again.budgets(&[5_000, 5_000]), Some(vec![250, 250]));
        let off = RateController::new(None, PartitionRates::default(), second, None);
        assert_eq!(off.budgets(&[5_000]), None, "no backpressure, no caps: no limit");
    }

    #[test]
    fn retuning_changes_caps_gains_and_interval_and_keeps_what_was_learned() {
        let ms = Duration::from_millis;
        let mut c = RateController::new(Some((PidSettings::default(), Some(1_000.0))), PartitionRates::default(), ms(1_000), None);
        c.after_batch(1_000, 1_000, ms(500), Duration::ZERO);
        c.after_batch(2_000, 1_000, ms(1_000), Duration::ZERO);
        let learned = c.state();
        let gains = PidSettings { proportional: 0.5, ..PidSettings::default() };
        let changed = c.retune(Some((gains, None)), PartitionRates { max: Some(10.0), min: None }, ms(500), None);
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!(c.state().pid, learned.pid, "the estimator keeps its memory");
        assert_eq!(c.budgets(&[1_000]), Some(vec![5]), "10/s per partition × 500 ms");
        assert!(c.retune(Some((gains, None)), PartitionRates { max: Some(10.0), min: None }, ms(500), None).is_empty(), "same settings, no change");
        assert_eq!(
            c.retune(None, PartitionRates::default(), ms(500), None),
            ["backpressure off", "partition rates PartitionRates { max: Some(10.0), min: None } -> PartitionRates { max: None, min: None }"]
        );
        assert_eq!(c.budgets(&[1_000]), None);
    }

    #[test]
    fn the_interval_doubles_on_slow_batches_and_halves_on_fast_ones_within_bounds() {
        let ms = Duration::from_millis;
        let a = AdaptiveInterval { min: ms(1_000), max: ms(60_000) };
        assert_eq!(a.next(ms(1_000), ms(1_501)), ms(2_000));
        assert_eq!(a.next(ms(1_000), ms(1_500)), ms(1_000), "1.5× exactly keeps it");
        assert_eq!(a.next(ms(40_000), ms(70_000)), ms(60_000), "at most max");
        assert_eq!(a.next(ms(8_000), ms(3_999)), ms(4_000));
        assert_eq!(a.next(ms(8_000), ms(4_000)), ms(8_000), "0.5× exactly keeps it");
        assert_eq!(a.next(ms(1_500), ms(10)), ms(1_000), "at least min");

        let mut c = RateController::new(None, PartitionRates { max: Some(100.0), min: None }, ms(1_000), Some(a));
        c.after_batch(1_000, 10, ms(2_000), Duration::ZERO);
        assert_eq!(c.interval(), ms(2_000));
        assert_eq!(c.budgets(&[1_000]), Some(vec![200]), "budgets follow the interval");
        let mut again = RateController::new(None, PartitionRates::default(), ms(1_000), Some(a));
        again.restore(c.state());
        assert_eq!(again.interval(), ms(2_000), "the interval is restored from a checkpoint");
    }
}
