//! The background task that removes expired records.
//!
//! Correctness never depends on it: it removes only records that every
//! operation already treats as absent (`machine::sweepable`), so whether or
//! not it ran never changes an outcome. It only keeps the database from
//! growing without bound. Each period it reads the expiry index entries
//! that are due (`expiry`), so its cost grows with what it removes; after
//! an open that did not follow a clean close it first scans the keyspace
//! once (the backstop that completes the index). Both work in bounded
//! batches on a blocking thread and pause between them; a scan stops at
//! the last key present when it began. A record is removed only with a
//! compare-and-swap on the exact bytes inspected, so a key re-claimed
//! between the read and the removal is left alone. The task holds a `Weak`
//! to the store, upgraded for the moment it takes to start each batch and
//! never held across an await.

use std::ops::AddAssign;
use std::sync::Weak;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use sled::IVec;

use crate::error::{Error, Result};
use crate::machine::{self, Retention};
use crate::record::{Record, State};

use super::keyspace::{display_key, remove};

/// What the sweeper drives: the store, one batch at a time. Each batch is
/// a job for a blocking thread that holds no reference to the store.
pub(crate) trait Sweep: Send + Sync + 'static {
    /// The next batch of a sweep of the namespace at `index` from `cursor`
    /// on; `None` when there is no namespace at `index` (every namespace
    /// swept).
    fn batch(
        &self,
        index: usize,
        cursor: Cursor,
    ) -> Option<impl FnOnce() -> Result<Batch> + Send + 'static>;

    /// The next batch of due expiry index entries from `cursor` on; its
    /// `next` is `Some` while more are due.
    fn due(&self, cursor: Cursor) -> impl FnOnce() -> Result<Batch> + Send + 'static;

    /// Must a full scan run (an incomplete expiry index, or record counts
    /// not finished after a crash)?
    fn needs_scan(&self) -> bool;

    /// Where a full scan starts (`Completeness::epoch`).
    fn scan_epoch(&self) -> u64;

    /// A full scan of every namespace that began at `epoch` has finished.
    fn scanned(&self, epoch: u64);

    /// A batch of due entries is over: it may hold claims back
    /// (`Pressure::after_batch`).
    fn swept(&self, batch: &Batch);

    /// A sweep ended (finished, failed, panicked or stopped): it no longer
    /// holds claims back.
    fn ended(&self);
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Records read.
    pub examined: u64,
    /// Expired records removed.
    pub removed: u64,
    /// Records skipped because their value does not decode (left untouched;
    /// reading such a key reports [`Error::Corrupt`]).
    pub corrupt: u64,
}

impl AddAssign for SweepReport {
    fn add_assign(&mut self, other: Self) {
        self.examined += other.examined;
        self.removed += other.removed;
        self.corrupt += other.corrupt;
    }
}

/// Longest pause between two batches.
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// Pauses after a batch for as long as the batch took (at most
/// [`MAX_PAUSE`]), so that a long sweep sleeps at least as long as it works
/// and claims and the flusher get the disk and the cores between batches.
/// A bare yield was not enough: on a 2-core machine with `Durability::Sync`,
/// claim p99 latency rose 11× during a sweep of 1,000,000 records
/// (`cd compare && cargo run --release -- --only sweep`).
///
/// A sweep that has fallen behind pauses less: once the oldest entry still
/// due is more than two sweep intervals old, the pause shrinks in
/// proportion (`share`, from [`pause_share`]), down to a bare yield, so that a sweeper
/// facing a writer faster than its paced rate catches up instead of
/// letting the database grow without bound.
pub(crate) async fn pace(took: Duration, share: f64) {
    match pause(took, share) {
        Some(pause) => tokio::time::sleep(pause).await,
        None => tokio::task::yield_now().await,
    }
}

/// [`pace`] on the sweeper's blocking thread.
fn pace_blocking(took: Duration, share: f64) {
    match pause(took, share) {
        Some(pause) => std::thread::sleep(pause),
        None => std::thread::yield_now(),
    }
}

/// The pause after a batch that took `took` ([`pace`]); `None`: a bare yield.
fn pause(took: Duration, share: f64) -> Option<Duration> {
    let pause = took.min(MAX_PAUSE).mul_f64(share);
    (pause >= Duration::from_micros(50)).then_some(pause)
}

/// The share of a batch's time a sweep pauses after it, when the oldest
/// entry still due is `behind` (see [`pace`]).
pub(crate) fn pause_share(behind: Duration, interval: Duration) -> f64 {
    let allowed = interval.saturating_mul(2).max(Duration::from_secs(1));
    if behind <= allowed {
        1.0
    } else {
        allowed.as_secs_f64() / behind.as_secs_f64()
    }
}

