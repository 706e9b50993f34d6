//! The differential property for the Redis engine: random operation
//! sequences (claims with and without fingerprints, `try_claim`,
//! completions with results, releases, abandons, extensions, clock moves)
//! applied to a real `redis-server` and to the in-memory model of the "Semantics" of docs/semantics.md
//! (`tests/model`, written from the table, not from `machine.rs`), compared
//! after every step: every answer, and every key's stored record.
//!
//! Each sequence runs in a namespace of its own on one server.
//! `PROPTEST_CASES` sets the number of sequences (default 128).
#![cfg(feature = "redis")]

mod model;
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use model::{DEFAULT_TTL_MS, Driver, KEYS, Op, PENDING_RETENTION_MS, T0};
use proptest::prelude::*;
use sled_idempotency::{Durability, ManualClock, RedisIdempotencyStore};

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    // Round values too, so that sums of clock moves land exactly on
    // expiries and on the end of the pending retention (700 ms).
    let ttl = prop_oneof![1..400u16, Just(100), Just(300)];
    prop_oneof![
        4 => (key.clone(), ttl.clone()).prop_map(|(key, ttl)| Op::TryClaim { key, ttl }),
        2 => key.clone().prop_map(|key| Op::MarkDone { key }),
        2 => key.clone().prop_map(|key| Op::Release { key }),
        4 => (key.clone(), ttl.clone(), proptest::option::of(0..3u8))
            .prop_map(|(key, ttl, fingerprint)| Op::Claim { key, ttl, fingerprint }),
        3 => (any::<u8>(), proptest::option::of(0..40u8)).prop_map(|(slot, result)| Op::Complete { slot, result }),
        2 => any::<u8>().prop_map(|slot| Op::Abandon { slot }),
        2 => (any::<u8>(), ttl).prop_map(|(slot, ttl)| Op::Extend { slot, ttl }),
        4 => prop_oneof![0..300u16, Just(100), Just(300), Just(700)]
            .prop_map(|ms| Op::Advance { ms }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

#[test]
fn redis_behaves_like_the_model() -> Result<(), String> {
    if !redis_server::available() {
        return Ok(());
    }
    let server = redis_server::Server::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let clock = ManualClock::new(T0);
    let store = runtime
        .block_on(
            RedisIdempotencyStore::builder(server.url())
                .durability(Durability::Flush)
                .default_ttl(Duration::from_millis(DEFAULT_TTL_MS))
                .pending_retention(Duration::from_millis(PENDING_RETENTION_MS))
                .clock(clock.clone())
                .open(),
        )
        .map_err(|e| e.to_string())?;
    let case = AtomicUsize::new(0);
    let steps = AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let n = case.fetch_add(1, Ordering::SeqCst);
        steps.fetch_add(ops.len(), Ordering::SeqCst);
        clock.set(T0);
        runtime
            .block_on(async {
                let space = store
                    .namespace(&format!("case-{n}"))
                    .await
                    .map_err(|e| e.to_string())?;
                Driver::redis(space, clock.clone()).steps(&ops).await
            })
            .map_err(TestCaseError::fail)
    });
    eprintln!(
        "{} sequences, {} steps compared with the model",
        case.load(Ordering::SeqCst),
        steps.load(Ordering::SeqCst)
    );
    result.map_err(|e| e.to_string())
}
