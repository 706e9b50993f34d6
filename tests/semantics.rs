//! Every cell of the semantics table (docs/semantics.md, "Semantics"; `src/machine.rs`):
//! claim, done and release against an absent key, a live or expired `Pending`, and a live or expired `Done`,
//! including expired records the sweeper has not removed yet.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome::*, IdempotencyStore, State};

const AFTER_TTL: Duration = Duration::from_secs(31);

#[tokio::test]
async fn claim_of_absent_key_is_claimed_then_duplicates_are_pending() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyPending);
    fx.advance(Duration::from_secs(29));
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyPending);
    Ok(())
}

#[tokio::test]
async fn claim_of_live_done_is_already_done() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    fx.advance(Duration::from_secs(29));
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    Ok(())
}

#[tokio::test]
async fn expiry_is_exact_to_the_millisecond() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    fx.advance(TTL - Duration::from_millis(1));
    assert_eq!(
        store.try_claim(&id(1), TTL).await?,
        AlreadyPending,
        "live while now < expires_at"
    );
    fx.advance(Duration::from_millis(1));
    assert_eq!(
        store.try_claim(&id(1), TTL).await?,
        Claimed,
        "expired at now == expires_at"
    );
    Ok(())
}

#[tokio::test]
async fn claim_of_expired_unswept_pending_takes_over_and_counts_the_attempt() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    let first = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(first.attempts, 1);
    fx.advance(AFTER_TTL);
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    let second = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(second.state, State::Pending);
    assert_eq!(
        second.attempts, 2,
        "taking over an expired claim counts an attempt"
    );
    assert!(
        second.token > first.token,
        "a new claim carries a new, larger token"
    );
    assert_eq!(second.expires_at, common::T0 + 31_000 + 30_000);
    Ok(())
}

#[tokio::test]
async fn claim_of_expired_unswept_done_starts_afresh() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    fx.advance(AFTER_TTL);
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    let record = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!((record.state, record.attempts), (State::Pending, 1));
    Ok(())
}

#[tokio::test]
async fn duplicate_claims_do_not_write() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    let before = store.get_record(&id(1)).await?;
    fx.advance(Duration::from_secs(5));
    store.try_claim(&id(1), Duration::from_secs(999)).await?;
    assert_eq!(
        store.get_record(&id(1)).await?,
        before,
        "AlreadyPending must not touch the record"
    );
    store.mark_done(&id(1)).await?;
    let done = store.get_record(&id(1)).await?;
    store.try_claim(&id(1), Duration::from_secs(999)).await?;
    assert_eq!(
        store.get_record(&id(1)).await?,
        done,
        "AlreadyDone must not touch the record"
    );
    Ok(())
}

#[tokio::test]
async fn mark_done_of_live_pending_keeps_it_for_the_claim_ttl() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    fx.advance(Duration::from_secs(10));
    store.mark_done(&id(1)).await?;
    let record = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(record.state, State::Done);
    assert_eq!(
        record.expires_at,
        common::T0 + 10_000 + 30_000,
        "retention = claim ttl from now"
    );
    Ok(())
}

#[tokio::test]
async fn mark_done_of_expired_pending_acts_as_on_a_live_one() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    let claimed = store.get_record(&id(1)).await?.ok_or("record missing")?;
    fx.advance(AFTER_TTL);
    store.mark_done(&id(1)).await?;
    let record = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(record.state, State::Done);
    assert_eq!(record.token, claimed.token);
    assert_eq!(record.expires_at, common::T0 + 31_000 + 30_000);
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    Ok(())
}

#[tokio::test]
async fn mark_done_of_absent_key_records_done_with_the_default_ttl() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .default_ttl(Duration::from_secs(100))
        .open()
        .await?;
    store.mark_done(&id(1)).await?;
    let record = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(
        (record.state, record.expires_at),
        (State::Done, common::T0 + 100_000)
    );
    assert_eq!(
        store.try_claim(&id(1), TTL).await?,
        AlreadyDone,
        "the handler ran: no re-run"
    );
    Ok(())
}

#[tokio::test]
async fn mark_done_of_expired_done_writes_a_fresh_done() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    fx.advance(AFTER_TTL);
    store.mark_done(&id(1)).await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    Ok(())
}

#[tokio::test]
async fn mark_done_of_live_done_does_not_write() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    let before = store.get_record(&id(1)).await?;
    fx.advance(Duration::from_secs(10));
    store.mark_done(&id(1)).await?;
    assert_eq!(
        store.get_record(&id(1)).await?,
        before,
        "retention is not extended"
    );
    Ok(())
}

#[tokio::test]
async fn done_retention_overrides_the_claim_ttl() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .done_retention(Duration::from_secs(3600))
        .open()
        .await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    store.mark_done(&id(2)).await?;
    for key in [id(1), id(2)] {
        let record = store.get_record(&key).await?.ok_or("record missing")?;
        assert_eq!(record.expires_at, common::T0 + 3_600_000);
    }
    Ok(())
}

#[tokio::test]
async fn release_of_live_and_expired_pending_removes_it() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.try_claim(&id(2), TTL).await?;
    store.release(&id(1)).await?;
    assert!(store.get_record(&id(1)).await?.is_none());
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    fx.advance(AFTER_TTL);
    store.release(&id(2)).await?;
    assert!(
        store.get_record(&id(2)).await?.is_none(),
        "expired pending is released too"
    );
    let again = store.get_record(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(again.attempts, 1, "a released key starts counting afresh");
    Ok(())
}

#[tokio::test]
async fn release_never_erases_a_done_record_live_or_expired() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    let done = store.get_record(&id(1)).await?;
    store.release(&id(1)).await?;
    assert_eq!(store.get_record(&id(1)).await?, done);
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    fx.advance(AFTER_TTL);
    store.release(&id(1)).await?;
    assert_eq!(
        store.get_record(&id(1)).await?,
        done,
        "expired done is left for the sweeper"
    );
    Ok(())
}

#[tokio::test]
async fn release_of_absent_key_is_ok_and_writes_nothing() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.release(&id(7)).await?;
    assert!(store.get_record(&id(7)).await?.is_none());
    assert_eq!(
        store.sweep_expired().await?.examined,
        0,
        "nothing was stored"
    );
    Ok(())
}

#[tokio::test]
async fn the_store_works_behind_the_bus_core_trait_object() -> TestResult {
    let fx = Fixture::new();
    let store: std::sync::Arc<dyn IdempotencyStore> = std::sync::Arc::new(fx.open().await?);
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyPending);
    store.release(&id(1)).await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    store.mark_done(&id(1)).await?;
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    Ok(())
}
