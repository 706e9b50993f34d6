//! Run a handler at most once per key, with one call:
//! [`Store::once`](crate::Store::once) (feature `handlers`, on by default).
//!
//! A worker that handles a message exactly once must otherwise write the
//! whole protocol itself: claim, run the handler, complete with its result
//! on success, give the claim back on failure, extend the lease while a slow
//! handler runs, replay the cached result to a duplicate, and decide what a
//! panic or a dropped future leaves behind. [`Once::run`] does all of it on
//! either engine and says what happened in an [`Outcome`]:
//!
//! ```rust
//! use std::time::Duration;
//! use sled_idempotency::handler::Outcome;
//! use sled_idempotency::{MessageId, SledIdempotencyStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
//! let id = MessageId::new();
//! let charge = |lease: sled_idempotency::Lease| async move {
//!     // Pass lease.token() downstream as a fencing token.
//!     Ok::<u64, std::io::Error>(lease.token())
//! };
//! let first = store.once(&id, Duration::from_secs(30)).run(charge).await?;
//! let Outcome::Ran(token) = first else { panic!("a new key runs") };
//! // A redelivery replays the cached value without running anything.
//! let again = store.once(&id, Duration::from_secs(30)).run(charge).await?;
//! assert!(matches!(again, Outcome::Replayed(t) if t == token));
//! # Ok(()) }
//! ```
//!
//! What it does, case by case:
//!
//! - **A new key** (absent, or a claim that expired): claims it, runs the
//!   handler with its [`Lease`], and on `Ok(value)` completes the record with
//!   the value cached: [`Outcome::Ran`].
//! - **A done key**: the cached value, deserialized, without running
//!   anything: [`Outcome::Replayed`]. A done record with no cached result
//!   ([`Error::NoCachedResult`]) or one that does not deserialize into the
//!   handler's type ([`Error::UndecodableResult`]) is an error.
//! - **In flight elsewhere**: [`Outcome::InProgress`] with the other claim's
//!   expiry and attempt, at once or, with [`Once::wait`], once waiting for it
//!   to finish has run out.
//! - **A handler error**: the claim is given back and the error returned in
//!   [`Outcome::Failed`], so a redelivery runs the handler again; with
//!   [`Once::run_rejecting`], errors the caller judges final are recorded
//!   instead ([`Outcome::Rejected`]; a duplicate gets
//!   [`Outcome::WasRejected`]), so a poison message is not retried.
//! - **Too many attempts**: with [`Once::max_attempts`], a claim that takes
//!   over a key whose earlier attempts reached the maximum is recorded as
//!   poisoned without running the handler: [`Outcome::Poisoned`].
//! - **A slow handler**: a heartbeat extends the lease while the handler
//!   runs (every third of the ttl by default, [`Once::heartbeat`]). If the
//!   lease is lost all the same (the store was unreachable past the ttl and
//!   another worker took over), the result is not recorded:
//!   [`Outcome::LeaseLost`], never a completion of someone else's claim.
//! - **A panic**: the claim is given back, then the panic goes on unwinding
//!   into the caller. **A dropped future** (a cancelled task, a timeout)
//!   gives the claim back from a task spawned on the runtime, since a drop
//!   cannot wait. Neither marks the key done.
//! - **A payload fingerprint** ([`Once::fingerprint`]): a live record
//!   claimed with another fingerprint is [`Outcome::Conflict`].
//!
//! **Giving a claim back** expires it at once rather than erasing it
//! ([`Store::abandon`](crate::Store::abandon) erases): the record stays
//! remembered for `pending_retention`, so the next claim takes it over as
//! the next attempt, and a message whose handler fails or panics every time
//! reaches [`Once::max_attempts`]. The next claim can take it over at once.
//!
//! **The cached result** is the handler's value as JSON (serde_json):
//! self-describing, so a value cached by another version of the type fails
//! to decode with a clear error instead of decoding as something else, and
//! readable with the command-line tool's `show` and in exports. It is kept
//! in the done record, within the store's `max_result_size` (4 KiB by
//! default, 6 KiB at most: results are receipts, not documents); a value that does not fit (or does not serialize) is logged and
//! the key completed without one, since running the handler again would
//! repeat its effects.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bus_core::MessageId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::front;
use crate::lease::{ClaimResult, Lease};
use crate::store::Store;

