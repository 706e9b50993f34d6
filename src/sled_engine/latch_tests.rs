//! The I/O-failure latch, with faults injected into the flusher (a failed
//! fdatasync, a hung flush, a panicking flusher thread), in every durability
//! mode. What each test proves is in its doc comment.

use std::time::Duration;

use bus_core::{ClaimOutcome, MessageId};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::sled_engine::flusher::Fault;
use crate::sled_engine::store::SledIdempotencyStore;

const TTL: Duration = Duration::from_secs(60);
const MODES: [Durability; 3] = [
    Durability::Sync,
    Durability::Flush,
    Durability::Periodic(Duration::from_millis(5)),
];

fn key(n: u128) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u128(n))
}

fn is_latched<T: std::fmt::Debug>(result: &Result<T>) -> bool {
    matches!(result, Err(Error::PreviousIo { .. }))
}

async fn open(path: &std::path::Path, durability: Durability) -> Result<SledIdempotencyStore> {
    SledIdempotencyStore::builder(path)
        .durability(durability)
        .open()
        .await
}

/// Every mutating call fails with `PreviousIo`, at once; reads keep working.
async fn assert_latched(store: &SledIdempotencyStore) -> Result<()> {
    for n in 1000..1003 {
        let claim = store.try_claim(&key(n), TTL).await;
        assert!(is_latched(&claim), "a claim after the failure: {claim:?}");
    }
    assert!(is_latched(&store.mark_done(&key(1)).await));
    assert!(is_latched(&store.release(&key(1)).await));
    assert!(is_latched(&store.claim(&key(1), TTL).await));
    assert!(
        store.get_record(&key(1)).await?.is_some(),
        "reads keep working"
    );
    Ok(())
}

/// A failed fdatasync latches the store in every mode: writers that waited
/// across the failed flush are refused, later writers are refused before
/// they write, `close` (twice) returns the failure, and a reopen keeps every
/// write acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_latches_the_store_in_every_mode() -> Result<()> {
    for durability in MODES {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let path = dir.path().join("db");
        let store = open(&path, durability).await?;
        assert_eq!(store.try_claim(&key(1), TTL).await?, ClaimOutcome::Claimed);
        store.engine.flusher_inject(Fault::Fail).await?;
        if let Durability::Periodic(_) = durability {
            // Acknowledged at once; the periodic flush then fails.
            assert_eq!(store.try_claim(&key(2), TTL).await?, ClaimOutcome::Claimed);
            let mut waited = 0;
            while !is_latched(&store.try_claim(&key(3 + waited), TTL).await) {
                waited += 1;
                assert!(
                    waited < 1000,
                    "{durability:?}: the failed flush never latched"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            // Writers waiting across the failed flush: none is acknowledged.
            let writers: Vec<_> = (2..10)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move { store.try_claim(&key(n), TTL).await })
                })
                .collect();
            for writer in writers {
                let result = writer
                    .await
                    .map_err(|e| Error::InvalidConfig(e.to_string()))?;
                assert!(is_latched(&result), "{durability:?}: {result:?}");
            }
        }
        assert_latched(&store).await?;
        let closed = store.close().await;
        assert!(
            is_latched(&closed),
            "{durability:?}: close returned {closed:?}"
        );
        assert!(is_latched(&store.close().await), "a second close too");

        let store = open(&path, durability).await?;
        assert_eq!(
            store.try_claim(&key(1), TTL).await?,
            ClaimOutcome::AlreadyPending,
            "{durability:?}: the claim acknowledged before the failure"
        );
        store.close().await?;
    }
    Ok(())
}

/// A flush that hangs past the durability timeout fails its writer with
/// `DurabilityTimeout` and latches the store; `close` is bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_flush_times_out_and_latches() -> Result<()> {
    let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
    let store = SledIdempotencyStore::builder(dir.path().join("db"))
        .durability_timeout(Duration::from_millis(300))
        .open()
        .await?;
    store
        .engine
        .flusher_inject(Fault::Stall(Duration::from_secs(2)))
        .await?;
    let started = std::time::Instant::now();
    let claim = store.try_claim(&key(1), TTL).await;
    assert!(
        matches!(claim, Err(Error::DurabilityTimeout { .. })),
        "{claim:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the wait is bounded"
    );
    assert_latched(&store).await?;
    let closed = store.close().await;
    assert!(is_latched(&closed), "{closed:?}");
    Ok(())
}

/// A panic of the flusher thread fails the writers waiting on it and
/// latches the store, instead of leaving writes unflushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_flusher_thread_latches_the_store() -> Result<()> {
    for durability in MODES {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let store = open(&dir.path().join("db"), durability).await?;
        store.engine.flusher_inject(Fault::Panic).await?;
        let mut n = 1;
        loop {
            match store.try_claim(&key(n), TTL).await {
                Ok(_) if matches!(durability, Durability::Periodic(_)) && n < 1000 => {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(Error::PreviousIo { cause }) => {
                    assert!(cause.contains("panicked"), "{cause}");
                    break;
                }
                other => panic!("{durability:?}: {other:?}"),
            }
        }
        assert_latched(&store).await?;
        assert!(is_latched(&store.close().await));
    }
    Ok(())
}

/// Dropping the last handle on a tokio worker never waits for the final
/// flush: with that flush hung for two seconds, the drop returns at once, and
/// an open of the same directory waits for the release, then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_does_not_wait_for_the_final_flush() -> Result<()> {
    let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
    let path = dir.path().join("db");
    let store = open(&path, Durability::Periodic(Duration::from_secs(3600))).await?;
    assert_eq!(store.try_claim(&key(1), TTL).await?, ClaimOutcome::Claimed);
    store
        .engine
        .flusher_inject(Fault::Stall(Duration::from_secs(2)))
        .await?;
    let started = std::time::Instant::now();
    drop(store);
    let dropped_in = started.elapsed();
    assert!(
        dropped_in < Duration::from_secs(1),
        "drop took {dropped_in:?}"
    );
    let store = open(&path, Durability::Sync).await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "open waited for the release"
    );
    assert_eq!(
        store.try_claim(&key(1), TTL).await?,
        ClaimOutcome::AlreadyPending
    );
    store.close().await
}
