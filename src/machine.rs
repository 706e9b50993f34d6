//! The state machine: what each operation does to a record at a given time.
//!
//! Pure functions, no I/O. The store runs them inside a compare-and-swap
//! loop; the tests' reference model runs the very same functions, so the
//! table of SPEC §2 lives in exactly one place:
//!
//! | operation | absent or expired `Done` | `Pending` (live or expired, not re-claimed) | live `Done` |
//! |---|---|---|---|
//! | claim | write `Pending` → `Claimed` | live: `AlreadyPending`; expired: take over, `attempts + 1` → `Claimed` | `AlreadyDone` |
//! | done | write `Done` (late completion) | write `Done` | no write |
//! | release | no write | remove | no write |

use crate::record::{Record, State};
use bus_core::ClaimOutcome;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Someone else holds a live claim: no write.
    AlreadyPending,
    /// The message was handled and the record is live: no write.
    AlreadyDone,
    /// The key is free: write a new `Pending` with this attempt number.
    Take {
        /// Attempt number of the new claim (1 for a fresh key).
        attempts: u32,
    },
}

impl Claim {
    /// The outcome reported to the caller once this decision is applied.
    pub fn outcome(self) -> ClaimOutcome {
        match self {
            Claim::AlreadyPending => ClaimOutcome::AlreadyPending,
            Claim::AlreadyDone => ClaimOutcome::AlreadyDone,
            Claim::Take { .. } => ClaimOutcome::Claimed,
        }
    }
}

/// What `try_claim` does to `current` at time `now`.
pub fn claim(current: Option<&Record>, now: u64) -> Claim {
    match current {
        None => Claim::Take { attempts: 1 },
        Some(r) if r.is_live(now) => match r.state {
            State::Pending => Claim::AlreadyPending,
            State::Done => Claim::AlreadyDone,
        },
        // An expired pending claim is a handler that never finished: count it.
        Some(r) if r.state == State::Pending => Claim::Take {
            attempts: r.attempts.saturating_add(1),
        },
        // An expired done record is gone for every purpose.
        Some(_) => Claim::Take { attempts: 1 },
    }
}

/// The new `Pending` record a [`Claim::Take`] writes.
pub fn pending(expires_at: u64, ttl_ms: u64, token: u64, attempts: u32) -> Record {
    Record {
        state: State::Pending,
        expires_at,
        token,
        attempts,
        ttl_ms,
    }
}

/// What `mark_done` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Already done and live: nothing to write.
    AlreadyDone,
    /// Write this record.
    Write {
        /// The `Done` record to store.
        record: Record,
        /// True when no claim was found (absent key or expired `Done`): the
        /// handler ran without a claim this store remembers.
        late: bool,
    },
}

/// What `mark_done` does to `current` at time `now`.
///
/// `done_retention` is the builder's separate retention, if set;
/// `default_ttl_ms` the retention when there is no claim to read a ttl from.
pub fn done(
    current: Option<&Record>,
    now: u64,
    done_retention_ms: Option<u64>,
    default_ttl_ms: u64,
) -> Done {
    let finish = |ttl_ms: u64, token: u64, attempts: u32, late: bool| Done::Write {
        record: Record {
            state: State::Done,
            expires_at: now.saturating_add(done_retention_ms.unwrap_or(ttl_ms)),
            token,
            attempts,
            ttl_ms,
        },
        late,
    };
    match current {
        Some(r) if r.state == State::Pending => finish(r.ttl_ms, r.token, r.attempts, false),
        Some(r) if r.is_live(now) => Done::AlreadyDone,
        _ => finish(default_ttl_ms, 0, 0, true),
    }
}

/// What `release` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Remove the pending record.
    Remove,
    /// Nothing to do: absent, or done (a completed record is never erased).
    Keep,
}

/// What `release` does to `current`. Time does not matter: a pending claim
/// nobody re-claimed is released whether or not it has expired, and a done
/// record is never erased.
pub fn release(current: Option<&Record>) -> Release {
    match current {
        Some(r) if r.state == State::Pending => Release::Remove,
        _ => Release::Keep,
    }
}

/// Whether the sweeper may remove `record` at `now`.
pub fn sweepable(record: &Record, now: u64) -> bool {
    !record.is_live(now)
}
