//! The record counts `stats()` reports without reading a record: exact
//! after a clean close, and counted again after a crash by the sweeper's
//! first full scan, which must count every stored record once whatever
//! writers, removals and interruptions do meanwhile.
//!
//! A crash is simulated on a closed database with
//! `common::forget_expiry_index`: the counts and the expiry index's marker
//! are gone, as after a `SIGKILL` (`tests/crash.rs` kills real processes).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, TTL, TestResult, forget_expiry_index, id};
use proptest::prelude::*;
use sled_idempotency::admin::ListFilter;
use sled_idempotency::{Durability, SledIdempotencyStore, State};

/// What the namespace stores, counted by reading every record: (pending,
/// done), live or expired.
async fn counted(store: &SledIdempotencyStore) -> sled_idempotency::Result<(u64, u64)> {
    let (mut pending, mut done) = (0, 0);
    let mut after = None;
    loop {
        let mut filter = ListFilter::new(1_000).include_expired(true);
        if let Some(after) = after.take() {
            filter = filter.after(after);
        }
        let page = store.admin().list(&filter).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, record) in &page {
            match record.state {
                State::Pending => pending += 1,
                State::Done => done += 1,
            }
        }
    }
    Ok((pending, done))
}

async fn stored(store: &SledIdempotencyStore) -> sled_idempotency::Result<(u64, u64)> {
    let stats = store.stats().await?;
    Ok((stats.records_pending, stats.records_done))
}

fn builder(fx: &Fixture) -> sled_idempotency::Builder {
    fx.builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        // Never on its own: the tests sweep by hand.
        .sweep_interval(Duration::from_secs(3600))
        .sweep_batch(16)
}

/// Writes `n` keys from `first` on: a third pending, a third done, a
/// third claimed and released.
async fn write(store: &SledIdempotencyStore, first: u128, n: u128) -> sled_idempotency::Result<()> {
    for k in first..first + n {
        store.try_claim(&id(k), TTL).await?;
        match k % 3 {
            0 => store.mark_done(&id(k)).await?,
            1 => store.release(&id(k)).await?,
            _ => {}
        }
    }
    Ok(())
}

/// Regression: a recount that stopped early (here, a `sweep_expired()`
/// dropped after a few milliseconds, then a clean close) was stored as if
/// it were whole, and the next open trusted it: `stats()` said 2,564
/// records where 75,744 were stored, and stayed so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_recount_is_not_stored_as_whole() -> TestResult {
    let fx = Fixture::new();
    let store = builder(&fx).open().await?;
    write(&store, 0, 3_000).await?;
    store.close().await?;
    forget_expiry_index(&fx.path())?;

    let store = builder(&fx).open().await?;
    assert!(!store.stats().await?.records_exact, "unknown after a crash");
    write(&store, 10_000, 300).await?;
    let interrupted = tokio::time::timeout(Duration::from_millis(5), store.sweep_expired()).await;
    assert!(
        interrupted.is_err(),
        "the sweep was still counting after 5 ms"
    );
    store.close().await?;

    let store = builder(&fx).open().await?;
    assert!(
        !store.stats().await?.records_exact,
        "still unknown: the count never finished"
    );
    store.sweep_expired().await?;
    let stats = store.stats().await?;
    assert!(stats.records_exact);
    assert_eq!(stored(&store).await?, counted(&store).await?);
    store.close().await?;
    let store = builder(&fx).open().await?;
    assert_eq!(stored(&store).await?, counted(&store).await?);
    assert!(store.stats().await?.records_exact);
    store.close().await?;
    Ok(())
}

/// Regression: after a crash, a write made before the counting scan
/// reached its key was counted twice (by the writer, then by the scan), and
/// a claim over a forgotten done record drove the done count below zero.
#[tokio::test]
async fn writes_ahead_of_the_count_are_counted_once() -> TestResult {
    let fx = Fixture::new();
    let store = builder(&fx).done_retention(TTL).open().await?;
    write(&store, 0, 600).await?;
    store.close().await?;
    forget_expiry_index(&fx.path())?;

    let store = builder(&fx).done_retention(TTL).open().await?;
    // Every done record forgotten; then new claims over some of them, and
    // new keys.
    fx.advance(TTL * 2);
    for k in (0..600).step_by(3) {
        store.try_claim(&id(k), TTL).await?;
    }
    write(&store, 1_000, 90).await?;
    store.sweep_expired().await?;
    assert!(store.stats().await?.records_exact);
    assert_eq!(stored(&store).await?, counted(&store).await?);
    store.close().await?;
    Ok(())
}

