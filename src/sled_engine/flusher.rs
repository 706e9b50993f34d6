//! Group commit and the I/O-failure latch: many waiting writers, one flush;
//! after any failed flush, no write is ever acknowledged again.
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
//!
//! The latch: after a failed flush or fdatasync, Linux may have dropped the
//! dirty pages that failed, and sled recovers only a prefix of its log, so a
//! hole can swallow every later write. The first failure (a failed flush in
//! any mode, a panic of the flusher thread, or a durability wait that ran
//! out) is recorded once and for good: the flusher stops, writers still
//! waiting fail, and every later write fails before it starts. Only a
//! reopen, which recovers what sled recovers, clears it.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Durability;
use crate::error::{Error, Result};

use super::expiry::Expiries;

/// Flushes sled and, for `sync`, fdatasyncs its log file.
#[derive(Debug)]
pub(crate) struct Syncer {
    db: sled::Db,
    log: File,
    expiries: Arc<Expiries>,
    flushes: AtomicU64,
    /// Fault seam: faults injected into the next flush.
    #[cfg(any(test, feature = "fault-injection"))]
    faults: Mutex<Vec<Fault>>,
}

/// A fault the unit tests and the model fuzz target inject into one flush.
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Fault {
    /// The flush fails as a failed fdatasync would.
    Fail,
    /// The flush hangs this long first.
    Stall(Duration),
    /// The flusher thread panics.
    Panic,
}

impl Syncer {
    pub(crate) fn new(db: sled::Db, log: File, expiries: Arc<Expiries>) -> Self {
        Self {
            db,
            log,
            expiries,
            flushes: AtomicU64::new(0),
            #[cfg(any(test, feature = "fault-injection"))]
            faults: Mutex::new(Vec::new()),
        }
    }

    /// One flush of everything written so far, the expiry notes gathered
    /// so far first.
    pub(crate) fn flush(&self, fdatasync: bool) -> Result<()> {
        self.expiries.write()?;
        self.flush_only(fdatasync)
    }

    /// A group commit: writes the expiry notes only once many wait, so a
    /// lone writer's claim does not pay an index insert per flush (the
    /// notes reach the index with a later flush, a sweep or the close).
    fn group_flush(&self, fdatasync: bool) -> Result<()> {
        self.expiries.write_if_many()?;
        self.flush_only(fdatasync)
    }

    fn flush_only(&self, fdatasync: bool) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        #[cfg(any(test, feature = "fault-injection"))]
        {
            let fault = self.faults.lock().ok().and_then(|mut f| f.pop());
            match fault {
                Some(Fault::Fail) => {
                    return Err(Error::io("fdatasync of the database log")(
                        std::io::Error::other("injected I/O error"),
                    ));
                }
                Some(Fault::Stall(d)) => std::thread::sleep(d),
                Some(Fault::Panic) => panic!("injected panic in the flusher"),
                None => {}
            }
        }
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
    /// The periodic thread should flush without waiting out its period.
    flush_now: bool,
    shutdown: bool,
    /// Writers waiting for the next flush (its group-commit size).
    #[cfg(feature = "metrics")]
    waiting: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    durable: u64,
    failed: bool,
}

#[derive(Debug)]
struct Shared {
    plan: Mutex<Plan>,
    wake: Condvar,
    dirty: AtomicBool,
    progress: watch::Sender<Progress>,
    /// The first I/O failure; set once, never cleared.
    failure: OnceLock<Arc<str>>,
    #[cfg(feature = "metrics")]
    meters: crate::metrics::FlushMeters,
}

impl Shared {
    fn plan(&self) -> MutexGuard<'_, Plan> {
        // The lock guards plain integers; a panic elsewhere cannot leave
        // them half-updated, so a poisoned lock is still good.
        self.plan.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Latches the store: records `cause` (the first one wins) and wakes
    /// every waiting writer.
    fn fail(&self, cause: &str) {
        if self.failure.set(cause.into()).is_ok() {
            #[cfg(feature = "metrics")]
            self.meters.io_failures.increment(1);
            tracing::error!(
                cause,
                "the store accepts no more writes until the database is reopened"
            );
        }
        self.progress.send_modify(|p| p.failed = true);
    }

