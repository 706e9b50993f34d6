//! Back-pressure from the sweeper to the claims that create records.
//!
//! A sweep costs about as much CPU per record it removes as a claim and a
//! `mark_done` cost together (the random read of each noted key is most of
//! it). Writers that never wait for a disk (`Periodic`, or `Sync` with many
//! tasks) can then create records faster than any share of two cores
//! lets the sweeper remove them, and the database grows without bound. So
//! once the oldest due expiry index entry is more than two sweep intervals
//! old ([`pause_share`](super::sweeper::pause_share) below 1), claims are
//! admitted at most at [`SHARE`] of the rate the sweeper removed records
//! over its last batch: the backlog shrinks until the sweeper is within two
//! intervals again, and then claims run free.
//!
//! The admission is a virtual schedule (GCRA): each claim takes the next
//! slot, `spacing` after the one before, and waits only when its slot is
//! more than [`TOLERANCE`] ahead, so that a writer slower than the limit
//! never waits and one faster sleeps in steps the timer can keep. While
//! the sweeper keeps up, a claim pays one relaxed atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// The share of the sweeper's removal rate that claims are admitted at
/// while it is behind: below 1, so that the backlog shrinks.
const SHARE: f64 = 0.9;

/// How far ahead of now a claim's slot may be before the claim waits.
const TOLERANCE: Duration = Duration::from_millis(2);

/// The longest spacing between two claims (the slowest admission: 100
/// claims/s), for a sweep that removed nothing in its last batch.
const MAX_SPACING: Duration = Duration::from_millis(10);

/// The limit the sweeper sets and every claim reads.
#[derive(Debug)]
pub(crate) struct Pressure {
    origin: Instant,
    /// Nanoseconds between two admitted claims; 0: no limit.
    spacing: AtomicU64,
    /// The next free slot, in nanoseconds since `origin`.
    next: AtomicU64,
    /// Since when the sweep has been behind, and the records it has
    /// removed since then (sweeper side only).
    since: Mutex<Option<(Instant, u64)>>,
}

impl Default for Pressure {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            spacing: AtomicU64::new(0),
            next: AtomicU64::new(0),
            since: Mutex::new(None),
        }
    }
}

impl Pressure {
    /// How long a claim about to create a record must wait first; `None`
    /// while the sweeper keeps up.
    pub(crate) fn admit(&self) -> Option<Duration> {
        if self.spacing.load(Relaxed) == 0 {
            return None;
        }
        self.admit_at(self.nanos())
    }

    /// [`admit`](Self::admit) at `now`, in nanoseconds since `origin`.
    fn admit_at(&self, now: u64) -> Option<Duration> {
        let spacing = self.spacing.load(Relaxed);
        if spacing == 0 {
            return None;
        }
        let mut next = self.next.load(Relaxed);
        loop {
            let slot = next.max(now);
            match self.next.compare_exchange_weak(
                next,
                slot.saturating_add(spacing),
                Relaxed,
                Relaxed,
            ) {
                Ok(_) => {
                    let ahead = Duration::from_nanos(slot - now);
                    return (ahead > TOLERANCE).then_some(ahead);
                }
                Err(seen) => next = seen,
            }
        }
    }

    /// After a batch of the due sweep that removed `removed` records, with
    /// `share` from `pause_share` (1: not behind): sets the limit claims
    /// are admitted at, from the rate the sweep has removed records at
    /// since its first batch behind (one batch's rate varied fourfold
    /// from batch to batch and let writers through at 1.25× the
    /// sweeper's rate).
    pub(crate) fn after_batch(&self, removed: u64, share: f64) {
        let now = Instant::now();
        if share >= 1.0 {
            self.relax();
            return;
        }
        let rate = {
            let mut since = lock(&self.since);
            match &mut *since {
                None => {
                    // The first batch behind starts the measurement.
                    *since = Some((now, 0));
                    return;
                }
                Some((from, total)) => {
                    *total += removed;
                    *total as f64 / now.duration_since(*from).as_secs_f64().max(1e-6)
                }
            }
        };
        let spacing = if rate * SHARE > 0.0 {
            Duration::from_secs_f64(1.0 / (rate * SHARE)).min(MAX_SPACING)
        } else {
            MAX_SPACING
        };
        self.spacing
            .store(spacing.as_nanos().max(1) as u64, Relaxed);
    }

    /// The sweep ended or stopped: claims run free until the next measures
    /// a rate.
    pub(crate) fn relax(&self) {
        *lock(&self.since) = None;
        self.spacing.store(0, Relaxed);
    }

    fn nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_run_free_while_the_sweeper_keeps_up() {
        let pressure = Pressure::default();
        assert_eq!(pressure.admit(), None);
        pressure.after_batch(1_000, 1.0);
        assert_eq!(pressure.admit(), None);
    }

    /// Behind, claims are spaced at the sweeper's removal rate: a burst
    /// of claims soon has to wait, about one spacing per claim.
    #[test]
    fn claims_faster_than_the_sweeper_wait() {
        let pressure = Pressure::default();
        pressure.after_batch(0, 0.5); // starts the measurement
        pressure.spacing.store(1_000_000, Relaxed); // 1 ms: 1,000 claims/s
        let now = 5_000_000;
        let waits: Vec<_> = (0..10).map(|_| pressure.admit_at(now)).collect();
        assert_eq!(waits[0], None, "the first slot is now");
        assert_eq!(waits[2], None, "2 ms ahead is within the tolerance");
        assert_eq!(waits[3], Some(Duration::from_millis(3)));
        assert_eq!(waits[9], Some(Duration::from_millis(9)));
        // A writer slower than the limit never waits.
        let later = now + 20_000_000;
        assert_eq!(pressure.admit_at(later), None);
        assert_eq!(pressure.admit_at(later + 1_000_000), None);
        pressure.relax();
        assert_eq!(pressure.admit(), None);
    }

    #[test]
    fn a_sweep_that_removed_nothing_admits_the_slowest_rate() {
        let pressure = Pressure::default();
        pressure.after_batch(0, 0.5);
        pressure.after_batch(0, 0.5);
        assert_eq!(
            pressure.spacing.load(Relaxed),
            MAX_SPACING.as_nanos() as u64
        );
        pressure.after_batch(0, 1.0);
        assert_eq!(pressure.spacing.load(Relaxed), 0);
    }
}
