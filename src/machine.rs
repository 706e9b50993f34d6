//! The state machine: what each operation does to a record at a given time.
//!
//! Pure functions, no I/O. The sled engine runs them inside a
//! compare-and-swap loop (the Redis engine's functions apply the same
//! rules on the server). The tests' reference model (`tests/model/`) is
//! written apart from them, straight from the table, so that a mistake
//! here shows up as a divergence. The table (docs/semantics.md,
//! "Semantics"):
//!
//! One rule decides what an operation sees, and it does not depend on when
//! the sweeper runs: a record is **remembered** while it is live, and an
//! expired `Pending` stays remembered for [`Retention::pending_ms`] after its
//! expiry (so the attempt counter and lease checks survive redeliveries);
//! anything else is **forgotten** and every operation treats it exactly as
//! an absent key. The sweeper removes only forgotten records
//! ([`sweepable`]), so removing one never changes an outcome.
//!
//! | operation | absent or forgotten | remembered `Pending` (live or expired, not re-claimed) | live `Done` |
//! |---|---|---|---|
//! | claim | write `Pending` → `Claimed` | live: `AlreadyPending`; expired: take over, `attempts + 1` → `Claimed` | `AlreadyDone` |
//! | done | write `Done` (late completion) | write `Done` | no write |
//! | release | no write | remove | no write |
//!
//! The lease operations (`complete`, `abandon`, `extend`) act only while the
//! record is the remembered `Pending` written by the lease's claim (same
//! token), live or expired; otherwise they report what the record holds
//! now.

use std::fmt;

use crate::record::{Record, State};

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Someone else holds a live claim: no write.
    AlreadyPending,
    /// The message was handled and the record is live: no write.
    AlreadyDone,
    /// The live record was claimed with a different payload fingerprint: no
    /// write.
    Conflict,
    /// The key is free: write a new `Pending` with this attempt number.
    Take {
        /// Attempt number of the new claim (1 for a fresh key).
        attempts: u32,
    },
}

/// What a claim does to `current` at time `now`. A `fingerprint` is compared
/// with the live record's when both have one.
pub fn claim(
    current: Option<&Record>,
    now: u64,
    rules: Retention,
    fingerprint: Option<&[u8]>,
) -> Claim {
    match rules.remembered(current, now) {
        None => Claim::Take { attempts: 1 },
        Some(r) if r.is_live(now) => {
            if let (Some(given), Some(stored)) = (fingerprint, r.fingerprint.as_deref())
                && given != stored
            {
                return Claim::Conflict;
            }
            match r.state {
                State::Pending => Claim::AlreadyPending,
                State::Done => Claim::AlreadyDone,
            }
        }
        // A remembered expired claim is a handler that never finished:
        // count it. (An expired done record is forgotten: `None` above.)
        Some(r) => Claim::Take {
            attempts: r.attempts.saturating_add(1),
        },
    }
}

/// The new `Pending` record a [`Claim::Take`] writes.
pub fn pending(
    expires_at: u64,
    ttl_ms: u64,
    token: u64,
    attempts: u32,
    fingerprint: Option<&[u8]>,
) -> Record {
    Record {
        state: State::Pending,
        expires_at,
        token,
        attempts,
        ttl_ms,
        fingerprint: fingerprint.map(<[u8]>::to_vec),
        result: None,
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

/// How long records are remembered, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The builder's separate done retention, if set.
    pub done_ms: Option<u64>,
    /// Retention when there is no claim to read a ttl from.
    pub default_ttl_ms: u64,
    /// How long an expired `Pending` stays remembered after its expiry.
    pub pending_ms: u64,
}

impl Retention {
    /// `current` as every operation sees it at `now`: `None` when the key
    /// is absent or its record is forgotten (an expired `Done`, or a
    /// `Pending` more than `pending_ms` past its expiry).
    pub fn remembered<'a>(&self, current: Option<&'a Record>, now: u64) -> Option<&'a Record> {
        current.filter(|r| now < self.forgotten_at(r))
    }

    /// The first instant at which `record` is forgotten: its expiry for a
    /// `Done`, its expiry plus `pending_ms` for a `Pending`. From then on
    /// [`sweepable`] holds, until the record is written again.
    pub fn forgotten_at(&self, record: &Record) -> u64 {
        match record.state {
            State::Done => record.expires_at,
            State::Pending => record.expires_at.saturating_add(self.pending_ms),
        }
    }

    /// The next instant at which a sweep must look at `record`, at `now`:
    /// its expiry while it is live, then the instant it is forgotten. A
    /// write notes its record at its expiry, so the note of a claim that
    /// ends (done, released) lives for the claim's ttl, not for its ttl plus
    /// `pending_ms`; a sweep that finds the claim expired and still
    /// remembered notes it again at [`forgotten_at`](Self::forgotten_at).
    pub fn due_at(&self, record: &Record, now: u64) -> u64 {
        if now < record.expires_at {
            record.expires_at
        } else {
            self.forgotten_at(record)
        }
    }

    fn done_record(&self, claimed: &Record, now: u64, result: Option<&[u8]>) -> Record {
        Record {
            state: State::Done,
            expires_at: now.saturating_add(self.done_ms.unwrap_or(claimed.ttl_ms)),
            token: claimed.token,
            attempts: claimed.attempts,
            ttl_ms: claimed.ttl_ms,
            fingerprint: claimed.fingerprint.clone(),
            result: result.map(<[u8]>::to_vec),
        }
    }
}

