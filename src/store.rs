//! [`Store`], the one public handle: written once over the sealed
//! [`Engine`] trait, so that every operation, its checks and its
//! documentation exist once for sled and Redis alike. Each method is a line
//! or two over the shared rules in `front` or the engine beneath;
//! engine-specific methods (opening, inspection, sweeping) are in
//! `impl Store<SledEngine>` and `impl Store<RedisEngine>`, in the engines'
//! folders.

use std::time::Duration;

use bus_core::{ClaimOutcome, MessageId};

use crate::engine::Engine;
use crate::error::Result;
use crate::front;
use crate::lease::{ClaimResult, Lease};
use crate::record::Record;

/// A handle on one namespace of an idempotency store, generic over the
/// engine that keeps its records: [`SledIdempotencyStore`](crate::SledIdempotencyStore)
/// (`Store<SledEngine>`, embedded) or, with the feature `redis`,
/// `RedisIdempotencyStore`
/// (`Store<RedisEngine>`). Both offer the operations below with the same
/// meaning, and implement [`IdempotencyStore`](bus_core::IdempotencyStore).
///
/// Handles are cheap to clone; [`namespace`](Self::namespace) returns
/// handles on other namespaces of the same store, and
/// [`close`](Self::close) on any handle closes the store for all of them.
#[derive(Debug, Clone)]
pub struct Store<E: Engine> {
    pub(crate) engine: E,
}

impl<E: Engine> Store<E> {
    pub(crate) fn new(engine: E) -> Self {
        Store { engine }
    }

    /// Claims `key` for `ttl` if it is absent or expired: the `bus-core`
    /// operation. See [`claim`](Self::claim) for the lease-returning form.
    pub async fn try_claim(&self, key: &MessageId, ttl: Duration) -> Result<ClaimOutcome> {
        front::try_claim(&self.engine, key, ttl).await
    }

    /// Claims `key` for `ttl` and, if it was free, returns the
    /// [`Lease`]; otherwise what holds it.
    pub async fn claim(&self, key: &MessageId, ttl: Duration) -> Result<ClaimResult> {
        front::claim(&self.engine, key, ttl, None).await
    }

    /// Like [`claim`](Self::claim), recording `fingerprint` (a hash of the
    /// payload, at most 64 bytes). A later fingerprinted claim of the same
    /// live key with a different fingerprint returns
    /// [`ClaimResult::Conflict`] instead of a duplicate.
    pub async fn claim_with_fingerprint(
        &self,
        key: &MessageId,
        ttl: Duration,
        fingerprint: &[u8],
    ) -> Result<ClaimResult> {
        front::claim(&self.engine, key, ttl, Some(fingerprint)).await
    }

    /// Records that the handler for `key` ran to completion (the `bus-core`
    /// operation, with no lease check).
    pub async fn mark_done(&self, key: &MessageId) -> Result<()> {
        front::mark_done(&self.engine, key).await
    }

    /// Gives up a pending claim so the message can be retried (the
    /// `bus-core` operation, with no lease check). A completed record is
    /// never erased.
    pub async fn release(&self, key: &MessageId) -> Result<()> {
        front::release(&self.engine, key).await
    }

    /// Marks the leased key done, if the record still holds the lease.
    /// Completing twice with the same lease is fine.
    pub async fn complete(&self, lease: &Lease) -> Result<()> {
        front::complete(&self.engine, lease, None).await
    }

    /// Marks the leased key done and caches `result` for later claims of
    /// the key ([`ClaimResult::Done`]). Results over the builder's
    /// `max_result_size` are refused, with the record left unchanged.
    pub async fn complete_with(&self, lease: &Lease, result: &[u8]) -> Result<()> {
        front::complete(&self.engine, lease, Some(result)).await
    }

    /// Removes the leased claim so the message can be retried, if the
    /// record still holds the lease.
    pub async fn abandon(&self, lease: &Lease) -> Result<()> {
        front::abandon(&self.engine, lease).await
    }

    /// Pushes the leased claim's expiry to `now + ttl`, if the record still
    /// holds the lease, and returns the lease with its new expiry. A long
    /// handler calls this before its claim runs out, so that no other
    /// worker takes the message over.
    pub async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        front::extend(&self.engine, lease, ttl).await
    }

    /// The live record for `key` in this namespace, or `None` if it is
    /// absent or expired, by the store's clock (on Redis the server's,
    /// unless the builder was given one). Never waits for a flush.
    pub async fn get(&self, key: &MessageId) -> Result<Option<Record>> {
        self.engine.get(key).await
    }

    /// The record stored for `key`, live or expired, as it is stored. An
    /// expired `Pending` is remembered for the builder's
    /// `pending_retention` after its expiry; past that, and for an expired
    /// `Done`, every operation treats the record as absent, and this shows
    /// it until it is removed (by the sweeper on sled, by the server's
    /// expiry on Redis). Never waits for a flush.
    pub async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        self.engine.get_record(key).await
    }

    /// The name of this handle's namespace
    /// ([`DEFAULT_NAMESPACE`](crate::DEFAULT_NAMESPACE) for the handle
    /// `open` returns).
    pub fn namespace_name(&self) -> &str {
        self.engine.namespace()
    }

    /// A handle on namespace `name`, created on first use. Each namespace
    /// is its own keyspace (one per consumer, say) with the same
    /// operations; all share this store.
    ///
    /// Names are 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
    pub async fn namespace(&self, name: &str) -> Result<Self> {
        self.engine.open_namespace(name).await.map(Store::new)
    }

    /// The names of every namespace of the store, the default first.
    pub async fn namespaces(&self) -> Result<Vec<String>> {
        self.engine.namespaces().await
    }

    /// Closes the store for every handle: later calls return
    /// [`Error::Closed`](crate::Error::Closed). On sled it stops the
    /// sweeper, makes every write durable (flush and fdatasync, whatever
    /// the durability mode) and releases the database lock; any number of
    /// calls, concurrent or not, on any handles, each return only once
    /// that is done, all with the same outcome, and a reopen right after
    /// any of them succeeds. The close runs on its own task, so dropping
    /// this future does not leave it half done; a latched store
    /// ([`Error::PreviousIo`](crate::Error::PreviousIo)) still stops and
    /// releases the lock, and returns the failure; the final flush is
    /// bounded by the durability timeout. On Redis every acknowledged
    /// write is already on the server, so there is nothing to flush.
    pub async fn close(&self) -> Result<()> {
        self.engine.close().await
    }
}

#[async_trait::async_trait]
impl<E: Engine> bus_core::IdempotencyStore for Store<E> {
    async fn try_claim(
        &self,
        key: &MessageId,
        ttl: Duration,
    ) -> std::result::Result<ClaimOutcome, bus_core::BusError> {
        Ok(Store::try_claim(self, key, ttl).await?)
    }

    async fn mark_done(&self, key: &MessageId) -> std::result::Result<(), bus_core::BusError> {
        Ok(Store::mark_done(self, key).await?)
    }

    async fn release(&self, key: &MessageId) -> std::result::Result<(), bus_core::BusError> {
        Ok(Store::release(self, key).await?)
    }
}
