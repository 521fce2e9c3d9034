//! Planning a batch, as pure functions: from every partition's position and high
//! watermark, an available-now run's targets, rate control's per-partition budgets and
//! `maxOffsetsPerTrigger`, to the offset ranges `[from, until)` of the next batch; and
//! where each partition continues after a batch. No I/O: the batch loop asks the source
//! for the positions and watermarks and the rate controller for the budgets.

use std::collections::BTreeMap;

use sluice_sdk::OffsetRange;

use crate::source::PartitionLag;

/// What limits the next batch, besides the high watermarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits<'a> {
    /// An available-now run reads no partition beyond its high watermark at start.
    pub targets: Option<&'a [PartitionLag]>,
    /// Rate control's records per partition for this batch (same order as the lag).
    pub budgets: Option<&'a [u64]>,
    /// `maxOffsetsPerTrigger`: most records in the batch, shared by lag.
    pub max_records: Option<u64>,
}

/// The ranges of the next batch: each partition from its position towards its high
/// watermark, no further than its target and its budget, and all of them together within
/// `max_records`, shared by lag.
pub fn ranges(lag: &[PartitionLag], limits: Limits<'_>) -> Vec<OffsetRange> {
    let mut capped = lag.to_vec();
    if let Some(targets) = limits.targets {
        for (p, t) in capped.iter_mut().zip(targets) {
            debug_assert_eq!((&p.topic, p.partition), (&t.topic, t.partition));
            p.high = p.high.min(t.high);
        }
    }
    if let Some(budgets) = limits.budgets {
        for (p, budget) in capped.iter_mut().zip(budgets) {
            p.high = p.high.min(p.next.saturating_add(*budget as i64));
        }
    }
    shared_by_lag(&capped, limits.max_records)
}

/// Records each partition could read now (high watermark − position, or 0), the input of
/// rate control's budgets; with an available-now run's targets applied.
pub fn lags(lag: &[PartitionLag], targets: Option<&[PartitionLag]>) -> Vec<u64> {
    lag.iter()
        .enumerate()
        .map(|(i, p)| {
            let high = targets.and_then(|t| t.get(i)).map_or(p.high, |t| p.high.min(t.high));
            (high - p.next).max(0) as u64
        })
        .collect()
}

/// Split a budget over partitions in proportion to their lag (Spark's
/// `maxOffsetsPerTrigger`); without a budget every partition is read to its high watermark.
pub fn shared_by_lag(lag: &[PartitionLag], max_records: Option<u64>) -> Vec<OffsetRange> {
    let lags: Vec<u64> = lag.iter().map(|p| (p.high - p.next).max(0) as u64).collect();
    let total: u64 = lags.iter().sum();
    let shares: Vec<u64> = match max_records {
        Some(max) if total > max => {
            let mut shares: Vec<u64> = lags.iter().map(|&l| (l as u128 * max as u128 / total as u128) as u64).collect();
            // Hand the rounding remainder to the partitions with the most lag left.
            let mut left = max - shares.iter().sum::<u64>();
            let mut order: Vec<usize> = (0..lags.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(lags[i] - shares[i]));
            for i in order {
                if left == 0 {
                    break;
                }
                if shares[i] < lags[i] {
                    shares[i] += 1;
                    left -= 1;
                }
            }
            shares
        }
        _ => lags,
    };
    lag.iter().zip(shares).map(|(p, n)| OffsetRange { topic: p.topic.clone(), partition: p.partition, from: p.next, until: p.next + n as i64 }).collect()
}

/// Where each partition of `lag` continues once `ranges` are done.
pub fn positions_after(lag: &[PartitionLag], ranges: &[OffsetRange]) -> BTreeMap<(String, i32), i64> {
    let mut next: BTreeMap<(String, i32), i64> = lag.iter().map(|p| ((p.topic.clone(), p.partition), p.next)).collect();
    for r in ranges {
        let n = next.entry((r.topic.clone(), r.partition)).or_insert(r.until);
        *n = (*n).max(r.until);
    }
    next
}

