//! Inspection: `get` shows live records only, `list` pages through live
//! records by state, and `stats` counts exactly what a scripted sequence of
//! operations did.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimResult, Durability, MessageId, Record, State, Stats};

#[tokio::test]
async fn get_shows_live_records_only() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    let record = store.get(&id(1)).await?.ok_or("live record")?;
    assert_eq!(
        (record.state, record.attempts, record.expires_at),
        (State::Pending, 1, common::T0 + 30_000)
    );
    assert!(record.token > 0);
    fx.advance(TTL);
    assert!(store.get(&id(1)).await?.is_none(), "expired is absent");
    assert!(store.get_record(&id(1)).await?.is_some(), "until swept");
    assert!(store.get(&id(2)).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn list_pages_through_live_records_by_state() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    for n in 0..30 {
        store
            .try_claim(&id(n), if n >= 25 { Duration::from_secs(1) } else { TTL })
            .await?;
        if n % 3 == 0 {
            store.mark_done(&id(n)).await?;
        }
    }
    fx.advance(Duration::from_secs(1)); // 25..30 expire
    let done: Vec<u128> = store
        .list(Some(State::Done), None, 100)
        .await?
        .iter()
        .map(|(k, _)| k.as_uuid().as_u128())
        .collect();
    assert_eq!(done, vec![0, 3, 6, 9, 12, 15, 18, 21, 24]);

    let mut pending = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(Some(State::Pending), after.as_ref(), 4).await?;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        after = page.last().map(|(k, _)| k.clone());
        pending.extend(page.into_iter().map(|(k, r)| {
            assert_eq!(r.state, State::Pending);
            k.as_uuid().as_u128()
        }));
    }
    let expected: Vec<u128> = (0..25).filter(|n| n % 3 != 0).collect();
    assert_eq!(pending, expected);
    assert_eq!(store.list(None, None, 1000).await?.len(), 25);
    let other = store.namespace("other").await?;
    assert!(
        other.list(None, None, 10).await?.is_empty(),
        "per namespace"
    );
    Ok(())
}

#[tokio::test]
async fn stats_count_a_scripted_sequence_exactly() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let lease = |r: ClaimResult| r.lease().cloned().ok_or("expected a lease");

    store.try_claim(&id(1), TTL).await?; // claims 1
    store.try_claim(&id(1), TTL).await?; // duplicates_pending 1
    store.mark_done(&id(1)).await?; // completions 1
    store.try_claim(&id(1), TTL).await?; // duplicates_done 1
    store.mark_done(&id(1)).await?; // already done: nothing
    store.mark_done(&id(2)).await?; // late_completions 1
    store.try_claim(&id(3), TTL).await?; // claims 2
    store.release(&id(3)).await?; // releases 1
    store.release(&id(3)).await?; // nothing to release: nothing
    let a = lease(store.claim_with_fingerprint(&id(4), TTL, b"x").await?)?; // claims 3
    let _ = store.claim_with_fingerprint(&id(4), TTL, b"y").await?; // fingerprint_conflicts 1
    fx.advance(TTL);
    let b = lease(store.claim(&id(4), TTL).await?)?; // claims 4 (takeover)
    assert!(store.complete(&a).await.is_err()); // lease_conflicts 1
    assert!(store.extend(&a, TTL).await.is_err()); // lease_conflicts 2
    let b = store.extend(&b, TTL).await?; // no counter
    store.complete_with(&b, b"ok").await?; // completions 2
    let c = lease(store.claim(&id(5), TTL).await?)?; // claims 5
    store.abandon(&c).await?; // releases 2
    store.try_claim(&id(6), Duration::from_secs(1)).await?; // claims 6
    fx.advance(Duration::from_secs(1));
    // Now T0 + 31 s. Key 1 (done at T0, retention 30 s) expired and is
    // forgotten; key 6 expired but, a pending claim, is remembered for the
    // pending retention; key 2 (late done, default ttl 24 h) and key 4
    // (done) are live.
    let swept = store.sweep_expired().await?.removed; // swept 1: key 1
    store.try_claim(&id(7), TTL).await?; // claims 7, live pending

    let stats = store.stats().await?;
    // `Stats` is `#[non_exhaustive]`: built from its default.
    let mut expected = Stats::default();
    expected.claims = 7;
    expected.duplicates_pending = 1;
    expected.duplicates_done = 1;
    expected.fingerprint_conflicts = 1;
    expected.completions = 2;
    expected.late_completions = 1;
    expected.releases = 2;
    expected.lease_conflicts = 2;
    expected.swept = 1;
    expected.claims_slowed = 0;
    // Stored, not live: key 6 expired but is remembered (not sweepable).
    expected.records_pending = 2;
    expected.records_done = 2;
    expected.records_exact = true;
    expected.flushes = stats.flushes;
    assert_eq!(swept, 1);
    assert_eq!(stats, expected);
    assert!(stats.flushes > 0);
    assert_eq!(
        store.namespace("other").await?.stats().await?.claims,
        0,
        "per namespace"
    );
    Ok(())
}

/// Group commit: 64 tasks claiming at once under `Sync` share flushes
/// instead of each paying for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sync_writers_share_flushes() -> TestResult {
    let fx = Fixture::new();
    let store = fx.builder().durability(Durability::Sync).open().await?;
    let before = store.stats().await?.flushes;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.try_claim(&id(n), TTL).await
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let flushes = store.stats().await?.flushes - before;
    println!("64 concurrent Sync claims took {flushes} flushes");
    assert!(flushes >= 1);
    assert!(
        flushes <= 32,
        "64 writers needed {flushes} flushes: group commit is not grouping"
    );
    Ok(())
}

/// `list(Some(Pending), ..)` answers from an index of pending keys, built
/// by its first call while writers run. Writers claim, complete and abandon
/// while pages are listed; afterwards every listing equals a full listing
/// filtered by state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pending_records_matches_a_full_scan_under_concurrent_writes() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .open_with(Durability::Periodic(Duration::from_secs(3600)))
        .await?;
    let writers: Vec<_> = (0..4u128)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..2_000u128 {
                    let key = id((n * 7 + w * 13) % 500);
                    if let ClaimResult::Acquired(lease) = store.claim(&key, TTL).await? {
                        match n % 3 {
                            0 => store.complete(&lease).await?,
                            1 => store.abandon(&lease).await?,
                            _ => {}
                        }
                    }
                }
                Ok::<_, sled_idempotency::Error>(())
            })
        })
        .collect();
    let mut listings = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        store.list(Some(State::Pending), None, 50).await?;
        listings += 1;
        tokio::task::yield_now().await;
    }
    for writer in writers {
        writer.await??;
    }
    let mut expected = store.list(None, None, usize::MAX).await?;
    expected.retain(|(_, r)| r.state == State::Pending);
    assert!(!expected.is_empty());
    assert_eq!(
        store.list(Some(State::Pending), None, usize::MAX).await?,
        expected
    );
    let mut paged: Vec<(MessageId, Record)> = Vec::new();
    loop {
        let after = paged.last().map(|(k, _)| k.clone());
        let page = store.list(Some(State::Pending), after.as_ref(), 7).await?;
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, expected);
    assert!(listings > 0);
    store.close().await?;
    Ok(())
}