    fn check(&self) -> Result<()> {
        match self.failure.get() {
            Some(cause) => Err(Error::PreviousIo {
                cause: cause.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// Owns the flushing thread. Dropping it stops the thread without a final
/// flush; [`Flusher::shutdown`] flushes.
#[derive(Debug)]
pub(crate) struct Flusher {
    durability: Durability,
    timeout: Duration,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    syncer: Arc<Syncer>,
}

impl Flusher {
    pub(crate) fn start(syncer: Syncer, durability: Durability, timeout: Duration) -> Result<Self> {
        let shared = Arc::new(Shared {
            plan: Mutex::new(Plan {
                next: 1,
                ..Plan::default()
            }),
            wake: Condvar::new(),
            dirty: AtomicBool::new(false),
            progress: watch::channel(Progress::default()).0,
            failure: OnceLock::new(),
            #[cfg(feature = "metrics")]
            meters: crate::metrics::FlushMeters::new(durability),
        });
        let syncer = Arc::new(syncer);
        let thread = {
            let (shared, syncer) = (shared.clone(), syncer.clone());
            std::thread::Builder::new()
                .name("sled-idempotency-flusher".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| match durability {
                        Durability::Sync => group_commit(&shared, &syncer, true),
                        Durability::Flush => group_commit(&shared, &syncer, false),
                        Durability::Periodic(period) => periodic(&shared, &syncer, period),
                    });
                    if std::panic::catch_unwind(run).is_err() {
                        shared.fail("the flusher thread panicked");
                    }
                })
                .map_err(Error::io("starting the flusher thread"))?
        };
        Ok(Self {
            durability,
            timeout,
            shared,
            thread: Some(thread),
            syncer,
        })
    }

    /// Latches the store with `cause` (a failed write, say).
    pub(crate) fn fail(&self, cause: &str) {
        self.shared.fail(cause);
    }

    /// Fails with [`Error::PreviousIo`] once the store is latched. Every
    /// operation that may write calls it before writing.
    pub(crate) fn check(&self) -> Result<()> {
        self.shared.check()
    }

    /// Returns once the write that just completed is as durable as the
    /// configured [`Durability`] promises. Fails, and latches the store,
    /// when that cannot be had: the flush failed, or it did not finish
    /// within the durability timeout (the write's fate is then unknown).
    pub(crate) async fn write_completed(&self) -> Result<()> {
        self.check()?;
        if let Durability::Periodic(_) = self.durability {
            self.shared.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let mut progress = self.shared.progress.subscribe();
        let epoch = {
            let mut plan = self.shared.plan();
            plan.wanted = plan.wanted.max(plan.next);
            #[cfg(feature = "metrics")]
            {
                plan.waiting += 1;
            }
            self.shared.wake.notify_one();
            plan.next
        };
        let wait = progress.wait_for(|p| p.durable >= epoch || p.failed);
        let durable = match tokio::time::timeout(self.timeout, wait).await {
            // The sender lives in `shared`, which outlives this call.
            Ok(seen) => seen.map(|p| p.durable >= epoch).unwrap_or(false),
            Err(_) => {
                self.shared.fail(&format!(
                    "a flush did not finish within the durability timeout of {:?}",
                    self.timeout
                ));
                return Err(Error::DurabilityTimeout {
                    waited: self.timeout,
                });
            }
        };
        // A write covered by a flush that succeeded before the failure is
        // durable; any other is not acknowledged.
        if !durable {
            return self.check();
        }
        #[cfg(feature = "metrics")]
        self.shared
            .meters
            .durability_wait
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Has the periodic flush run soon, without waiting out its period
    /// (many expiry notes wait for it); group commits flush soon anyway.
    /// Never blocks.
    pub(crate) fn flush_soon(&self) {
        if let Durability::Periodic(_) = self.durability {
            self.shared.plan().flush_now = true;
            self.shared.dirty.store(true, Ordering::Release);
            self.shared.wake.notify_one();
        }
    }

    /// Flushes and fdatasyncs everything written so far on the calling
    /// thread, whatever the mode (for admin writes: an import, a raised
    /// token floor). Blocking. A failure latches the store.
    pub(crate) fn sync_blocking(&self) -> Result<()> {
        self.check()?;
        if let Err(e) = self.syncer.flush(true) {
            self.shared.fail(&e.to_string());
        }
        self.check()
    }

    /// Flushes run so far (group commits, periodic flushes, final flushes).
    pub(crate) fn flushes(&self) -> u64 {
        self.syncer.flushes.load(Ordering::Relaxed)
    }

    /// Fault seam: the next flush meets `fault`.
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) fn inject(&self, fault: Fault) {
        if let Ok(mut faults) = self.syncer.faults.lock() {
            faults.push(fault);
        }
    }

    /// Fault seam: faults injected and not met yet.
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) fn injected(&self) -> usize {
        self.syncer.faults.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Fault seam: has the flusher thread run one more flush now, in any
    /// mode, and returns once it has succeeded or latched the store.
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) async fn flush_now(&self) -> Result<()> {
        let mut progress = self.shared.progress.subscribe();
        let epoch = {
            let mut plan = self.shared.plan();
            if plan.shutdown {
                return self.check();
            }
            plan.wanted = plan.wanted.max(plan.next);
            plan.flush_now = true;
            self.shared.dirty.store(true, Ordering::Release);
            self.shared.wake.notify_one();
            plan.next
        };
        let seen = progress.wait_for(|p| p.durable >= epoch || p.failed).await;
        match seen.map(|p| p.durable >= epoch) {
            Ok(true) => Ok(()),
            _ => self.check(),
        }
    }

    /// Stops the thread and makes everything written so far durable
    /// (flush and fdatasync), whatever the mode. Blocking. A latched store
    /// is not flushed again: it reports the failure that latched it.
    pub(crate) fn shutdown(&mut self) -> Result<()> {
        self.stop();
        self.check()?;
        if let Err(e) = self.syncer.flush(true) {
            self.shared.fail(&e.to_string());
        }
        self.check()
    }

    fn stop(&mut self) {
        self.shared.plan().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic of the thread body was caught and latched already.
            let _ = thread.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn group_commit(shared: &Shared, syncer: &Syncer, fdatasync: bool) {
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
            #[cfg(feature = "metrics")]
            shared
                .meters
                .group_commit_size
                .record(std::mem::take(&mut plan.waiting) as f64);
            plan.next - 1
        };
        match syncer.group_flush(fdatasync) {
            Ok(()) => shared.progress.send_modify(|p| p.durable = epoch),
            Err(e) => return shared.fail(&e.to_string()),
        }
    }
}

fn periodic(shared: &Shared, syncer: &Syncer, period: Duration) {
    let mut plan = shared.plan();
    while !plan.shutdown {
        if !std::mem::take(&mut plan.flush_now) {
            plan = shared
                .wake
                .wait_timeout(plan, period)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if shared.dirty.swap(false, Ordering::AcqRel) {
            // Numbered like group commits, though no writer waits for them.
            plan.next += 1;
            let epoch = plan.next - 1;
            drop(plan);
            if let Err(e) = syncer.flush(true) {
                return shared.fail(&e.to_string());
            }
            shared.progress.send_modify(|p| p.durable = epoch);
            plan = shared.plan();
        }
    }
}
