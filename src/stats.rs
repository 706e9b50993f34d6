//! Counters since open, per namespace, and (feature `metrics`) the same
//! counts reported through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    /// Live pending records now (counted by a scan when `stats` is called).
    pub live_pending: u64,
    /// Live done records now (counted by a scan when `stats` is called).
    pub live_done: u64,
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
