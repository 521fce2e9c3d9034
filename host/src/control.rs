//! The run's control channel: stop and retune requests and "a new plugin version is ready"
//! notices reach the loop here, and every wait of the loop (the trigger interval, a retry's
//! backoff, a broker outage) is a wait on this channel with a deadline, so it ends as soon
//! as a stop arrives instead of at the next poll.
//!
//! A [`Control`] is a cheap handle; clones share one channel. Signals reach it through a
//! thread of its own ([`Control::on_signals`]), since a signal handler cannot take a lock.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A handle on one run's control channel.
#[derive(Clone, Default)]
pub struct Control(Arc<Shared>);

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    changed: Condvar,
}

#[derive(Default)]
struct Pending {
    stop: bool,
    retune: bool,
    swap: bool,
}

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The deadline passed.
    Deadline,
    /// A stop was asked for (it stays asked for).
    Stop,
    /// A retune was asked for (taken: the next wait does not see it again).
    Retune,
    /// A new plugin version is ready (taken).
    Swap,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("stopped", &self.is_stopped()).finish()
    }
}

impl Control {
    /// A new channel, nothing asked for.
    pub fn new() -> Self {
        Self::default()
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave the flags half-written.
        self.0.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending());
        self.0.changed.notify_all();
    }

    /// Ask the run to stop: the batch in flight finishes (or, if it waits for records or a
    /// retry, fails uncommitted) and the run returns.
    pub fn stop(&self) {
        self.set(|p| p.stop = true);
    }

    /// Ask the run to read its pipeline file again before the next batch.
    pub fn retune(&self) {
        self.set(|p| p.retune = true);
    }

    /// Tell the run that a new plugin version is ready to be swapped in.
    pub fn swap_ready(&self) {
        self.set(|p| p.swap = true);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.pending().stop
    }

    /// Whether a retune was asked for since the last call (or wait) that took it.
    pub fn take_retune(&self) -> bool {
        std::mem::take(&mut self.pending().retune)
    }

    /// Wait until `deadline`, or until `woken` finds (and may take) what ends the wait:
    /// `None` when the deadline passed first.
    fn wait<T>(&self, deadline: Instant, mut woken: impl FnMut(&mut Pending) -> Option<T>) -> Option<T> {
        let mut pending = self.pending();
        loop {
            if let Some(wake) = woken(&mut pending) {
                return Some(wake);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            pending = self.0.changed.wait_timeout(pending, deadline - now).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Wait until `deadline`, or until a stop, a retune or a swap notice arrives. A stop
    /// wins over the others; a retune or swap notice is taken by the wait that returns it.
    pub fn wait_until(&self, deadline: Instant) -> Wake {
        self.wait(deadline, |pending| {
            if pending.stop {
                Some(Wake::Stop)
            } else if std::mem::take(&mut pending.retune) {
                Some(Wake::Retune)
            } else if std::mem::take(&mut pending.swap) {
                Some(Wake::Swap)
            } else {
                None
            }
        })
        .unwrap_or(Wake::Deadline)
    }

    /// Sleep for `duration` unless a stop arrives first; whether it did. Retune and swap
    /// notices do not end this wait (they stay pending for the loop).
    pub fn sleep(&self, duration: Duration) -> bool {
        self.wait(Instant::now() + duration, |pending| pending.stop.then_some(())).is_some()
    }

    /// SIGINT and SIGTERM ask for a stop, SIGHUP for a retune, from a thread that lives as
    /// long as the process.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let control = self.clone();
        std::thread::Builder::new().name("sluice-signals".into()).spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => control.retune(),
                    _ => control.stop(),
                }
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_ends_a_long_wait_at_once_and_stays_asked_for() {
        let control = Control::new();
        let other = control.clone();
        let started = Instant::now();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.stop();
        });
        assert_eq!(control.wait_until(Instant::now() + Duration::from_secs(60)), Wake::Stop);
        assert!(control.sleep(Duration::from_secs(60)));
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(control.wait_until(Instant::now()), Wake::Stop);
        stopper.join().unwrap();
    }

    #[test]
    fn a_retune_or_swap_notice_is_returned_once_and_does_not_end_a_sleep() {
        let control = Control::new();
        control.retune();
        assert!(!control.sleep(Duration::from_millis(1)), "a retune is not a stop");
        assert_eq!(control.wait_until(Instant::now() + Duration::from_secs(60)), Wake::Retune);
        assert_eq!(control.wait_until(Instant::now()), Wake::Deadline);
        control.swap_ready();
        assert_eq!(control.wait_until(Instant::now() + Duration::from_secs(60)), Wake::Swap);
        assert_eq!(control.wait_until(Instant::now()), Wake::Deadline);
        control.retune();
        assert!(control.take_retune());
        assert!(!control.take_retune());
    }

    #[test]
    fn a_wait_without_notices_lasts_until_its_deadline() {
        let control = Control::new();
        let started = Instant::now();
        assert_eq!(control.wait_until(started + Duration::from_millis(30)), Wake::Deadline);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(!control.sleep(Duration::from_millis(5)));
    }
}