/// How often [`Once::wait`] claims again while another worker holds the
/// key, unless [`Once::poll_interval`] says otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What [`Once::run`] did.
#[derive(Debug)]
#[non_exhaustive]
#[must_use = "an outcome says whether to acknowledge the message"]
pub enum Outcome<T, Er> {
    /// The handler ran here and returned this value; the key is done and
    /// the value cached for duplicates.
    Ran(T),
    /// The key was done already: the value cached then, deserialized. The
    /// handler did not run.
    Replayed(T),
    /// Another worker holds a live claim: acknowledge nothing; redeliver or
    /// retry later. The handler did not run.
    InProgress {
        /// When that claim expires (unix ms); it can be taken over then.
        expires_at: u64,
        /// Its attempt number.
        attempts: u32,
    },
    /// The handler returned this error; the claim was given back, so a
    /// redelivery runs it again (as attempt `attempt + 1`).
    Failed {
        /// The handler's error.
        error: Er,
        /// The attempt that failed.
        attempt: u32,
    },
    /// The handler returned this error, which the caller judged final
    /// ([`Once::run_rejecting`]): the key is done, with the error's message
    /// cached, and is not retried.
    Rejected(Er),
    /// The key was done already with an error judged final: its message.
    /// The handler did not run.
    WasRejected {
        /// The error's message, as it was recorded.
        reason: String,
    },
    /// The key's earlier attempts reached [`Once::max_attempts`]: it is
    /// recorded as poisoned and the handler did not run (nor will it for a
    /// duplicate, which gets this outcome too).
    Poisoned {
        /// How many attempts had been made.
        attempts: u32,
    },
    /// The live record was claimed with another payload fingerprint: the
    /// producer reused this message id for different content. The handler
    /// did not run.
    Conflict {
        /// Whether the record with the other fingerprint is done (else
        /// pending).
        done: bool,
    },
    /// The handler ran, but its lease was lost before the outcome could be
    /// recorded (it expired and another worker took the key over, or it was
    /// released or completed by a lease-less call): nothing was recorded,
    /// and here is what the handler returned.
    LeaseLost {
        /// What the handler returned.
        result: std::result::Result<T, Er>,
    },
}

impl<T, Er> Outcome<T, Er> {
    /// The handler's value, ran now or replayed.
    pub fn value(&self) -> Option<&T> {
        match self {
            Outcome::Ran(value) | Outcome::Replayed(value) => Some(value),
            _ => None,
        }
    }

    /// Whether the key is settled for good (ran, replayed, rejected or
    /// poisoned): a consumer acknowledges the message. Otherwise it is
    /// still to be handled, here or elsewhere.
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            Outcome::Ran(_)
                | Outcome::Replayed(_)
                | Outcome::Rejected(_)
                | Outcome::WasRejected { .. }
                | Outcome::Poisoned { .. }
        )
    }
}

/// What the handler API caches in a done record: JSON, externally tagged
/// (`{"ok":…}`, `{"rejected":"…"}`, `{"poisoned":3}`).
#[derive(Serialize, Deserialize)]
enum Cached<T> {
    #[serde(rename = "ok")]
    Ok(T),
    #[serde(rename = "rejected")]
    Rejected(String),
    #[serde(rename = "poisoned")]
    Poisoned(u32),
}