/// One step of the property below.
#[derive(Debug, Clone)]
enum Op {
    /// Claims, done and releases on `n` keys from `first` on, with the
    /// sweep running beside them when `beside_sweep`.
    Write {
        first: u8,
        n: u8,
        beside_sweep: bool,
    },
    /// Moves the clock on.
    Advance(u8),
    /// A sweep dropped after `ms` milliseconds (or finished before).
    Sweep { ms: u8 },
    /// A clean close and reopen.
    Reopen,
    /// A crash: close, then lose the counts and the index's marker.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), 1..40u8, any::<bool>())
            .prop_map(|(first, n, beside_sweep)| Op::Write { first, n, beside_sweep }),
        1 => (1..90u8).prop_map(Op::Advance),
        2 => (0..8u8).prop_map(|ms| Op::Sweep { ms }),
        1 => Just(Op::Reopen),
        2 => Just(Op::Crash),
    ]
}

async fn check(ops: Vec<Op>) -> TestResult {
    let fx = Fixture::new();
    let open = || {
        builder(&fx)
            .sweep_batch(8)
            .done_retention(Duration::from_secs(40))
            .pending_retention(Duration::from_secs(20))
            .open()
    };
    let mut store = Arc::new(open().await?);
    let mut barriers = 0;
    // Keys spread over the keyspace: a sweep meets them in key order.
    let key = |k: u32| id(u128::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
    for op in ops {
        match op {
            Op::Write {
                first,
                n,
                beside_sweep,
            } => {
                let writes = {
                    let store = store.clone();
                    async move {
                        for k in u32::from(first)..u32::from(first) + u32::from(n) {
                            let ttl = Duration::from_secs(u64::from(k % 4) * 10 + 10);
                            store.try_claim(&key(k), ttl).await?;
                            match k % 5 {
                                0 | 1 => store.mark_done(&key(k)).await?,
                                2 => store.release(&key(k)).await?,
                                _ => {}
                            }
                        }
                        Ok::<_, sled_idempotency::Error>(())
                    }
                };
                if beside_sweep {
                    let sweep = {
                        let store = store.clone();
                        tokio::spawn(async move { store.sweep_expired().await })
                    };
                    writes.await?;
                    sweep.await??;
                } else {
                    writes.await?;
                }
            }
            Op::Advance(s) => fx.advance(Duration::from_secs(u64::from(s))),
            Op::Sweep { ms } => {
                let sweep = store.sweep_expired();
                let _ = tokio::time::timeout(Duration::from_millis(u64::from(ms)), sweep).await;
                // A batch of the dropped sweep may still run on its blocking
                // thread, holding the store's state lock: creating a
                // namespace takes that lock for writing, so it returns once
                // the batch is over.
                barriers += 1;
                store.namespace(&format!("barrier{barriers}")).await?;
            }
            Op::Reopen | Op::Crash => {
                store.close().await?;
                if matches!(op, Op::Crash) {
                    forget_expiry_index(&fx.path())?;
                }
                store = Arc::new(open().await?);
            }
        }
        let stats = store.stats().await?;
        if stats.records_exact {
            assert_eq!(
                stored(&store).await?,
                counted(&store).await?,
                "exact counts are exact"
            );
        }
    }
    // Let the count finish, interrupted or not, and it equals the truth.
    store.sweep_expired().await?;
    assert!(store.stats().await?.records_exact);
    assert_eq!(stored(&store).await?, counted(&store).await?);
    store.close().await?;
    Ok(())
}

fn cases() -> u32 {
    std::env::var("COUNT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Crash anywhere, reopen, let the counting scan run (interrupted and
    /// restarted any number of times, with writers beside it): counts
    /// labelled exact equal what is stored, and once a scan has finished
    /// they are exact.
    #[test]
    fn counts_converge_to_what_is_stored(ops in proptest::collection::vec(op(), 1..16)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(check(ops)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
