//! The engine seam: [`Engine`], public and sealed, names the engines a
//! [`Store`](crate::Store) can run on; [`Ops`], which only this crate can
//! name, carries what they do: one atomic operation on one record each (an
//! engine reads the record, decides with `machine` or the same rules on the
//! Redis server, writes, and waits for the durability it was opened with),
//! and the handle's namespace, reads and close. `front` builds everything
//! else on these. The pattern is redb's `sealed.rs`: users can name
//! `Store<SledEngine>`, never implement an engine or call its operations.

use std::time::Duration;

use bus_core::MessageId;

use crate::error::Result;
use crate::lease::ClaimResult;
use crate::machine::Holder;
use crate::record::Record;
use crate::stats::Counters;

/// What a claim got: a lease (built into a [`Lease`] only for the lease
/// API; the trait's `try_claim` needs just the outcome) or what it found.
pub enum Acquired {
    Lease {
        token: u64,
        expires_at: u64,
        attempts: u32,
    },
    Not(ClaimResult),
}

/// What completing a lease did, when the record still held it (or its
/// completion).
pub enum Finished {
    /// Wrote the done record.
    Wrote,
    /// This lease had completed the key already, with the same result or
    /// with none given now.
    Already,
    /// This lease had completed the key with another result.
    DifferentResult,
}

/// The engine a [`Store`](crate::Store) keeps its records in:
/// [`SledEngine`](crate::SledEngine) or, with the feature `redis`,
/// `redis::RedisEngine`. Sealed: the operations
/// behind it are the crate's own.
pub trait Engine: Ops + Clone + std::fmt::Debug + Send + Sync + 'static {}

/// One engine's operations on the records of one namespace. Each atomic
/// operation reads the record, decides with `machine` (sled) or the same
/// rules on the server (Redis), writes, and waits for the durability the
/// store was opened with. A lease operation answers `Err(holder)` when the
/// record no longer holds the lease. Public in a private module: the seal.
pub trait Ops: Sized {
    /// The namespace this handle works in.
    fn namespace(&self) -> &str;
    /// A handle on namespace `name` of the same store.
    fn open_namespace(&self, name: &str) -> impl Future<Output = Result<Self>> + Send;
    /// Every namespace of the store, the default first.
    fn namespaces(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The live record for `key`.
    fn get(&self, key: &MessageId) -> impl Future<Output = Result<Option<Record>>> + Send;
    /// The record stored for `key`, live or not.
    fn get_record(&self, key: &MessageId) -> impl Future<Output = Result<Option<Record>>> + Send;
    /// Closes the store for every handle.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
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
