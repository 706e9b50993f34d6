//! Back-pressure from the sweeper to the claims that create records.
//!
//! A sweep costs about as much CPU per record it removes as a claim and a
//! `mark_done` cost together (the random read of each noted key is most of
//! it). Writers that never wait for a disk (`Periodic`, or `Sync` with many
//! tasks) can then create records faster than any share of two cores
//! lets the sweeper remove them, and the database grows without bound. So
//! once the oldest due expiry index entry is more than two sweep intervals
//! old ([`pause_share`](super::sweeper::pause_share) below 1), claims are
//! admitted at most at [`SHARE`] of the rate the sweeper has removed
//! records since it fell behind: the backlog shrinks until the sweeper is
//! within two intervals again, and then claims run free. A sweep that
//! removes nothing (behind on notes of claims still remembered) sets no
//! limit, and however a sweep ends (caught up, failed, dropped, panicked)
//! its caller relaxes the limit.
//!
//! The admission is a virtual schedule (GCRA): each claim takes the next
//! slot, `spacing` after the one before, and waits, before it writes and
//! holding no lock, only when its slot is more than [`TOLERANCE`] ahead, so
//! that a writer slower than the limit never waits and one faster sleeps in
//! steps the timer can keep; no slot is more than [`MAX_AHEAD`] ahead. While
//! the sweeper keeps up, a claim pays one relaxed atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::sweeper::Batch;
use crate::sync::lock;

/// The share of the sweeper's removal rate that claims are admitted at
/// while it is behind: below 1, so that the backlog shrinks.
const SHARE: f64 = 0.9;

/// How far ahead of now a claim's slot may be before the claim waits.
const TOLERANCE: Duration = Duration::from_millis(2);

/// The longest spacing between two claims: the slowest admission is 1,000
/// claims/s, however little the sweep removes.
const MAX_SPACING: Duration = Duration::from_millis(1);

/// The farthest ahead of now a claim's slot may be: no claim waits longer,
/// however many wait at once (the limit is then looser than the rate).
const MAX_AHEAD: Duration = Duration::from_millis(20);

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
        let latest = now.saturating_add(MAX_AHEAD.as_nanos() as u64);
        let mut next = self.next.load(Relaxed);
        loop {
            let slot = next.clamp(now, latest);
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

    /// After a batch of the due sweep, whose `pause` is `pause_share` (1:
    /// not behind): sets the limit claims
    /// are admitted at, from the rate the sweep has removed records at
    /// since its first batch behind (one batch's rate varied fourfold
    /// from batch to batch and let writers through at 1.25× the
    /// sweeper's rate).
    pub(crate) fn after_batch(&self, batch: &Batch) {
        match batch.next {
            Some(_) => self.behind(batch.report.removed, batch.pause),
            // No more due: caught up.
            None => self.relax(),
        }
    }

    /// [`after_batch`](Self::after_batch) of a batch that removed
    /// `removed` records, with more due.
    fn behind(&self, removed: u64, share: f64) {
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
        if rate * SHARE <= 0.0 {
            // Behind on notes it cannot act on yet (claims expired but
            // remembered, notes of records already gone): nothing says
            // writers outpace its removals.
            self.spacing.store(0, Relaxed);
            return;
        }
        let spacing = Duration::from_secs_f64(1.0 / (rate * SHARE)).min(MAX_SPACING);
        self.spacing
            .store(spacing.as_nanos().max(1) as u64, Relaxed);
    }

    /// The sweep ended or stopped: claims run free until the next measures
    /// a rate.
    pub(crate) fn relax(&self) {
        *lock(&self.since) = None;
        self.spacing.store(0, Relaxed);
        // A later limit starts its schedule afresh, not behind this one's.
        self.next.store(0, Relaxed);
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
        pressure.behind(1_000, 1.0);
        assert_eq!(pressure.admit(), None);
    }

    /// Behind, claims are spaced at the sweeper's removal rate: a burst
    /// of claims soon has to wait, about one spacing per claim.
    #[test]
    fn claims_faster_than_the_sweeper_wait() {
        let pressure = Pressure::default();
        pressure.behind(0, 0.5); // starts the measurement
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

    /// A backlog of notes the sweep cannot act on yet (claims expired but
    /// remembered) removes nothing: that sets no limit; a trickle of
    /// removals sets the slowest one.
    #[test]
    fn a_sweep_that_removed_nothing_sets_no_limit() {
        let pressure = Pressure::default();
        pressure.behind(0, 0.5);
        pressure.behind(0, 0.5);
        assert_eq!(pressure.spacing.load(Relaxed), 0);
        assert_eq!(pressure.admit(), None);
        std::thread::sleep(Duration::from_millis(5));
        pressure.behind(1, 0.5);
        assert_eq!(
            pressure.spacing.load(Relaxed),
            MAX_SPACING.as_nanos() as u64
        );
        pressure.behind(0, 1.0);
        assert_eq!(pressure.spacing.load(Relaxed), 0);
    }

    /// However many claims arrive at once, none waits longer than
    /// `MAX_AHEAD`.
    #[test]
    fn no_claim_waits_longer_than_max_ahead() {
        let pressure = Pressure::default();
        pressure
            .spacing
            .store(MAX_SPACING.as_nanos() as u64, Relaxed);
        let now = 1_000_000_000;
        let longest = (0..10_000)
            .filter_map(|_| pressure.admit_at(now))
            .max()
            .unwrap_or_default();
        assert_eq!(longest, MAX_AHEAD);
    }

    /// A limit set after a relax starts from now, not from the slots the
    /// claims of the last one took.
    #[test]
    fn relax_resets_the_schedule() {
        let pressure = Pressure::default();
        pressure
            .spacing
            .store(MAX_SPACING.as_nanos() as u64, Relaxed);
        let now = 1_000_000_000;
        for _ in 0..1_000 {
            pressure.admit_at(now);
        }
        pressure.relax();
        pressure
            .spacing
            .store(MAX_SPACING.as_nanos() as u64, Relaxed);
        assert_eq!(pressure.admit_at(now + 5_000_000), None);
    }
}
