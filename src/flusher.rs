//! Group commit: many waiting writers, one flush.
//!
//! sled's `flush()` calls do not coalesce (each caller pays for its own
//! sync) and `flush_async` deadlocks in sled 0.34.7 with many callers, so a
//! single thread owns flushing. Writers register for the *next* flush to
//! start and wait on a watch channel; every flush covers all writes that
//! completed before it started.
//!
//! Epochs: `next` is the number the next flush will carry. A writer whose
//! write has completed reads `next` (under the lock) and waits for
//! `durable >= next`. The flusher takes `next` and increments it under the
//! same lock *before* flushing, so a flush numbered `e` starts after every
//! writer that read `e` had finished its write.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Durability;
use crate::error::{Error, Result};

/// Flushes sled and, for `sync`, fdatasyncs its log file.
#[derive(Debug)]
pub(crate) struct Syncer {
    db: sled::Db,
    log: File,
    flushes: AtomicU64,
}

impl Syncer {
    pub(crate) fn new(db: sled::Db, log: File) -> Self {
        Self {
            db,
            log,
            flushes: AtomicU64::new(0),
        }
    }

    /// One flush of everything written so far.
    pub(crate) fn flush(&self, fdatasync: bool) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.db
            .flush()
            .map_err(Error::storage("flushing the database"))?;
        if fdatasync {
            self.log
                .sync_data()
                .map_err(Error::io("fdatasync of the database log"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Plan {
    /// Number the next flush will carry.
    next: u64,
    /// Highest epoch some writer waits for.
    wanted: u64,
    shutdown: bool,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    durable: u64,
    failed: u64,
    error: Option<Arc<str>>,
}

#[derive(Debug)]
struct Shared {
    plan: Mutex<Plan>,
    wake: Condvar,
    dirty: AtomicBool,
}

impl Shared {
    fn plan(&self) -> MutexGuard<'_, Plan> {
        // The lock guards plain integers; a panic elsewhere cannot leave
        // them half-updated, so a poisoned lock is still good.
        self.plan.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns the flushing thread; dropping it stops the thread after one last
/// flush.
#[derive(Debug)]
pub(crate) struct Flusher {
    durability: Durability,
    shared: Arc<Shared>,
    progress: watch::Receiver<Progress>,
    thread: Option<JoinHandle<()>>,
    syncer: Arc<Syncer>,
}

impl Flusher {
    pub(crate) fn start(syncer: Syncer, durability: Durability) -> Result<Self> {
        let shared = Arc::new(Shared {
            plan: Mutex::new(Plan {
                next: 1,
                ..Plan::default()
            }),
            wake: Condvar::new(),
            dirty: AtomicBool::new(false),
        });
        let (tx, progress) = watch::channel(Progress::default());
        let syncer = Arc::new(syncer);
        let thread = {
            let (shared, syncer) = (shared.clone(), syncer.clone());
            std::thread::Builder::new()
                .name("sled-idempotency-flusher".into())
                .spawn(move || match durability {
                    Durability::Sync => group_commit(&shared, &syncer, &tx, true),
                    Durability::Flush => group_commit(&shared, &syncer, &tx, false),
                    Durability::Periodic(period) => periodic(&shared, &syncer, period),
                })
                .map_err(Error::io("starting the flusher thread"))?
        };
        Ok(Self {
            durability,
            shared,
            progress,
            thread: Some(thread),
            syncer,
        })
    }

    /// Returns once the write that just completed is as durable as the
    /// configured [`Durability`] promises.
    pub(crate) async fn write_completed(&self) -> Result<()> {
        if let Durability::Periodic(_) = self.durability {
            self.shared.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        let epoch = {
            let mut plan = self.shared.plan();
            plan.wanted = plan.wanted.max(plan.next);
            self.shared.wake.notify_one();
            plan.next
        };
        let mut progress = self.progress.clone();
        let seen = progress
            .wait_for(|p| p.durable >= epoch || p.failed >= epoch)
            .await
            .map_err(|_| Error::Closed)?;
        if seen.durable >= epoch {
            Ok(())
        } else {
            let why = seen.error.as_deref().unwrap_or("unknown error").to_owned();
            Err(Error::Durability(why))
        }
    }

    /// Flushes run so far (group commits, periodic flushes, final flushes).
    pub(crate) fn flushes(&self) -> u64 {
        self.syncer.flushes.load(Ordering::Relaxed)
    }

    /// Stops the thread and makes everything written so far durable
    /// (flush and fdatasync), whatever the mode. Blocking.
    pub(crate) fn shutdown(&mut self) -> Result<()> {
        self.shared.plan().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread body does not panic; if it somehow did, the final
            // flush below still runs.
            let _ = thread.join();
        }
        self.syncer.flush(true)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(e) = self.shutdown()
        {
            tracing::error!(error = %e, "final flush on drop failed");
        }
    }
}

fn group_commit(shared: &Shared, syncer: &Syncer, tx: &watch::Sender<Progress>, fdatasync: bool) {
    loop {
        let epoch = {
            let mut plan = shared.plan();
            while plan.wanted < plan.next && !plan.shutdown {
                plan = shared
                    .wake
                    .wait(plan)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if plan.wanted < plan.next {
                return; // shut down with nobody waiting
            }
            plan.next += 1;
            plan.next - 1
        };
        let result = syncer.flush(fdatasync);
        tx.send_modify(|p| match result {
            Ok(()) => p.durable = epoch,
            Err(e) => {
                tracing::error!(error = %e, "group commit flush failed");
                p.failed = epoch;
                p.error = Some(e.to_string().into());
            }
        });
    }
}

fn periodic(shared: &Shared, syncer: &Syncer, period: Duration) {
    let mut plan = shared.plan();
    while !plan.shutdown {
        plan = shared
            .wake
            .wait_timeout(plan, period)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if shared.dirty.swap(false, Ordering::AcqRel) {
            drop(plan);
            if let Err(e) = syncer.flush(true) {
                tracing::error!(error = %e, "periodic flush failed");
            }
            plan = shared.plan();
        }
    }
}
