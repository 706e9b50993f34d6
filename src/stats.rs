//! Counters since open, per namespace, and (feature `metrics`) the same
//! counts reported through the `metrics` facade.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::record::State;

/// What one namespace has seen since the store was opened, and what it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// Pending records stored now, live or expired and not swept yet. Kept
    /// up to date by every write, not counted by a scan: `stats` reads no
    /// record. (`Admin::census` counts live and expired records exactly,
    /// with a scan.)
    pub records_pending: u64,
    /// Done records stored now, as `records_pending`.
    pub records_done: u64,
    /// Are `records_pending` and `records_done` exact? They are when every
    /// open since the database was created followed a clean close (or a
    /// drop). After a crash the first sweep recounts them with its full
    /// scan while writers go on, so they become estimates (writes that land
    /// during that scan may be counted twice or missed), and stay labelled
    /// so.
    pub records_exact: bool,
    /// Flushes run by the group-commit flusher (whole database).
    pub flushes: u64,
}

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Claims,
    DuplicatesPending,
    DuplicatesDone,
    FingerprintConflicts,
    Completions,
    LateCompletions,
    Releases,
    LeaseConflicts,
    Swept,
}

/// Records stored in one namespace, by state: moved by every write that
/// changes what a key holds, so that no scan is needed to know them.
#[derive(Debug, Default)]
pub(crate) struct Stored {
    pending: AtomicI64,
    done: AtomicI64,
}

impl Stored {
    fn of(&self, state: State) -> &AtomicI64 {
        match state {
            State::Pending => &self.pending,
            State::Done => &self.done,
        }
    }

    /// A key went from holding `from` to holding `to` (`None`: absent).
    pub(crate) fn moved(&self, from: Option<State>, to: Option<State>) {
        if from == to {
            return;
        }
        if let Some(state) = from {
            self.of(state).fetch_sub(1, Relaxed);
        }
        if let Some(state) = to {
            self.of(state).fetch_add(1, Relaxed);
        }
    }

    /// `n` more records in `state` (a recount).
    pub(crate) fn add(&self, state: State, n: u64) {
        self.of(state)
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Relaxed);
    }

    /// Pending and done records (an estimate can dip below zero while a
    /// recount runs: shown as zero).
    pub(crate) fn get(&self) -> (u64, u64) {
        let get = |a: &AtomicI64| u64::try_from(a.load(Relaxed)).unwrap_or(0);
        (get(&self.pending), get(&self.done))
    }
}

/// Number of [`Count`]s.
pub(crate) const COUNTS: usize = 9;

/// One namespace's counters.
#[derive(Debug)]
pub(crate) struct Counters {
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
            ..Stats::default()
        }
    }
}
