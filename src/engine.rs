//! The engine seam: one atomic operation on one record each. An engine
//! reads the record, decides (with `machine`, or the same rules on the
//! Redis server), writes, and waits for the durability it was opened with;
//! `front` builds everything else on these.

use std::time::Duration;

use bus_core::MessageId;

use crate::error::Result;
use crate::lease::ClaimResult;
use crate::machine::Holder;
use crate::stats::Counters;

/// What a claim got: a lease (built into a [`Lease`] only for the lease
/// API; the trait's `try_claim` needs just the outcome) or what it found.
pub(crate) enum Acquired {
    Lease {
        token: u64,
        expires_at: u64,
        attempts: u32,
    },
    Not(ClaimResult),
}

/// What completing a lease did, when the record still held it (or its
/// completion).
pub(crate) enum Finished {
    /// Wrote the done record.
    Wrote,
    /// This lease had completed the key already, with the same result or
    /// with none given now.
    Already,
    /// This lease had completed the key with another result.
    DifferentResult,
}

/// One engine's atomic operations on the records of one namespace. Each
/// reads the record, decides with `machine` (sled) or the same rules on the
/// server (Redis), writes, and waits for the durability the store was
/// opened with. A lease operation answers `Err(holder)` when the record no
/// longer holds the lease.
pub(crate) trait Engine: Sync {
    /// The namespace this handle works in.
    fn namespace(&self) -> &str;
    /// Its counters, where the engine keeps them.
    fn counters(&self) -> Option<&Counters>;
    /// The largest result `complete_with` may cache.
    fn max_result_size(&self) -> usize;

    fn acquire(
        &self,
        key: &MessageId,
        ttl: Duration,
        ttl_ms: u64,
        fingerprint: Option<&[u8]>,
    ) -> impl Future<Output = Result<Acquired>> + Send;

    /// `Some(late)` when it wrote a done record (`late`: no claim was
    /// remembered), `None` when the record was done already.
    fn done(&self, key: &MessageId) -> impl Future<Output = Result<Option<bool>>> + Send;

    /// Whether a pending claim was removed.
    fn release(&self, key: &MessageId) -> impl Future<Output = Result<bool>> + Send;

    fn complete(
        &self,
        key: &MessageId,
        token: u64,
        result: Option<&[u8]>,
    ) -> impl Future<Output = Result<Result<Finished, Holder>>> + Send;

    fn abandon(
        &self,
        key: &MessageId,
        token: u64,
    ) -> impl Future<Output = Result<Result<(), Holder>>> + Send;

    /// The new expiry.
    fn extend(
        &self,
        key: &MessageId,
        token: u64,
        ttl: Duration,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<Result<u64, Holder>>> + Send;
}