impl<E: Engine> Store<E> {
    /// Runs a handler at most once for `key` while it succeeds: claims the
    /// key for `ttl`, runs the handler, records its result. Set options on
    /// the returned [`Once`], then call [`run`](Once::run) or
    /// [`run_rejecting`](Once::run_rejecting). See the [`handler`](crate::handler)
    /// module for what happens in each case.
    pub fn once<'a>(&'a self, key: &'a MessageId, ttl: Duration) -> Once<'a, E> {
        Once {
            store: self,
            key,
            ttl,
            fingerprint: None,
            retention: None,
            heartbeat: Heartbeat::every_third(ttl),
            max_attempts: None,
            wait: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// One run of a handler for one key: [`Store::once`]'s options, then
/// [`run`](Self::run).
#[derive(Debug)]
#[must_use = "the handler runs only when `run` is awaited"]
pub struct Once<'a, E: Engine> {
    store: &'a Store<E>,
    key: &'a MessageId,
    ttl: Duration,
    fingerprint: Option<&'a [u8]>,
    retention: Option<Duration>,
    heartbeat: Option<Heartbeat>,
    max_attempts: Option<u32>,
    wait: Option<Duration>,
    poll_interval: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    every: Duration,
    ttl: Duration,
}

impl Heartbeat {
    /// The default: every third of the ttl, none for a ttl under 3 ms.
    fn every_third(ttl: Duration) -> Option<Self> {
        let every = ttl / 3;
        (every >= Duration::from_millis(1)).then_some(Heartbeat { every, ttl })
    }

    /// Extends the lease every `every` by `ttl` until an extension fails
    /// for good: returns that error (the lease lost, the store closed or
    /// latched). Other failures (a durability timeout) are logged and the
    /// next beat tries again.
    async fn beat<E: Engine>(self, store: &Store<E>, lease: &Lease) -> Error {
        let mut lease = lease.clone();
        loop {
            tokio::time::sleep(self.every).await;
            match store.extend(&lease, self.ttl).await {
                Ok(extended) => lease = extended,
                // Failures that the next beat would meet again.
                Err(
                    error @ (Error::LeaseLost { .. }
                    | Error::Closed
                    | Error::PreviousIo { .. }
                    | Error::TtlTooShort { .. }
                    | Error::TtlOverflow { .. }
                    | Error::ClockOutOfRange { .. }
                    | Error::InvalidConfig(_)),
                ) => return error,
                Err(error) => {
                    tracing::warn!(key = %lease.key, token = lease.token, %error, "lease heartbeat failed; trying again");
                }
            }
        }
    }
}

impl<'a, E: Engine> Once<'a, E> {
    /// Records `fingerprint` (a hash of the payload, at most 64 bytes) with
    /// the claim; a live record claimed with another one is
    /// [`Outcome::Conflict`]. None by default.
    pub fn fingerprint(mut self, fingerprint: &'a [u8]) -> Self {
        self.fingerprint = Some(fingerprint);
        self
    }

    /// Keeps the outcome (the cached value, a final error) for `retention`
    /// after completion, instead of for the claim's ttl (or the store's
    /// `done_retention`, which wins when set): the claim is made for
    /// `retention`, so that its record carries it, and its lease at once
    /// cut back to the claim's ttl by an extension, one more write. A
    /// worker that dies between the two leaves the key claimed for
    /// `retention`. At least the claim's ttl.
    pub fn keep_result_for(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Extends the lease to `now + ttl` every `every` while the handler
    /// runs. By default every third of the claim's ttl, by the claim's
    /// ttl (none for a ttl under 3 ms). `every` must be at least 1 ms and
    /// shorter than `ttl`, or the run fails with
    /// [`Error::InvalidConfig`] before claiming anything.
    pub fn heartbeat(mut self, every: Duration, ttl: Duration) -> Self {
        self.heartbeat = Some(Heartbeat { every, ttl });
        self
    }

    /// No heartbeat: a handler that outlives the claim's ttl can be taken
    /// over by another worker (and then gets [`Outcome::LeaseLost`]).
    pub fn without_heartbeat(mut self) -> Self {
        self.heartbeat = None;
        self
    }

    /// Runs the handler at most `max` times per key: a claim that takes
    /// over a key whose earlier attempts (failed, panicked, or whose worker
    /// died) number `max` or more records it as poisoned instead
    /// ([`Outcome::Poisoned`]). Unlimited by default. Attempts are counted
    /// while the store remembers the expired claim (`pending_retention`).
    pub fn max_attempts(mut self, max: u32) -> Self {
        self.max_attempts = Some(max);
        self
    }

    /// While another worker holds a live claim, waits up to `up_to` for it
    /// to finish (claiming again every [`poll_interval`](Self::poll_interval)):
    /// a completion is replayed, a claim given back or expired is taken
    /// over and the handler runs. By default it does not wait.
    pub fn wait(mut self, up_to: Duration) -> Self {
        self.wait = Some(up_to);
        self
    }

    /// How often [`wait`](Self::wait) claims again;
    /// [`DEFAULT_POLL_INTERVAL`] by default, at least 1 ms.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Runs `handler` if the key is new, as described in the
    /// [module docs](crate::handler), and returns what happened. Every
    /// handler error gives the claim back ([`Outcome::Failed`]).
    ///
    /// The outer `Err` is the store's own failure (an I/O error, a closed
    /// store, a cached result that does not decode); the handler's errors
    /// are in the [`Outcome`].
    pub async fn run<T, Er, F, Fut>(self, handler: F) -> Result<Outcome<T, Er>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, Er>>,
    {
        self.drive(handler, |_: &Er| None).await
    }

    /// Like [`run`](Self::run), except that a handler error for which
    /// `is_final` returns `true` is recorded as final (a poison message
    /// that must not be retried): [`Outcome::Rejected`] now, and
    /// [`Outcome::WasRejected`] with the error's message for every
    /// duplicate.
    pub async fn run_rejecting<T, Er, F, Fut>(
        self,
        handler: F,
        is_final: impl Fn(&Er) -> bool,
    ) -> Result<Outcome<T, Er>>
    where
        T: Serialize + DeserializeOwned,
        Er: fmt::Display,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, Er>>,
    {
        self.drive(handler, |error: &Er| {
            is_final(error).then(|| error.to_string())
        })
        .await
    }

    async fn drive<T, Er, F, Fut>(
        self,
        handler: F,
        reject: impl Fn(&Er) -> Option<String>,
    ) -> Result<Outcome<T, Er>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, Er>>,
    {
        if let Some(beat) = self.heartbeat
            && (beat.every < Duration::from_millis(1) || beat.every >= beat.ttl)
        {
            return Err(Error::InvalidConfig(format!(
                "the heartbeat must beat at least every millisecond and more often than \
                 the ttl it extends by ({:?}), got every {:?}",
                beat.ttl, beat.every
            )));
        }
        if let Some(retention) = self.retention
            && retention < self.ttl
        {
            return Err(Error::InvalidConfig(format!(
                "keep_result_for({retention:?}) is shorter than the claim's ttl ({:?})",
                self.ttl
            )));
        }
        let lease = match self.acquire().await? {
            Ok(lease) => lease,
            Err(found) => return found,
        };
        let store = self.store;
        // From here until the outcome is recorded, a drop gives the claim
        // back (armed in the poll that received the lease).
        let mut guard = GiveBack {
            store,
            lease: Some(lease.clone()),
        };
        let earlier = lease.attempt.saturating_sub(1);
        if let Some(max) = self.max_attempts
            && earlier >= max
        {
            let poisoned = encode(&Cached::<()>::Poisoned(earlier), store, &lease);
            finish(store, &lease, poisoned).await?;
            guard.lease = None;
            tracing::warn!(key = %lease.key, attempts = earlier, "poisoned: not running the handler again");
            return Ok(Outcome::Poisoned { attempts: earlier });
        }

        let ran = self.run_handler(handler, &lease).await;
        let (returned, lost) = match ran {
            Ran::Returned(returned, lost) => (returned, lost),
            Ran::Panicked(panic) => {
                if let Err(error) = front::give_back(&store.engine, &lease).await {
                    tracing::warn!(key = %lease.key, token = lease.token, %error, "could not give back the claim of a handler that panicked");
                }
                guard.lease = None;
                resume_unwind(panic)
            }
        };
        let outcome = if lost {
            Ok(Outcome::LeaseLost { result: returned })
        } else {
            self.settle(&lease, returned, reject).await
        };
        guard.lease = None;
        outcome
    }

    /// Claims the key (waiting for another worker's claim if asked to):
    /// the lease, or the outcome that ends the run.
    async fn acquire<T, Er>(&self) -> Result<std::result::Result<Lease, Result<Outcome<T, Er>>>>
    where
        T: DeserializeOwned,
    {
        let deadline = self.wait.map(|up_to| Instant::now() + up_to);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        loop {
            // The claim runs on its own task, so that a run dropped while
            // its claim is being written (or its lease cut back) cannot
            // leave a claim nobody holds: the task gives it back when
            // nobody is left to take the lease.
            let (answer, found) = tokio::sync::oneshot::channel();
            runtime.spawn(claim_detached(
                self.store.clone(),
                self.key.clone(),
                self.retention.unwrap_or(self.ttl),
                self.retention.map(|_| self.ttl),
                self.fingerprint.map(<[u8]>::to_vec),
                answer,
            ));
            let found = found.await.map_err(|_| Error::Closed)??;
            let outcome = match found {
                ClaimResult::Acquired(lease) => return Ok(Ok(lease)),
                ClaimResult::Done { result } => replay(self.key, result),
                ClaimResult::Conflict { done } => Ok(Outcome::Conflict { done }),
                ClaimResult::InProgress {
                    expires_at,
                    attempts,
                } => match deadline {
                    Some(deadline) if Instant::now() < deadline => {
                        let next = Instant::now() + self.poll_interval;
                        tokio::time::sleep_until(next.min(deadline)).await;
                        continue;
                    }
                    _ => Ok(Outcome::InProgress {
                        expires_at,
                        attempts,
                    }),
                },
            };
            return Ok(Err(outcome));
        }
    }

    /// Runs the handler with its heartbeat; catches a panic so that the
    /// claim is given back before it unwinds further.
    async fn run_handler<T, Er, F, Fut>(&self, handler: F, lease: &Lease) -> Ran<T, Er>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, Er>>,
    {
        let work = match catch_unwind(AssertUnwindSafe(|| handler(lease.clone()))) {
            Ok(work) => work,
            Err(panic) => return Ran::Panicked(panic),
        };
        let mut work = pin!(work);
        let mut caught = pin!(poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(returned)) => Poll::Ready(Ok(returned)),
                Err(panic) => Poll::Ready(Err(panic)),
            }
        }));
        let (finished, lost) = match self.heartbeat {
            None => ((&mut caught).await, None),
            Some(beat) => {
                tokio::select! {
                    biased;
                    finished = &mut caught => (finished, None),
                    stopped = beat.beat(self.store, lease) => ((&mut caught).await, Some(stopped)),
                }
            }
        };
        match finished {
            Err(panic) => Ran::Panicked(panic),
            Ok(returned) => {
                let lost = matches!(lost, Some(Error::LeaseLost { .. }));
                if lost {
                    tracing::warn!(key = %lease.key, token = lease.token, "the lease was lost while the handler ran; its result is not recorded");
                }
                Ran::Returned(returned, lost)
            }
        }
    }

    /// Records what the handler returned and says so.
    async fn settle<T, Er>(
        &self,
        lease: &Lease,
        returned: std::result::Result<T, Er>,
        reject: impl Fn(&Er) -> Option<String>,
    ) -> Result<Outcome<T, Er>>
    where
        T: Serialize,
    {
        let store = self.store;
        // Encoded before any wait, so that the run's future holds no
        // borrow of the value across one (and is `Send` for any `T: Send`).
        let (complete, rejected) = match &returned {
            Ok(value) => (Some(encode(&Cached::Ok(value), store, lease)), false),
            Err(error) => match reject(error) {
                Some(reason) => (
                    Some(encode(&Cached::<()>::Rejected(reason), store, lease)),
                    true,
                ),
                None => (None, false),
            },
        };
        let written = match complete {
            Some(result) => finish(store, lease, result).await,
            None => front::give_back(&store.engine, lease).await,
        };
        match written {
            Ok(()) => Ok(match returned {
                Ok(value) => Outcome::Ran(value),
                Err(error) if rejected => Outcome::Rejected(error),
                Err(error) => Outcome::Failed {
                    error,
                    attempt: lease.attempt,
                },
            }),
            Err(Error::LeaseLost { .. }) => Ok(Outcome::LeaseLost { result: returned }),
            Err(error) => Err(error),
        }
    }
}

