//! Counters since open, per namespace, and (feature `metrics`) the same
//! counts reported through the `metrics` facade.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::count::{COUNTS, Count};
use crate::record::State;

/// What one namespace has seen since the store was opened, and what it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Claims that acquired the key (`Claimed`).
    pub claims: u64,
    /// Claims that found a live pending claim (`AlreadyPending`).
    pub duplicates_pending: u64,
    /// Claims that found the message done (`AlreadyDone`).
    pub duplicates_done: u64,
    /// Claims whose payload fingerprint differed from the live record's.
    pub fingerprint_conflicts: u64,
    /// Pending claims turned done (`mark_done`, `complete`).
    pub completions: u64,
    /// `mark_done` calls that found no claim (absent or expired done key).
    pub late_completions: u64,
    /// Pending claims removed (`release`, `abandon`).
    pub releases: u64,
    /// Lease operations refused because the record no longer held the lease.
    pub lease_conflicts: u64,
    /// Expired records removed by the sweeper.
    pub swept: u64,
    /// Claims made to wait before they were acknowledged because the
    /// sweeper had fallen more than two sweep intervals behind
    /// (back-pressure: see "The sweeper" in docs/durability.md).
    pub claims_slowed: u64,
    /// Pending records stored now, live or expired and not swept yet. Kept
    /// up to date by every write, not counted by a scan: `stats` reads no
    /// record. (`Admin::census` counts live and expired records exactly,
    /// with a scan.)
    pub records_pending: u64,
    /// Done records stored now, as `records_pending`.
    pub records_done: u64,
    /// Are `records_pending` and `records_done` exact? They are, except
    /// after an open that did not follow a clean close (a crash): then they
    /// count only part of the namespace until the sweeper's first full scan
    /// has counted every stored record (it runs one `sweep_interval` after
    /// open, or at a `sweep_expired()` call), while writers go on; from
    /// then on they are exact again. A close before that scan finished
    /// stores no counts, and the next open counts again.
    pub records_exact: bool,
    /// Flushes run by the group-commit flusher (whole database).
    pub flushes: u64,
}

/// Records stored in one namespace, by state: moved by every write that
/// changes what a key holds, so that no scan is needed to know them.
///
/// After a crash the counts are unknown: they start at zero and a counting
/// scan (the sweeper's first full scan) counts the stored records, while
/// writers go on. To count every key once, the scan and the writers split
/// the keyspace: the scan counts the keys in `(passed, end]` — `end` is the
/// last key when the counting began, `passed` the last key it counted — and
/// a writer moves the counts only for a key outside that span, which the
/// scan has counted or will never read. A writer holds [`Stored::pass`]
/// from before its write until it has moved the counts; the scan holds the
/// span for writing while it reads and counts a batch, so no write lands
/// between the scan's read of a key and its moving of `passed`. An
/// interrupted scan leaves the span where it was: the next one goes on
/// counting only the keys after `passed`. A close before the count
/// finishes stores no counts, and the next open counts again.
#[derive(Debug)]
pub(crate) struct Stored {
    pending: AtomicI64,
    done: AtomicI64,
    /// A recount has not finished: writers consult `span`.
    recounting: AtomicBool,
    span: RwLock<Recount>,
}

/// Where a recount stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recount {
    /// No counting batch ran yet: every stored key will be read by the scan.
    NotBegun,
    /// The scan counts the keys in `(passed, end]` (an empty `passed` is
    /// before every key); writers count the others.
    Counting { passed: Vec<u8>, end: Vec<u8> },
    /// The counts are exact.
    Finished,
}

impl Recount {
    /// Does a write of `key` move the counts now?
    fn writer_counts(&self, key: &[u8]) -> bool {
        match self {
            Recount::NotBegun => false,
            Recount::Counting { passed, end } => key <= &passed[..] || key > &end[..],
            Recount::Finished => true,
        }
    }
}

/// What a writer holds while it writes a key and moves the counts.
pub(crate) type Pass<'a> = Option<RwLockReadGuard<'a, Recount>>;

impl Stored {
    /// Exact counts (`pending`, `done`), or unknown ones (`None`) that a
    /// counting scan must count.
    pub(crate) fn new(counts: Option<(u64, u64)>) -> Self {
        let stored = Stored {
            pending: AtomicI64::new(0),
            done: AtomicI64::new(0),
            recounting: AtomicBool::new(counts.is_none()),
            span: RwLock::new(match counts {
                Some(_) => Recount::Finished,
                None => Recount::NotBegun,
            }),
        };
        if let Some((pending, done)) = counts {
            stored.add(State::Pending, pending);
            stored.add(State::Done, done);
        }
        stored
    }

    fn of(&self, state: State) -> &AtomicI64 {
        match state {
            State::Pending => &self.pending,
            State::Done => &self.done,
        }
    }