/// What `mark_done` does to `current` at time `now`.
pub fn done(current: Option<&Record>, now: u64, retention: Retention) -> Done {
    match retention.remembered(current, now) {
        Some(r) if r.state == State::Pending => Done::Write {
            record: retention.done_record(r, now, None),
            late: false,
        },
        Some(_) => Done::AlreadyDone,
        None => {
            let unclaimed = Record {
                state: State::Done,
                expires_at: 0,
                token: 0,
                attempts: 0,
                ttl_ms: retention.default_ttl_ms,
                fingerprint: None,
                result: None,
            };
            Done::Write {
                record: retention.done_record(&unclaimed, now, None),
                late: true,
            }
        }
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

/// What `release` does to `current` at `now`: a remembered pending claim
/// nobody re-claimed is released whether or not it has expired, and a done
/// record is never erased.
pub fn release(current: Option<&Record>, now: u64, rules: Retention) -> Release {
    match rules.remembered(current, now) {
        Some(r) if r.state == State::Pending => Release::Remove,
        _ => Release::Keep,
    }
}

/// What a record holds, as seen by a lease that no longer holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Nothing: the key is absent (released, swept, never claimed).
    Nothing,
    /// A claim by another lease.
    Claim {
        /// Token of the claim that holds the key now.
        token: u64,
        /// When that claim expires (unix ms).
        expires_at: u64,
        /// Its attempt number.
        attempts: u32,
    },
    /// The message is done.
    Done {
        /// Token of the claim that completed it (0 if none).
        token: u64,
        /// When the done record expires (unix ms).
        expires_at: u64,
    },
}

impl Holder {
    /// Describes `current` at `now`. A forgotten record is reported as
    /// nothing, as it behaves; a remembered expired claim is reported as the
    /// claim it still is until someone takes over.
    pub(crate) fn of(current: Option<&Record>, now: u64, rules: Retention) -> Holder {
        match rules.remembered(current, now) {
            None => Holder::Nothing,
            Some(r) => match r.state {
                State::Pending => Holder::Claim {
                    token: r.token,
                    expires_at: r.expires_at,
                    attempts: r.attempts,
                },
                State::Done => Holder::Done {
                    token: r.token,
                    expires_at: r.expires_at,
                },
            },
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Nothing => {
                f.write_str("no record (released, expired and swept, or never claimed)")
            }
            Holder::Claim {
                token,
                expires_at,
                attempts,
            } => write!(
                f,
                "a claim with token {token} (attempt {attempts}) expiring at {expires_at} ms"
            ),
            Holder::Done { token: 0, .. } => f.write_str("a done record written without a claim"),
            Holder::Done { token, .. } => write!(f, "a done record completed by token {token}"),
        }
    }
}

/// The remembered `Pending` record of lease `token`, or what holds the key
/// instead.
fn held(
    current: Option<&Record>,
    token: u64,
    now: u64,
    rules: Retention,
) -> Result<&Record, Holder> {
    match rules.remembered(current, now) {
        Some(r) if r.state == State::Pending && r.token == token => Ok(r),
        _ => Err(Holder::of(current, now, rules)),
    }
}

/// What `complete` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Complete {
    /// Write this `Done` record.
    Write(Record),
    /// This lease already completed the key with the same result (or the
    /// call gives none): nothing to write.
    AlreadyCompleted,
    /// This lease already completed the key with a different result: the
    /// first result stays, and the call is refused.
    DifferentResult,
}

/// What completing lease `token` does to `current`.
pub fn complete(
    current: Option<&Record>,
    token: u64,
    now: u64,
    retention: Retention,
    result: Option<&[u8]>,
) -> Result<Complete, Holder> {
    match current {
        Some(r) if r.state == State::Done && r.token == token && r.is_live(now) => {
            Ok(match result {
                Some(given) if r.result.as_deref() != Some(given) => Complete::DifferentResult,
                _ => Complete::AlreadyCompleted,
            })
        }
        _ => held(current, token, now, retention)
            .map(|r| Complete::Write(retention.done_record(r, now, result))),
    }
}

/// Whether abandoning lease `token` removes `current` (`Ok`), or what holds
/// the key instead.
pub fn abandon(
    current: Option<&Record>,
    token: u64,
    now: u64,
    rules: Retention,
) -> Result<(), Holder> {
    held(current, token, now, rules).map(|_| ())
}

/// The record after extending lease `token` to `expires_at` at `now`.
pub fn extend(
    current: Option<&Record>,
    token: u64,
    now: u64,
    rules: Retention,
    expires_at: u64,
) -> Result<Record, Holder> {
    held(current, token, now, rules).map(|r| Record {
        expires_at,
        ..r.clone()
    })
}

/// Whether the sweeper may remove `record` at `now`: only a forgotten
/// record, which every operation already treats as absent.
pub fn sweepable(record: &Record, now: u64, rules: Retention) -> bool {
    rules.remembered(Some(record), now).is_none()
}
