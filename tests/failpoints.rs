//! An I/O failure in the middle of a write (sled's `failpoints` feature)
//! surfaces as a clear error, never a panic, and after reopening the store
//! holds every operation acknowledged before the fault.
//!
//! sled's failpoint registry is process-wide, so the tests in this file take
//! one lock and run one at a time.

mod common;

use std::sync::Mutex;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome::*, Durability, Error, SledIdempotencyStore, State};

static FAILPOINTS: Mutex<()> = Mutex::new(());

/// Claims 0..n, completes the even ones.
async fn acknowledged(store: &SledIdempotencyStore, n: u128) -> TestResult {
    for k in 0..n {
        assert_eq!(store.try_claim(&id(k), TTL).await?, Claimed);
        if k % 2 == 0 {
            store.mark_done(&id(k)).await?;
        }
    }
    Ok(())
}

async fn assert_acknowledged(store: &SledIdempotencyStore, n: u128) -> TestResult {
    for k in 0..n {
        let expected = if k % 2 == 0 {
            AlreadyDone
        } else {
            AlreadyPending
        };
        assert_eq!(store.try_claim(&id(k), TTL).await?, expected, "key {k}");
    }
    Ok(())
}

/// Fails the log write of `nth` flush after the acknowledged prefix, then
/// checks the error, the reopen and the data.
async fn write_fails(durability: Durability, failpoint: &'static str, bitset: u64) -> TestResult {
    let fx = Fixture::new();
    let store = fx.open_with(durability).await?;
    acknowledged(&store, 20).await?;

    sled::fail::set(failpoint, bitset);
    let mut failure = None;
    for k in 100..200 {
        let result = match k % 3 {
            0 => store.try_claim(&id(k), TTL).await.map(|_| ()),
            1 => store.mark_done(&id(k)).await,
            _ => store.release(&id(k - 1)).await,
        };
        if let Err(err) = result {
            failure = Some(err);
            break;
        }
    }
    sled::fail::reset();
    let err = failure.ok_or("the failpoint never fired")?;
    assert!(
        matches!(err, Error::Durability(_) | Error::Storage { .. }),
        "unexpected error kind: {err}"
    );
    let text = err.to_string();
    println!("{durability:?} / {failpoint}: {text}");
    assert!(
        text.contains("durable") || text.contains("storage error"),
        "{text}"
    );

    // The store stays usable as an error source: calls fail cleanly.
    let _ = store.try_claim(&id(999), TTL).await;
    drop(store);

    let store = fx.open_with(durability).await?;
    assert_acknowledged(&store, 20).await?;
    // Nothing is half-written: every record left by the failed phase decodes.
    for k in 100..200 {
        if let Some(record) = store.get_record(&id(k)).await? {
            assert!(matches!(record.state, State::Pending | State::Done));
        }
    }
    store.close().await?;
    Ok(())
}

/// Runs `scenario` on its own runtime while holding the failpoint lock.
fn serially(scenario: impl std::future::Future<Output = TestResult>) -> TestResult {
    let _serial = FAILPOINTS.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(scenario)
}

#[test]
fn a_failed_log_write_under_sync_loses_nothing_acknowledged() -> TestResult {
    serially(write_fails(Durability::Sync, "buffer write", 1))
}

#[test]
fn a_failed_log_write_under_flush_loses_nothing_acknowledged() -> TestResult {
    serially(write_fails(Durability::Flush, "buffer write", 1 << 3))
}

#[test]
fn a_failure_after_the_write_loses_nothing_acknowledged() -> TestResult {
    serially(write_fails(Durability::Sync, "buffer write post", 1 << 2))
}
