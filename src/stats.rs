//! Counters since open, per namespace.

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

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claims: AtomicU64,
    pub(crate) duplicates_pending: AtomicU64,
    pub(crate) duplicates_done: AtomicU64,
    pub(crate) fingerprint_conflicts: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) late_completions: AtomicU64,
    pub(crate) releases: AtomicU64,
    pub(crate) lease_conflicts: AtomicU64,
    pub(crate) swept: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            claims: self.claims.load(Relaxed),
            duplicates_pending: self.duplicates_pending.load(Relaxed),
            duplicates_done: self.duplicates_done.load(Relaxed),
            fingerprint_conflicts: self.fingerprint_conflicts.load(Relaxed),
            completions: self.completions.load(Relaxed),
            late_completions: self.late_completions.load(Relaxed),
            releases: self.releases.load(Relaxed),
            lease_conflicts: self.lease_conflicts.load(Relaxed),
            swept: self.swept.load(Relaxed),
            ..Stats::default()
        }
    }
}