/// Starts the periodic sweeper: a tokio task that wakes every `interval`
/// and runs each sweep, batch after batch with its pauses, on one blocking
/// thread. A sweep driven batch by batch from the task waited, at every
/// wake-up, behind every writer task of the runtime: with 64 tasks
/// claiming under `Periodic` on two cores it removed 1,668 records/s
/// against 91,408 messages/s (`cd compare && cargo run --release -- --only
/// keepup`). On a thread of its own it gets the operating system's share
/// of the cores instead.
///
/// It holds a `Weak` to the store, upgraded only to start each batch, and
/// a stop signal: it ends at the next batch when the store is closed or
/// dropped; the store's `Drop` never runs on an async worker.
pub(crate) fn spawn<S: Sweep>(
    store: Weak<S>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // A change or a dropped sender both mean: stop.
                _ = stop.changed() => return,
            }
            let job = {
                let (store, stop) = (store.clone(), stop.clone());
                tokio::task::spawn_blocking(move || sweep_once(&store, &stop))
            };
            let step = job.await;
            // However the sweep ended, it no longer holds claims back.
            if let Some(inner) = store.upgrade() {
                inner.ended();
            }
            match step {
                Ok(Step::Done | Step::Retry) => {}
                // sled panics on some damaged data: the next period retries.
                Err(e) if e.is_panic() => {
                    tracing::error!("expiry sweep panicked; retrying next period");
                }
                // Cancelled: the runtime is shutting down.
                Ok(Step::Stop) | Err(_) => return,
            }
        }
    })
}

/// One periodic sweep, on a blocking thread: the full scan when one is
/// needed, then the due expiry index entries.
fn sweep_once<S: Sweep>(store: &Weak<S>, stop: &watch::Receiver<bool>) -> Step {
    let mut total = SweepReport::default();
    let Some(needs_scan) = store.upgrade().map(|inner| inner.needs_scan()) else {
        return Step::Stop;
    };
    if needs_scan {
        match scan_all(store, stop, &mut total) {
            Step::Done => {}
            other => return other,
        }
    }
    let mut cursor = Cursor::default();
    loop {
        if *stop.borrow() {
            return Step::Stop;
        }
        let batch = match store.upgrade() {
            Some(inner) => inner.due(std::mem::take(&mut cursor)),
            None => return Step::Stop,
        };
        match batch() {
            Ok(batch) => {
                if let Some(inner) = store.upgrade() {
                    inner.swept(&batch);
                }
                total += batch.report;
                match batch.next {
                    Some(next) => cursor = next,
                    None => break,
                }
                pace_blocking(batch.took, batch.pause);
            }
            Err(Error::Closed) => return Step::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep stopped early; retrying next period");
                return Step::Retry;
            }
        }
    }
    tracing::debug!(
        examined = total.examined,
        removed = total.removed,
        corrupt = total.corrupt,
        "expiry sweep finished"
    );
    Step::Done
}

/// How a sweep or a full scan ended.
enum Step {
    /// Every namespace scanned, or every due entry swept.
    Done,
    /// The store is closed or dropped.
    Stop,
    /// A batch failed; try again next period.
    Retry,
}

/// The backstop: scans every namespace once, batch by batch, then tells the
/// store the scan is complete.
fn scan_all<S: Sweep>(
    store: &Weak<S>,
    stop: &watch::Receiver<bool>,
    total: &mut SweepReport,
) -> Step {
    let Some(epoch) = store.upgrade().map(|inner| inner.scan_epoch()) else {
        return Step::Stop;
    };
    let (mut index, mut cursor) = (0, Cursor::default());
    loop {
        if *stop.borrow() {
            return Step::Stop;
        }
        let batch = {
            let Some(inner) = store.upgrade() else {
                return Step::Stop;
            };
            let Some(batch) = inner.batch(index, std::mem::take(&mut cursor)) else {
                inner.scanned(epoch); // every namespace swept
                return Step::Done;
            };
            batch
        };
        match batch() {
            Ok(batch) => {
                *total += batch.report;
                match batch.next {
                    Some(next) => cursor = next,
                    None => (index, cursor) = (index + 1, Cursor::default()),
                }
                pace_blocking(batch.took, batch.pause);
            }
            Err(Error::Closed) => return Step::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "expiry scan stopped early; retrying next period");
                return Step::Retry;
            }
        }
    }
}

/// What one batch did, where the sweep of its namespace goes on (`None`:
/// done), and how long it took.
pub(crate) struct Batch {
    pub(crate) report: SweepReport,
    pub(crate) next: Option<Cursor>,
    pub(crate) took: Duration,
    /// The share of `took` to pause after it ([`pace`]): 1 unless the
    /// sweep has fallen behind.
    pub(crate) pause: f64,
}