/// Claims `key` for `ttl` and, when `cut` is given (`keep_result_for`),
/// cuts the lease back to it; sends what it found. A lease nobody is left
/// to receive (the run was dropped meanwhile) is given back here.
async fn claim_detached<E: Engine>(
    store: Store<E>,
    key: MessageId,
    ttl: Duration,
    cut: Option<Duration>,
    fingerprint: Option<Vec<u8>>,
    answer: tokio::sync::oneshot::Sender<Result<ClaimResult>>,
) {
    let found = match &fingerprint {
        Some(fingerprint) => store.claim_with_fingerprint(&key, ttl, fingerprint).await,
        None => store.claim(&key, ttl).await,
    };
    let found = match (found, cut) {
        (Ok(ClaimResult::Acquired(lease)), Some(lease_ttl)) => {
            match store.extend(&lease, lease_ttl).await {
                Ok(cut) => Ok(ClaimResult::Acquired(cut)),
                Err(error) => {
                    if let Err(error) = front::give_back(&store.engine, &lease).await {
                        tracing::warn!(key = %lease.key, token = lease.token, %error, "could not give back a claim whose lease could not be cut back");
                    }
                    Err(error)
                }
            }
        }
        (found, _) => found,
    };
    if let Err(Ok(ClaimResult::Acquired(lease))) = answer.send(found)
        && let Err(error) = front::give_back(&store.engine, &lease).await
    {
        tracing::warn!(key = %lease.key, token = lease.token, %error, "could not give back the claim of a run dropped while it claimed");
    }
}

