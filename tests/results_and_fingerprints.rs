//! Cached results and payload fingerprints: returned to later claims,
//! surviving restarts; oversized results refused with the record unchanged;
//! a reused message id with different content reported as a conflict.

mod common;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome, ClaimResult, Error, SledIdempotencyStore, State};

fn lease(result: ClaimResult) -> Result<sled_idempotency::Lease, String> {
    match result {
        ClaimResult::Acquired(lease) => Ok(lease),
        other => Err(format!("expected a lease, got {other:?}")),
    }
}

#[tokio::test]
async fn a_cached_result_is_returned_to_later_claims_and_survives_restarts() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let l = lease(store.claim(&id(1), TTL).await?)?;
    store.complete_with(&l, b"{\"order\":42}").await?;
    let l2 = lease(store.claim(&id(2), TTL).await?)?;
    store.complete(&l2).await?;
    let cached = ClaimResult::Done {
        result: Some(b"{\"order\":42}".to_vec()),
    };
    assert_eq!(store.claim(&id(1), TTL).await?, cached);
    assert_eq!(
        store.claim(&id(2), TTL).await?,
        ClaimResult::Done { result: None }
    );
    assert_eq!(
        store.try_claim(&id(1), TTL).await?,
        ClaimOutcome::AlreadyDone
    );
    drop(store);
    let store = fx.open().await?;
    assert_eq!(store.claim(&id(1), TTL).await?, cached);
    fx.advance(TTL);
    assert!(
        store.claim(&id(1), TTL).await?.lease().is_some(),
        "the result expires with the record"
    );
    Ok(())
}

#[tokio::test]
async fn an_oversized_result_is_refused_and_the_record_is_unchanged() -> TestResult {
    let fx = Fixture::new();
    let store = fx.builder().max_result_size(8).open().await?;
    let l = lease(store.claim(&id(1), TTL).await?)?;
    let before = store.get_record(&id(1)).await?;
    let err = store
        .complete_with(&l, b"123456789")
        .await
        .expect_err("9 bytes > 8");
    assert!(
        matches!(err, Error::ResultTooLarge { size: 9, limit: 8 }),
        "{err}"
    );
    assert!(err.to_string().contains("max_result_size"), "{err}");
    assert_eq!(
        store.get_record(&id(1)).await?,
        before,
        "still pending under the same lease"
    );
    store.complete_with(&l, b"12345678").await?;
    assert_eq!(
        store.claim(&id(1), TTL).await?,
        ClaimResult::Done {
            result: Some(b"12345678".to_vec())
        }
    );
    Ok(())
}

#[tokio::test]
async fn a_result_limit_above_the_supported_maximum_is_refused() -> TestResult {
    let fx = Fixture::new();
    let err = SledIdempotencyStore::builder(fx.path())
        .max_result_size(sled_idempotency::MAX_RESULT_LIMIT + 1)
        .open()
        .await
        .expect_err("too large a limit");
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_largest_allowed_result_round_trips() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .max_result_size(sled_idempotency::MAX_RESULT_LIMIT)
        .open()
        .await?;
    let big: Vec<u8> = (0..sled_idempotency::MAX_RESULT_LIMIT)
        .map(|i| (i % 251) as u8)
        .collect();
    let l = lease(store.claim(&id(1), TTL).await?)?;
    store.complete_with(&l, &big).await?;
    store.close().await?;
    let store = fx.open().await?;
    assert_eq!(
        store.claim(&id(1), TTL).await?,
        ClaimResult::Done { result: Some(big) }
    );
    Ok(())
}

#[tokio::test]
async fn a_different_fingerprint_is_a_conflict_the_same_is_a_duplicate() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let l = lease(
        store
            .claim_with_fingerprint(&id(1), TTL, b"sha256:aaa")
            .await?,
    )?;
    assert!(matches!(
        store
            .claim_with_fingerprint(&id(1), TTL, b"sha256:aaa")
            .await?,
        ClaimResult::InProgress { attempts: 1, .. }
    ));
    assert_eq!(
        store
            .claim_with_fingerprint(&id(1), TTL, b"sha256:bbb")
            .await?,
        ClaimResult::Conflict { done: false }
    );
    // Claims without a fingerprint (and the bus-core trait) do not compare.
    assert!(matches!(
        store.claim(&id(1), TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    assert_eq!(
        store.try_claim(&id(1), TTL).await?,
        ClaimOutcome::AlreadyPending
    );

    store.complete(&l).await?;
    assert_eq!(
        store
            .claim_with_fingerprint(&id(1), TTL, b"sha256:bbb")
            .await?,
        ClaimResult::Conflict { done: true }
    );
    assert_eq!(
        store
            .claim_with_fingerprint(&id(1), TTL, b"sha256:aaa")
            .await?,
        ClaimResult::Done { result: None }
    );
    let record = store.get(&id(1)).await?.ok_or("record missing")?;
    assert_eq!(
        (record.state, record.fingerprint.as_deref()),
        (State::Done, Some(&b"sha256:aaa"[..]))
    );
    Ok(())
}

#[tokio::test]
async fn fingerprints_survive_restarts_and_expire_with_their_record() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let _ = lease(store.claim_with_fingerprint(&id(1), TTL, &[7; 32]).await?)?;
    store.close().await?;
    let store = fx.open().await?;
    assert_eq!(
        store.claim_with_fingerprint(&id(1), TTL, &[8; 32]).await?,
        ClaimResult::Conflict { done: false }
    );
    fx.advance(TTL);
    let l = lease(store.claim_with_fingerprint(&id(1), TTL, &[8; 32]).await?)?;
    assert_eq!(
        l.attempt(),
        2,
        "an expired claim is taken over whatever its fingerprint"
    );
    Ok(())
}

#[tokio::test]
async fn an_overlong_fingerprint_is_refused() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let err = store
        .claim_with_fingerprint(&id(1), TTL, &[0; 65])
        .await
        .expect_err("65 bytes");
    assert!(
        matches!(err, Error::FingerprintTooLong { len: 65, max: 64 }),
        "{err}"
    );
    assert!(store.get_record(&id(1)).await?.is_none());
    Ok(())
}

/// Every record stays inline in sled's log (the file `Durability::Sync`
/// fdatasyncs): even neighbouring keys all caching the largest allowed
/// result never push a node over sled's blob threshold, which would put it
/// in a separate file that sled's flush does not fsync.
#[tokio::test]
async fn the_largest_results_never_spill_into_sled_blob_files() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .max_result_size(sled_idempotency::MAX_RESULT_LIMIT)
        .durability(sled_idempotency::Durability::Periodic(
            std::time::Duration::from_secs(3600),
        ))
        .open()
        .await?;
    let big = vec![0xEE; sled_idempotency::MAX_RESULT_LIMIT];
    for n in 0..300 {
        let l = lease(store.claim_with_fingerprint(&id(n), TTL, &[1; 64]).await?)?;
        store.complete_with(&l, &big).await?;
    }
    store.close().await?;
    let blobs: Vec<_> = std::fs::read_dir(fx.path().join("blobs"))?.collect();
    assert!(blobs.is_empty(), "sled wrote {} blob files", blobs.len());
    Ok(())
}