/// One batch of a sweep: what was read, which records were expired, where to
/// go on from.
pub(crate) struct Scan {
    pub(crate) report: SweepReport,
    /// Expired records as read: key, the exact value bytes, their token
    /// and state.
    pub(crate) expired: Vec<(IVec, IVec, u64, State)>,
    /// The key to continue from, or `None` at the end of the keyspace.
    pub(crate) next: Option<Vec<u8>>,
    /// The last key read.
    pub(crate) last: Option<IVec>,
}

/// Where a sweep of one namespace stands: the next key to read and the
/// last key it will read. The end is fixed when the sweep starts, so keys
/// claimed meanwhile (UUIDv7 ids append at the end of the keyspace) cannot
/// keep a sweep running forever under load.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    pub(crate) from: Vec<u8>,
    pub(crate) end: Option<Vec<u8>>,
    /// A sweep of the expiry index that has fallen behind reads this many
    /// times its batch size per batch (0 or 1: the batch size), as it
    /// pauses that much less ([`batch_scale`]).
    pub(crate) scale: usize,
}

/// Most a sweep that has fallen behind multiplies its batch size by.
const MAX_SCALE: usize = 64;

/// How many times its batch size a sweep reads per batch when it pauses
/// `share` of a batch's time ([`pause_share`]): the less it pauses, the
/// more it does per wake-up, since under load each wake-up waits behind
/// every writer task of the runtime.
pub(crate) fn batch_scale(share: f64) -> usize {
    if share >= 1.0 {
        1
    } else {
        ((1.0 / share.max(1e-9)) as usize).clamp(1, MAX_SCALE)
    }
}

/// Reads up to `batch` records from `cursor` on (up to `end`, inclusive,
/// when given) and picks the forgotten ones; hands every other readable
/// record to `kept`.
pub(crate) fn scan(
    tree: &sled::Tree,
    cursor: &[u8],
    end: Option<&[u8]>,
    batch: usize,
    now: u64,
    rules: Retention,
    kept: &mut dyn FnMut(&[u8], &Record),
) -> Result<Scan> {
    let mut report = SweepReport::default();
    let mut expired = Vec::new();
    let mut last = None;
    let range = match end {
        Some(end) => tree.range(cursor..=end),
        None => tree.range(cursor..),
    };
    for entry in range.take(batch) {
        let (key, value) = entry.map_err(Error::storage("scanning for expired records"))?;
        report.examined += 1;
        match Record::decode(&value) {
            Err(e) => {
                report.corrupt += 1;
                tracing::warn!(key = %display_key(&key), error = %e, "sweeper skipped a corrupted record");
            }
            Ok(record) if machine::sweepable(&record, now, rules) => {
                expired.push((key.clone(), value, record.token, record.state));
            }
            Ok(record) => kept(&key, &record),
        }
        last = Some(key);
    }
    let next = match &last {
        Some(key) if report.examined == batch as u64 && end != Some(&key[..]) => {
            let mut next = key.to_vec();
            next.push(0); // the smallest key after `key`
            Some(next)
        }
        _ => None,
    };
    Ok(Scan {
        report,
        expired,
        next,
        last,
    })
}