/// How the handler ended: it returned (and whether the heartbeat found the
/// lease lost meanwhile), or it panicked.
enum Ran<T, Er> {
    Returned(std::result::Result<T, Er>, bool),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// `cached` as the done record's result, or `None` (logged) when it does
/// not serialize or does not fit the store's `max_result_size`: the key is
/// then completed without one.
fn encode<E: Engine, T: Serialize>(
    cached: &Cached<T>,
    store: &Store<E>,
    lease: &Lease,
) -> Option<Vec<u8>> {
    let limit = store.engine.max_result_size();
    match serde_json::to_vec(cached) {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(bytes) => {
            tracing::warn!(key = %lease.key, size = bytes.len(), limit, "the handler's result is over max_result_size: completing without caching it");
            None
        }
        Err(error) => {
            tracing::error!(key = %lease.key, %error, "the handler's result does not serialize: completing without caching it");
            None
        }
    }
}

/// Completes the leased key, with `result` cached when there is one.
async fn finish<E: Engine>(store: &Store<E>, lease: &Lease, result: Option<Vec<u8>>) -> Result<()> {
    match result {
        Some(result) => store.complete_with(lease, &result).await,
        None => store.complete(lease).await,
    }
}

/// A done key's cached result, deserialized.
fn replay<T: DeserializeOwned, Er>(
    key: &MessageId,
    result: Option<Vec<u8>>,
) -> Result<Outcome<T, Er>> {
    let bytes = result.ok_or_else(|| Error::NoCachedResult {
        key: key.to_string(),
    })?;
    match serde_json::from_slice::<Cached<T>>(&bytes) {
        Ok(Cached::Ok(value)) => Ok(Outcome::Replayed(value)),
        Ok(Cached::Rejected(reason)) => Ok(Outcome::WasRejected { reason }),
        Ok(Cached::Poisoned(attempts)) => Ok(Outcome::Poisoned { attempts }),
        Err(error) => Err(Error::UndecodableResult {
            key: key.to_string(),
            reason: error.to_string(),
        }),
    }
}

/// Gives the claim back if dropped while it holds the lease: a run
/// cancelled mid-way (its task aborted, a timeout around it) must not keep
/// the key claimed for the whole ttl by a worker that has moved on. A drop
/// cannot wait, so the give-back runs on a task spawned on the current
/// tokio runtime; outside one (the runtime itself shutting down) the claim
/// expires with its ttl.
struct GiveBack<'a, E: Engine> {
    store: &'a Store<E>,
    lease: Option<Lease>,
}

impl<E: Engine> Drop for GiveBack<'_, E> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let store = self.store.clone();
                runtime.spawn(async move {
                    if let Err(error) = front::give_back(&store.engine, &lease).await {
                        tracing::debug!(key = %lease.key, token = lease.token, %error, "could not give back the claim of a cancelled handler");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(key = %lease.key, token = lease.token, "a handler was cancelled outside a tokio runtime: its claim stays until its ttl runs out");
            }
        }
    }
}
