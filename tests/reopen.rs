//! State survives close + reopen and drop-without-close + reopen: every
//! record, its expiry and token, and fencing tokens keep increasing across
//! restarts (sled's `generate_id` is monotonic across restarts).

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome::*, Durability, Record, SledIdempotencyStore};

/// Claims 0..10, completes 0..4, releases 8..10.
async fn scripted(store: &SledIdempotencyStore) -> TestResult {
    for n in 0..10 {
        assert_eq!(store.try_claim(&id(n), TTL).await?, Claimed);
    }
    for n in 0..4 {
        store.mark_done(&id(n)).await?;
    }
    for n in 8..10 {
        store.release(&id(n)).await?;
    }
    Ok(())
}

async fn snapshot(
    store: &SledIdempotencyStore,
) -> Result<Vec<Option<Record>>, sled_idempotency::Error> {
    let mut out = Vec::new();
    for n in 0..10 {
        out.push(store.get_record(&id(n)).await?);
    }
    Ok(out)
}

fn max_token(records: &[Option<Record>]) -> u64 {
    records.iter().flatten().map(|r| r.token).max().unwrap_or(0)
}

async fn check_after_reopen(
    fx: &Fixture,
    before: Vec<Option<Record>>,
    durability: Durability,
) -> TestResult {
    let store = fx.open_with(durability).await?;
    assert_eq!(
        snapshot(&store).await?,
        before,
        "every record survives as it was"
    );
    for n in 0..4 {
        assert_eq!(store.try_claim(&id(n), TTL).await?, AlreadyDone);
    }
    for n in 4..8 {
        assert_eq!(store.try_claim(&id(n), TTL).await?, AlreadyPending);
    }
    assert_eq!(
        store.try_claim(&id(8), TTL).await?,
        Claimed,
        "released keys stay free"
    );
    let token = store
        .get_record(&id(8))
        .await?
        .ok_or("record missing")?
        .token;
    assert!(
        token > max_token(&before),
        "token {token} must exceed every earlier token"
    );
    store.close().await?;
    Ok(())
}

/// Runs the script in every durability mode, ends the store with `close`
/// or a plain drop, and checks the reopened database.
async fn restart_keeps_everything(close: bool) -> TestResult {
    for durability in [
        Durability::Sync,
        Durability::Flush,
        Durability::Periodic(Duration::from_secs(3600)),
    ] {
        let fx = Fixture::new();
        let store = fx.open_with(durability).await?;
        scripted(&store).await?;
        let before = snapshot(&store).await?;
        if close {
            store.close().await?;
        } else {
            drop(store);
        }
        check_after_reopen(&fx, before, durability).await?;
    }
    Ok(())
}

#[tokio::test]
async fn close_then_reopen_keeps_everything() -> TestResult {
    restart_keeps_everything(true).await
}

#[tokio::test]
async fn drop_without_close_then_reopen_keeps_everything() -> TestResult {
    restart_keeps_everything(false).await
}

#[tokio::test]
async fn tokens_strictly_increase_over_many_restarts() -> TestResult {
    let fx = Fixture::new();
    let mut last = 0;
    for restart in 0..5u128 {
        let store = fx.open().await?;
        for n in 0..20 {
            let key = id(restart * 100 + n);
            assert_eq!(store.try_claim(&key, TTL).await?, Claimed);
            let token = store.get_record(&key).await?.ok_or("record missing")?.token;
            assert!(
                token > last,
                "restart {restart}: token {token} after {last}"
            );
            last = token;
        }
        if restart % 2 == 0 {
            store.close().await?;
        } else {
            drop(store);
        }
    }
    Ok(())
}

#[tokio::test]
async fn calls_after_close_fail_with_closed_and_close_twice_is_fine() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let clone = store.clone();
    store.try_claim(&id(1), TTL).await?;
    store.close().await?;
    store.close().await?;
    let closed =
        |r: sled_idempotency::Result<()>| matches!(r, Err(sled_idempotency::Error::Closed));
    assert!(matches!(
        clone.try_claim(&id(2), TTL).await,
        Err(sled_idempotency::Error::Closed)
    ));
    assert!(closed(clone.mark_done(&id(1)).await));
    assert!(closed(clone.release(&id(1)).await));
    assert!(matches!(
        clone.get_record(&id(1)).await,
        Err(sled_idempotency::Error::Closed)
    ));
    assert!(matches!(
        clone.sweep_expired().await,
        Err(sled_idempotency::Error::Closed)
    ));
    // The lock is released: the directory opens again, state intact.
    let again = fx.open().await?;
    assert_eq!(again.try_claim(&id(1), TTL).await?, AlreadyPending);
    Ok(())
}
