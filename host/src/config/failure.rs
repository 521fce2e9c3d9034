//! What a plugin step does when a batch fails in it: `retries`, `retryBackoff` and
//! `onFailure` of a `[[plugin]]` step.

use std::time::Duration;

/// What a step does when a batch fails in it (a trap, or an error for the whole batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Times the batch is tried again, each time with a fresh instance holding the state
    /// of the last checkpoint.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// What happens when the retries failed too.
    pub then: OnFailure,
}

impl FailurePolicy {
    /// Retries by default.
    pub const DEFAULT_RETRIES: u32 = 2;
    /// Backoff by default.
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    /// Stop at the first failure. Without retries no state copies are needed when
    /// checkpointing is off: the benchmarks use it so that they measure the plugins alone.
    pub const STOP_AT_ONCE: Self = Self { retries: 0, backoff: Duration::ZERO, then: OnFailure::Stop };
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self { retries: Self::DEFAULT_RETRIES, backoff: Self::DEFAULT_BACKOFF, then: OnFailure::Stop }
    }
}

/// The last resort of a [`FailurePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Stop the pipeline with the error (the batch is not committed; a restart retries it).
    #[default]
    Stop,
    /// Send every record of the batch to the dead-letter sink, with the error as the
    /// reason, and go on with the next batch.
    DeadLetter,
}