    /// Are the counts still being counted (after a crash)?
    pub(crate) fn recounting(&self) -> bool {
        self.recounting.load(SeqCst)
    }

    /// What a writer holds from before its write until it has moved the
    /// counts: nothing once the counts are exact. Costs a writer one atomic
    /// load then (no future is made).
    pub(crate) fn pass(&self) -> Option<impl Future<Output = RwLockReadGuard<'_, Recount>>> {
        self.recounting().then(|| self.span.read())
    }

    /// [`pass`](Self::pass), on a blocking thread.
    pub(crate) fn pass_blocking(&self) -> Pass<'_> {
        match self.recounting() {
            true => Some(self.span.blocking_read()),
            false => None,
        }
    }

    /// `key` went from holding `from` to holding `to` (`None`: absent),
    /// written while holding `pass`.
    pub(crate) fn moved(
        &self,
        pass: &Pass<'_>,
        key: &[u8],
        from: Option<State>,
        to: Option<State>,
    ) {
        if from == to || pass.as_ref().is_some_and(|span| !span.writer_counts(key)) {
            return;
        }
        if let Some(state) = from {
            self.of(state).fetch_sub(1, Relaxed);
        }
        if let Some(state) = to {
            self.of(state).fetch_add(1, Relaxed);
        }
    }

    /// For a counting batch, on a blocking thread: the span, held until the
    /// batch has counted; `None` when the counts are exact.
    pub(crate) fn counting(&self) -> Option<RwLockWriteGuard<'_, Recount>> {
        if !self.recounting() {
            return None;
        }
        let span = self.span.blocking_write();
        (*span != Recount::Finished).then_some(span)
    }

    /// The counting batch holding `span` read `key` holding `state`
    /// (`None`: it removed the record it read, or the value did not
    /// decode): counts it if the scan has not yet.
    pub(crate) fn counted(
        &self,
        span: &Recount,
        key: &[u8],
        state: Option<State>,
        removed: Option<State>,
    ) {
        let Recount::Counting { passed, .. } = span else {
            return;
        };
        if key > &passed[..] {
            if let Some(state) = state {
                self.add(state, 1);
            }
        } else if let Some(state) = removed {
            self.of(state).fetch_sub(1, Relaxed);
        }
    }

    /// The counting batch holding `span` has counted up to `last`
    /// (inclusive), or to the end of its span (`last` is `None`); returns
    /// whether the counts are exact now.
    pub(crate) fn passed(&self, span: &mut Recount, last: Option<&[u8]>) -> bool {
        if let (Recount::Counting { passed, end }, Some(last)) = (&mut *span, last)
            && last < &end[..]
        {
            if last > &passed[..] {
                *passed = last.to_vec();
            }
            return false;
        }
        *span = Recount::Finished;
        self.recounting.store(false, SeqCst);
        true
    }

    fn add(&self, state: State, n: u64) {
        self.of(state)
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Relaxed);
    }

    /// Pending and done records (while a recount runs they count only
    /// part of the keyspace; never below zero).
    pub(crate) fn get(&self) -> (u64, u64) {
        let get = |a: &AtomicI64| u64::try_from(a.load(Relaxed)).unwrap_or(0);
        (get(&self.pending), get(&self.done))
    }
}

/// One namespace's counters.
#[derive(Debug)]
pub struct Counters {
    counts: [AtomicU64; COUNTS],
    #[cfg(feature = "metrics")]
    meters: crate::metrics::Meters,
}

impl Counters {
    /// Counters of `namespace` in a store opened with `durability`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(namespace: &str, durability: crate::Durability) -> Self {
        Self {
            counts: Default::default(),
            #[cfg(feature = "metrics")]
            meters: crate::metrics::Meters::new(namespace, durability),
        }
    }

    pub(crate) fn add(&self, count: Count, n: u64) {
        self.counts[count as usize].fetch_add(n, Relaxed);
        #[cfg(feature = "metrics")]
        self.meters.count(count, n);
    }

    pub(crate) fn bump(&self, count: Count) {
        self.add(count, 1);
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn meters(&self) -> &crate::metrics::Meters {
        &self.meters
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |count: Count| self.counts[count as usize].load(Relaxed);
        Stats {
            claims: get(Count::Claims),
            duplicates_pending: get(Count::DuplicatesPending),
            duplicates_done: get(Count::DuplicatesDone),
            fingerprint_conflicts: get(Count::FingerprintConflicts),
            completions: get(Count::Completions),
            late_completions: get(Count::LateCompletions),
            releases: get(Count::Releases),
            lease_conflicts: get(Count::LeaseConflicts),
            swept: get(Count::Swept),
            claims_slowed: get(Count::Slowed),
            ..Stats::default()
        }
    }
}
