//! Closing and dropping: any number of concurrent `close()` calls each
//! return only once the database is durable and its lock released; a reopen
//! right after a drop in the same process succeeds; nothing works after
//! `close()`; a call future cancelled mid-flight leaves the store
//! consistent.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome, ClaimResult, Durability, Error};

/// Whether sled's directory lock on `path` is free right now. Checks run
/// one at a time: two concurrent checks would see each other's lock.
fn lock_is_free(path: &std::path::Path) -> std::io::Result<bool> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = std::fs::File::open(path.join("db"))?;
    Ok(match file.try_lock() {
        Ok(()) => {
            file.unlock()?;
            true
        }
        Err(_) => false,
    })
}

/// Regression: a second `close()` took the database while the first was
/// still joining the sweeper; the first then returned early, and a reopen
/// right after it failed with `Locked` (10 of 10 runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_closes_each_return_after_the_lock_is_released() -> TestResult {
    for round in 0..10 {
        let fx = Fixture::new();
        let store = fx.open_with(Durability::Sync).await?;
        let other = store.namespace("other").await?;
        store.try_claim(&id(1), TTL).await?;
        other.try_claim(&id(2), TTL).await?;
        let closers: Vec<_> = (0..8)
            .map(|n| {
                let handle = if n % 2 == 0 {
                    store.clone()
                } else {
                    other.clone()
                };
                let path = fx.path();
                tokio::spawn(async move {
                    handle.close().await?;
                    // Checked the moment this close returned.
                    Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(lock_is_free(&path)?)
                })
            })
            .collect();
        for closer in closers {
            assert!(
                closer.await??,
                "round {round}: close returned with the lock held"
            );
        }
        let store = fx.open_with(Durability::Sync).await?;
        assert_eq!(
            store.try_claim(&id(1), TTL).await?,
            ClaimOutcome::AlreadyPending
        );
        store.close().await?;
    }
    Ok(())
}

/// Regression: after `close()`, `namespace("existing")` returned a handle.
#[tokio::test]
async fn nothing_works_after_close() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let billing = store.namespace("billing").await?;
    store.close().await?;
    for name in ["billing", "default", "new-one"] {
        assert!(
            matches!(store.namespace(name).await, Err(Error::Closed)),
            "namespace({name:?}) after close"
        );
    }
    assert!(matches!(
        billing.try_claim(&id(1), TTL).await,
        Err(Error::Closed)
    ));
    assert!(matches!(store.get(&id(1)).await, Err(Error::Closed)));
    assert!(matches!(
        store.list(None, None, 10).await,
        Err(Error::Closed)
    ));
    assert!(matches!(store.stats().await, Err(Error::Closed)));
    assert!(matches!(store.sweep_expired().await, Err(Error::Closed)));
    billing.close().await?; // closing again is fine
    Ok(())
}

/// Dropping the last handle hands the final flush and the lock release to a
/// background thread; an open of the same directory in this process waits
/// for it, so a reopen right after the drop succeeds and sees every write.
#[tokio::test]
async fn a_reopen_right_after_a_drop_succeeds() -> TestResult {
    let fx = Fixture::new();
    for round in 0..20u128 {
        let store = fx
            .builder()
            .durability(Durability::Periodic(Duration::from_secs(3600)))
            .open()
            .await?;
        assert_eq!(
            store.try_claim(&id(round), TTL).await?,
            ClaimOutcome::Claimed
        );
        drop(store);
        let store = fx.open().await?;
        for k in 0..=round {
            assert_eq!(
                store.try_claim(&id(k), TTL).await?,
                ClaimOutcome::AlreadyPending,
                "round {round}, key {k}"
            );
        }
        drop(store);
    }
    Ok(())
}

/// A claim whose future is dropped while it waits for its flush leaves a
/// pending claim that nobody holds: duplicates see it as in progress until
/// its ttl runs out, then a redelivery takes it over as attempt 2. Nothing
/// else is disturbed, and the store closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_claim_leaves_a_pending_claim_that_expires() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open_with(Durability::Sync).await?;
    let mut cancelled = 0;
    for k in 0..50 {
        // Polled once (the write happens), then dropped at its first await
        // that is not ready: the durability wait, or the state lock.
        let result = tokio::time::timeout(Duration::ZERO, store.try_claim(&id(k), TTL)).await;
        if result.is_err() {
            cancelled += 1;
        }
    }
    assert!(cancelled > 0, "no claim was cancelled mid-flight");
    for k in 0..50 {
        match store.get_record(&id(k)).await? {
            // Cancelled before its write: the key is free.
            None => assert_eq!(store.try_claim(&id(k), TTL).await?, ClaimOutcome::Claimed),
            Some(_) => {
                assert_eq!(
                    store.try_claim(&id(k), TTL).await?,
                    ClaimOutcome::AlreadyPending
                );
            }
        }
    }
    fx.advance(TTL);
    let ClaimResult::Acquired(lease) = store.claim(&id(0), TTL).await? else {
        return Err("the expired claim can be taken over".into());
    };
    assert_eq!(lease.attempt(), 2);
    store.close().await?;
    let store = fx.open().await?;
    assert!(store.get(&id(0)).await?.is_some());
    store.close().await?;
    Ok(())
}

/// Regression: the sweeper upgrades its `Weak` for a moment per batch. A
/// last handle dropped in that moment left the store's `Drop` to run later,
/// on the sweeper's task, so an `open` right after the drop did not know to
/// wait for the release and failed with `Locked` (5 of 3,000 reopens). The
/// last handle now marks the release itself, on the dropping thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_while_the_sweeper_runs_does_not_make_a_reopen_fail() -> TestResult {
    let fx = Fixture::new();
    let open = || {
        fx.builder()
            .durability(Durability::Periodic(Duration::from_secs(3600)))
            .sweep_interval(Duration::from_millis(1))
            .open()
    };
    let mut store = open().await?;
    for round in 0..1_000u32 {
        tokio::time::sleep(Duration::from_millis(1)).await; // meet the sweeper's tick
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_micros(u64::from(round % 20)) {}
        drop(store);
        store = match open().await {
            Ok(store) => store,
            Err(e) => return Err(format!("round {round}: reopen after a drop: {e}").into()),
        };
    }
    store.close().await?;
    Ok(())
}
