//! The checkpoint writer: checkpoints committed in order, on a thread of their own while
//! the next batch runs.

use super::{Checkpoint, CheckpointError, CheckpointStore};

/// How a [`CheckpointWriter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// On a thread of its own while the next batch runs (what `sluice run` does).
    #[default]
    Background,
    /// At once, on the caller's thread: as if the writer thread were always done first.
    Inline,
    /// On the caller's thread, but only when the next checkpoint is handed over or the run
    /// ends: as if the writer thread were always done last. With [`WriteMode::Inline`]
    /// these are the two ends of what the background thread can do, in a deterministic
    /// order (the crash simulation runs both).
    Deferred,
}

/// Commits checkpoints one at a time and in order; by default on a thread of its own, so
/// that the next batch runs while a checkpoint is encoded, hashed, written (fsynced) and
/// old ones pruned. At most one checkpoint is in flight: handing over the next waits for it.
///
/// A crash while one is in flight loses nothing: that batch's plan is in the offset log,
/// so recovery restores the checkpoint before it and replays the batch (a sink that already
/// committed its output is not written again).
pub struct CheckpointWriter {
    mode: Writing,
    /// A checkpoint failed: no later one is taken (the thread stops too).
    failed: bool,
}

enum Writing {
    Thread {
        jobs: Option<std::sync::mpsc::SyncSender<Checkpoint>>,
        results: std::sync::mpsc::Receiver<Result<(), CheckpointError>>,
        in_flight: bool,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    Caller {
        store: std::sync::Arc<CheckpointStore>,
        deferred: bool,
        pending: Option<Checkpoint>,
    },
}

impl CheckpointWriter {
    /// Start the writer thread for `store`.
    pub fn start(store: std::sync::Arc<CheckpointStore>) -> Self {
        Self::new(store, WriteMode::Background)
    }

    /// A writer for `store` that writes as `mode` says.
    pub fn new(store: std::sync::Arc<CheckpointStore>, mode: WriteMode) -> Self {
        let mode = match mode {
            WriteMode::Background => {
                let (jobs, inbox) = std::sync::mpsc::sync_channel::<Checkpoint>(1);
                let (report, results) = std::sync::mpsc::sync_channel(1);
                let thread = std::thread::Builder::new()
                    .name("sluice-checkpoint".into())
                    .spawn(move || {
                        for checkpoint in inbox {
                            let result = store.commit(&checkpoint);
                            let failed = result.is_err();
                            if report.send(result).is_err() || failed {
                                return;
                            }
                        }
                    })
                    .expect("spawn the checkpoint thread");
                Writing::Thread { jobs: Some(jobs), results, in_flight: false, thread: Some(thread) }
            }
            WriteMode::Inline => Writing::Caller { store, deferred: false, pending: None },
            WriteMode::Deferred => Writing::Caller { store, deferred: true, pending: None },
        };
        Self { mode, failed: false }
    }

    /// Wait for the checkpoint handed over before (failing with its error), then hand
    /// over `checkpoint`.
    pub fn commit(&mut self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        self.flush()?;
        if self.failed {
            return Err(CheckpointError::WriterGone);
        }
        match &mut self.mode {
            Writing::Thread { jobs, in_flight, .. } => {
                let jobs = jobs.as_ref().expect("jobs close only on drop");
                jobs.send(checkpoint).map_err(|_| CheckpointError::WriterGone)?;
                *in_flight = true;
            }
            Writing::Caller { pending, deferred: true, .. } => *pending = Some(checkpoint),
            Writing::Caller { store, deferred: false, .. } => {
                let result = store.commit(&checkpoint);
                self.failed = result.is_err();
                result?;
            }
        }
        Ok(())
    }

    /// Wait until the checkpoint handed over last is committed.
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        let result = match &mut self.mode {
            Writing::Thread { results, in_flight, .. } => {
                if !std::mem::take(in_flight) {
                    return Ok(());
                }
                results.recv().unwrap_or(Err(CheckpointError::WriterGone))
            }
            Writing::Caller { store, pending, .. } => match pending.take() {
                Some(checkpoint) => store.commit(&checkpoint),
                None => return Ok(()),
            },
        };
        self.failed = result.is_err();
        result
    }
}

impl Drop for CheckpointWriter {
    /// Let the checkpoint in flight finish (a deferred one is dropped, as a crash would).
    fn drop(&mut self) {
        if let Writing::Thread { jobs, thread, .. } = &mut self.mode {
            *jobs = None;
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}