/// Removes each record only if it still holds the exact bytes `scan` read:
/// a key re-claimed (or completed) since then is left alone. Raises
/// `removed_tokens` before each removal (the store's fencing guard).
/// Returns the keys removed, with the state each held.
pub(crate) fn remove_unchanged(
    tree: &sled::Tree,
    expired: Vec<(IVec, IVec, u64, State)>,
    removed_tokens: &AtomicU64,
) -> Result<Vec<(IVec, State)>> {
    let mut removed = Vec::new();
    for (key, value, token, state) in expired {
        if remove(tree, &key, &value, token, removed_tokens)?.is_ok() {
            removed.push((key, state));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep pauses as long as it worked until it falls more than two
    /// intervals behind; then less and less, so that it catches up.
    #[test]
    fn a_sweep_that_falls_behind_pauses_less() {
        let minute = Duration::from_secs(60);
        assert_eq!(pause_share(Duration::ZERO, minute), 1.0);
        assert_eq!(pause_share(minute * 2, minute), 1.0);
        assert_eq!(pause_share(minute * 4, minute), 0.5);
        assert!(pause_share(minute * 400, minute) < 0.01);
        assert_eq!(batch_scale(1.0), 1);
        assert_eq!(batch_scale(0.5), 2);
        assert_eq!(batch_scale(0.001), MAX_SCALE);
    }

    /// Expired pending claims forgotten at once, as expired done records.
    const RULES: Retention = Retention {
        done_ms: None,
        default_ttl_ms: 10,
        pending_ms: 0,
    };

    fn record(state: State, expires_at: u64, token: u64) -> Vec<u8> {
        Record {
            state,
            expires_at,
            token,
            attempts: 1,
            ttl_ms: 10,
            fingerprint: None,
            result: None,
        }
        .encode()
    }

    /// A key re-claimed between the sweeper's read and its removal must
    /// survive: removal is a compare-and-swap on the bytes that were read.
    #[test]
    fn a_claim_made_after_the_scan_survives_the_removal() -> Result<()> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(Error::storage("test"))?;
        let tree = db.open_tree("t").map_err(Error::storage("test"))?;
        for (k, state) in [(1u8, State::Pending), (2, State::Done), (3, State::Pending)] {
            tree.insert([k], record(state, 100, u64::from(k)))
                .map_err(Error::storage("test"))?;
        }
        tree.insert([4], record(State::Pending, 1_000, 4))
            .map_err(Error::storage("test"))?;

        let scan = scan(&tree, &[], None, 10, 500, RULES, &mut |_, _| {})?;
        assert_eq!(scan.report.examined, 4);
        assert_eq!(scan.expired.len(), 3, "keys 1, 2, 3 are expired, 4 is live");
        assert!(scan.next.is_none());

        // Between scan and removal: key 1 is claimed afresh, key 3 is completed.
        let fresh = record(State::Pending, 1_500, 9);
        tree.insert([1], fresh.clone())
            .map_err(Error::storage("test"))?;
        tree.insert([3], record(State::Done, 1_500, 3))
            .map_err(Error::storage("test"))?;

        let removed = remove_unchanged(&tree, scan.expired, &AtomicU64::new(0))?;
        assert_eq!(
            removed,
            vec![(IVec::from(&[2u8]), State::Done)],
            "only key 2 is unchanged"
        );
        let get = |k: u8| tree.get([k]).map_err(Error::storage("test"));
        assert_eq!(get(1)?.as_deref(), Some(fresh.as_slice()));
        assert!(get(2)?.is_none());
        assert!(get(3)?.is_some());
        assert!(get(4)?.is_some());
        Ok(())
    }

    #[test]
    fn batches_resume_after_the_last_key_read() -> Result<()> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(Error::storage("test"))?;
        let tree = db.open_tree("t").map_err(Error::storage("test"))?;
        for k in 0u8..5 {
            tree.insert([k], record(State::Done, 100, 1))
                .map_err(Error::storage("test"))?;
        }
        let first = scan(&tree, &[], None, 2, 500, RULES, &mut |_, _| {})?;
        assert_eq!(first.next.as_deref(), Some(&[1u8, 0][..]));
        let second = scan(
            &tree,
            first.next.as_deref().unwrap_or_default(),
            None,
            2,
            500,
            RULES,
            &mut |_, _| {},
        )?;
        assert_eq!(
            second.expired.first().map(|(k, _, _, _)| k.to_vec()),
            Some(vec![2])
        );
        let third = scan(
            &tree,
            second.next.as_deref().unwrap_or_default(),
            None,
            2,
            500,
            RULES,
            &mut |_, _| {},
        )?;
        assert_eq!(third.report.examined, 1);
        assert!(third.next.is_none());
        Ok(())
    }

    /// Regression: under sustained claims of UUIDv7 ids (which append at
    /// the end of the keyspace) an unbounded sweep chased the new keys and
    /// never finished. A sweep stops at the last key present when it began.
    #[test]
    fn a_scan_stops_at_its_end_key() -> Result<()> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(Error::storage("test"))?;
        let tree = db.open_tree("t").map_err(Error::storage("test"))?;
        for k in 0u8..10 {
            tree.insert([k], record(State::Done, 100, 1))
                .map_err(Error::storage("test"))?;
        }
        let scan = scan(&tree, &[], Some(&[4]), 3, 500, RULES, &mut |_, _| {})?;
        assert_eq!(scan.report.examined, 3);
        let rest = super::scan(
            &tree,
            scan.next.as_deref().unwrap_or_default(),
            Some(&[4]),
            3,
            500,
            RULES,
            &mut |_, _| {},
        )?;
        assert_eq!(rest.report.examined, 2, "keys 3 and 4, not beyond the end");
        assert!(rest.next.is_none());
        let exact = super::scan(&tree, &[], Some(&[2]), 3, 500, RULES, &mut |_, _| {})?;
        assert_eq!(exact.report.examined, 3);
        assert!(
            exact.next.is_none(),
            "a batch ending on the end key is the last"
        );
        Ok(())
    }
}
