//! The layer both engines share, above their atomic operations
//! (`crate::engine`): argument checks, leases and their namespace, the
//! `bus-core` outcomes, counters and logging. [`Store`](crate::Store)'s methods call
//! these functions, so a rule about leases or arguments
//! is written once for sled and Redis alike.

use std::time::Duration;

use bus_core::{ClaimOutcome, MessageId};

use crate::clock::millis;
use crate::count::Count;
use crate::engine::{Acquired, Engine, Finished};
use crate::error::{Error, Result};
use crate::lease::{ClaimResult, Lease};
use crate::machine::Holder;
use crate::record::MAX_FINGERPRINT_LEN;

fn bump(engine: &impl Engine, count: Count) {
    if let Some(counters) = engine.counters() {
        counters.bump(count);
    }
}

/// `ttl` in whole milliseconds, at least one.
fn ttl_ms(ttl: Duration) -> Result<u64> {
    match millis(ttl) {
        0 => Err(Error::TtlTooShort { ttl }),
        ms => Ok(ms),
    }
}

/// The `bus-core` claim: the outcome only, no lease built.
pub(crate) async fn try_claim<E: Engine>(
    engine: &E,
    key: &MessageId,
    ttl: Duration,
) -> Result<ClaimOutcome> {
    Ok(match acquire(engine, key, ttl, None).await? {
        Acquired::Lease { .. } => ClaimOutcome::Claimed,
        Acquired::Not(ClaimResult::Done { .. }) => ClaimOutcome::AlreadyDone,
        Acquired::Not(_) => ClaimOutcome::AlreadyPending,
    })
}

/// A claim, optionally fingerprinted, with the lease it acquired.
pub(crate) async fn claim<E: Engine>(
    engine: &E,
    key: &MessageId,
    ttl: Duration,
    fingerprint: Option<&[u8]>,
) -> Result<ClaimResult> {
    if let Some(fingerprint) = fingerprint
        && fingerprint.len() > MAX_FINGERPRINT_LEN
    {
        return Err(Error::FingerprintTooLong {
            len: fingerprint.len(),
            max: MAX_FINGERPRINT_LEN,
        });
    }
    Ok(match acquire(engine, key, ttl, fingerprint).await? {
        Acquired::Lease {
            token,
            expires_at,
            attempts,
        } => ClaimResult::Acquired(Lease {
            key: key.clone(),
            namespace: engine.namespace().into(),
            token,
            expires_at,
            attempt: attempts,
        }),
        Acquired::Not(found) => found,
    })
}

async fn acquire<E: Engine>(
    engine: &E,
    key: &MessageId,
    ttl: Duration,
    fingerprint: Option<&[u8]>,
) -> Result<Acquired> {
    #[cfg(feature = "metrics")]
    let started = std::time::Instant::now();
    let acquired = engine.acquire(key, ttl, ttl_ms(ttl)?, fingerprint).await;
    // Failed claims too: a durability timeout belongs in the latencies.
    #[cfg(feature = "metrics")]
    if let Some(counters) = engine.counters() {
        counters.meters().claim_took(started.elapsed());
    }
    let acquired = acquired?;
    let namespace = engine.namespace();
    match &acquired {
        Acquired::Lease {
            token, attempts, ..
        } => {
            bump(engine, Count::Claims);
            tracing::debug!(key = %key, namespace, token, attempts, "claimed");
        }
        Acquired::Not(ClaimResult::Done { .. }) => bump(engine, Count::DuplicatesDone),
        Acquired::Not(ClaimResult::Conflict { .. }) => {
            bump(engine, Count::FingerprintConflicts);
            tracing::warn!(key = %key, namespace, "claim with a different payload fingerprint");
        }
        Acquired::Not(_) => bump(engine, Count::DuplicatesPending),
    }
    Ok(acquired)
}