/// A process's part of a group's `maxOffsetsPerTrigger`: `max` shared by the partitions a
/// process owns (`owned` of the group's `total`), rounded up and at least 1, so that the
/// processes of a group together read about `max` records per trigger.
pub fn share_of_cap(max: u64, owned: usize, total: usize) -> u64 {
    if total == 0 || owned >= total {
        return max;
    }
    (max * owned as u64).div_ceil(total as u64).max(1)
}

/// Records in `ranges` by their offsets (`until − from`; with gaps, more than there are).
pub fn offsets_in(ranges: &[OffsetRange]) -> i64 {
    ranges.iter().map(|r| r.until - r.from).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(parts: &[(i64, i64)]) -> Vec<PartitionLag> {
        parts.iter().enumerate().map(|(i, &(next, high))| PartitionLag { topic: "t".into(), partition: i as i32, next, high }).collect()
    }

    fn sizes(ranges: &[OffsetRange]) -> Vec<i64> {
        ranges.iter().map(|r| r.until - r.from).collect()
    }

    #[test]
    fn without_a_cap_every_partition_is_read_to_its_high_watermark() {
        let ranges = shared_by_lag(&lag(&[(0, 10), (5, 5), (7, 100)]), None);
        assert_eq!(sizes(&ranges), vec![10, 0, 93]);
        assert_eq!((ranges[2].from, ranges[2].until), (7, 100));
    }

    #[test]
    fn a_cap_is_shared_by_lag_and_used_completely() {
        let ranges = shared_by_lag(&lag(&[(0, 100), (0, 300), (0, 0)]), Some(100));
        assert_eq!(sizes(&ranges), vec![25, 75, 0]);
        let ranges = shared_by_lag(&lag(&[(0, 1), (0, 1), (0, 1)]), Some(2));
        assert_eq!(sizes(&ranges).iter().sum::<i64>(), 2);
        let ranges = shared_by_lag(&lag(&[(0, 3), (0, 3), (0, 3)]), Some(10));
        assert_eq!(sizes(&ranges), vec![3, 3, 3], "a cap above the lag reads everything");
    }

    #[test]
    fn targets_budgets_and_the_batch_cap_all_limit_a_batch() {
        let now = lag(&[(10, 100), (20, 60), (0, 0)]);
        let targets = lag(&[(0, 50), (0, 80), (0, 0)]);
        let limits = Limits { targets: Some(&targets), ..Limits::default() };
        assert_eq!(sizes(&ranges(&now, limits)), vec![40, 40, 0], "an available-now run stops at its targets");
        assert_eq!(lags(&now, Some(&targets)), vec![40, 40, 0]);
        let budgets = [5, 100, 7];
        assert_eq!(sizes(&ranges(&now, Limits { budgets: Some(&budgets), ..limits })), vec![5, 40, 0], "a budget caps its partition");
        assert_eq!(sizes(&ranges(&now, Limits { max_records: Some(20), ..limits })), vec![10, 10, 0], "the batch cap is shared by lag");
    }

    #[test]
    fn a_group_cap_is_shared_by_the_partitions_each_process_owns() {
        // Three processes owning 2 of 6 partitions each read a third.
        assert_eq!(share_of_cap(1500, 2, 6), 500);
        assert_eq!([1, 2, 3].map(|owned| share_of_cap(100, owned, 6)), [17, 34, 50], "rounded up");
        assert_eq!(share_of_cap(1, 1, 6), 1, "never 0: a process with partitions reads");
        assert_eq!(share_of_cap(1000, 6, 6), 1000, "one process owning all reads it all");
        assert_eq!(share_of_cap(1000, 3, 0), 1000, "partition count unknown: the whole cap");
    }

    #[test]
    fn a_partition_continues_after_its_range_or_where_it_was() {
        let now = lag(&[(10, 100), (20, 60)]);
        let after = positions_after(&now, &[OffsetRange { topic: "t".into(), partition: 0, from: 10, until: 30 }]);
        assert_eq!(after.into_values().collect::<Vec<_>>(), vec![30, 20]);
    }
}