pub(crate) async fn mark_done<E: Engine>(engine: &E, key: &MessageId) -> Result<()> {
    let namespace = engine.namespace();
    match engine.done(key).await? {
        Some(true) => {
            bump(engine, Count::LateCompletions);
            tracing::warn!(key = %key, namespace, "late completion: marked done with no claim on record");
        }
        Some(false) => {
            bump(engine, Count::Completions);
            tracing::debug!(key = %key, namespace, "marked done");
        }
        None => {}
    }
    Ok(())
}

pub(crate) async fn release<E: Engine>(engine: &E, key: &MessageId) -> Result<()> {
    if engine.release(key).await? {
        bump(engine, Count::Releases);
        tracing::debug!(key = %key, namespace = engine.namespace(), "released");
    }
    Ok(())
}

pub(crate) async fn complete<E: Engine>(
    engine: &E,
    lease: &Lease,
    result: Option<&[u8]>,
) -> Result<()> {
    if let Some(result) = result
        && result.len() > engine.max_result_size()
    {
        return Err(Error::ResultTooLarge {
            size: result.len(),
            limit: engine.max_result_size(),
        });
    }
    let finished = leased(
        engine,
        lease,
        engine.complete(&lease.key, lease.token, result),
    )
    .await?;
    match finished {
        Finished::Wrote => {
            bump(engine, Count::Completions);
            tracing::debug!(key = %lease.key, namespace = engine.namespace(), token = lease.token, "completed");
            Ok(())
        }
        Finished::Already => Ok(()),
        Finished::DifferentResult => Err(Error::DifferentResult {
            key: lease.key.to_string(),
            token: lease.token,
        }),
    }
}

pub(crate) async fn abandon<E: Engine>(engine: &E, lease: &Lease) -> Result<()> {
    leased(engine, lease, engine.abandon(&lease.key, lease.token)).await?;
    bump(engine, Count::Releases);
    tracing::debug!(key = %lease.key, namespace = engine.namespace(), token = lease.token, "abandoned");
    Ok(())
}

/// Gives the leased claim back the way a crashed worker would, but at
/// once: the record expires now and stays remembered, so the next claim
/// takes it over as attempt `n + 1` (an [`abandon`] would erase the count,
/// and a handler that fails or panics every time would never reach a
/// maximum of attempts). An extension to `now`, on both engines.
#[cfg(feature = "handlers")]
pub(crate) async fn give_back<E: Engine>(engine: &E, lease: &Lease) -> Result<()> {
    leased(
        engine,
        lease,
        engine.extend(&lease.key, lease.token, Duration::ZERO, 0),
    )
    .await?;
    bump(engine, Count::Releases);
    tracing::debug!(key = %lease.key, namespace = engine.namespace(), token = lease.token, "given back");
    Ok(())
}

pub(crate) async fn extend<E: Engine>(engine: &E, lease: &Lease, ttl: Duration) -> Result<Lease> {
    let ttl_ms = ttl_ms(ttl)?;
    let expires_at = leased(
        engine,
        lease,
        engine.extend(&lease.key, lease.token, ttl, ttl_ms),
    )
    .await?;
    tracing::debug!(key = %lease.key, namespace = engine.namespace(), token = lease.token, expires_at, "lease extended");
    Ok(Lease {
        expires_at,
        ..lease.clone()
    })
}

/// Runs a lease operation after checking the lease's namespace; a record
/// that no longer holds the lease becomes [`Error::LeaseLost`], counted and
/// logged.
async fn leased<E: Engine, T>(
    engine: &E,
    lease: &Lease,
    operation: impl Future<Output = Result<Result<T, Holder>>>,
) -> Result<T> {
    if *lease.namespace != *engine.namespace() {
        return Err(Error::WrongNamespace {
            lease: lease.namespace.to_string(),
            handle: engine.namespace().to_string(),
        });
    }
    match operation.await? {
        Ok(out) => Ok(out),
        Err(holds) => {
            bump(engine, Count::LeaseConflicts);
            tracing::warn!(key = %lease.key, namespace = engine.namespace(), token = lease.token, holds = %holds, "lease no longer held");
            Err(lease.lost(holds))
        }
    }
}
