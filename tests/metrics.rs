//! Metrics (feature `metrics`): a recording recorder sees exactly the
//! counts of a known sequence of operations, per namespace, the same as
//! `stats()`, and histograms that agree with each other.
#![cfg(all(feature = "metrics", feature = "fault-injection"))]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sled_idempotency::{ClaimResult, Durability, Error};

/// Every metric, by name and sorted labels, with its value.
fn snapshot(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> HashMap<(String, Vec<(String, String)>), DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

#[tokio::test]
async fn counters_match_a_known_sequence_exactly() -> TestResult {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install()?;

    let fx = Fixture::new();
    let store = fx.open_with(Durability::Sync).await?;
    let orders = store.namespace("orders").await?;

    // default: 5 claims, 1 duplicate pending, 1 duplicate done, 1 conflict,
    // 2 completions, 1 late completion, 1 release, 1 lease conflict.
    store.try_claim(&id(1), TTL).await?; // claim
    store.try_claim(&id(1), TTL).await?; // duplicate, pending
    store.mark_done(&id(1)).await?; // completion
    store.try_claim(&id(1), TTL).await?; // duplicate, done
    store.mark_done(&id(2)).await?; // late completion
    store.try_claim(&id(3), TTL).await?; // claim
    store.release(&id(3)).await?; // release
    let _ = store.claim_with_fingerprint(&id(4), TTL, b"a").await?; // claim
    let _ = store.claim_with_fingerprint(&id(4), TTL, b"b").await?; // conflict
    let ClaimResult::Acquired(first) = store.claim(&id(5), Duration::from_millis(1)).await? else {
        return Err("claim 5".into());
    }; // claim
    fx.advance(Duration::from_millis(1));
    let ClaimResult::Acquired(second) = store.claim(&id(5), TTL).await? else {
        return Err("take over 5".into());
    }; // claim
    assert!(matches!(
        store.complete(&first).await,
        Err(Error::LeaseLost { .. })
    )); // lease conflict
    store.complete(&second).await?; // completion
    // orders: 2 claims, 1 swept.
    orders.try_claim(&id(1), Duration::from_millis(1)).await?;
    orders.mark_done(&id(1)).await?;
    orders.try_claim(&id(2), TTL).await?;
    fx.advance(Duration::from_millis(1));
    assert_eq!(store.sweep_expired().await?.removed, 1);

    let metrics = snapshot(&snapshotter);
    let counter = |name: &str, ns: &str, extra: &[(&str, &str)]| {
        let mut pairs = vec![("namespace", ns), ("durability", "sync")];
        pairs.extend_from_slice(extra);
        match metrics.get(&(name.to_owned(), labels(&pairs))) {
            Some(DebugValue::Counter(n)) => *n,
            Some(other) => panic!("{name} is {other:?}"),
            None => 0,
        }
    };
    let stats = store.stats().await?;
    for (ns, stats) in [("default", stats), ("orders", orders.stats().await?)] {
        let got = [
            counter("sled_idempotency_claims_total", ns, &[]),
            counter(
                "sled_idempotency_duplicates_total",
                ns,
                &[("found", "pending")],
            ),
            counter(
                "sled_idempotency_duplicates_total",
                ns,
                &[("found", "done")],
            ),
            counter("sled_idempotency_conflicts_total", ns, &[]),
            counter("sled_idempotency_completions_total", ns, &[]),
            counter("sled_idempotency_late_completions_total", ns, &[]),
            counter("sled_idempotency_releases_total", ns, &[]),
            counter("sled_idempotency_lease_conflicts_total", ns, &[]),
            counter("sled_idempotency_swept_total", ns, &[]),
            counter("sled_idempotency_claims_slowed_total", ns, &[]),
        ];
        let from_stats = [
            stats.claims,
            stats.duplicates_pending,
            stats.duplicates_done,
            stats.fingerprint_conflicts,
            stats.completions,
            stats.late_completions,
            stats.releases,
            stats.lease_conflicts,
            stats.swept,
            stats.claims_slowed,
        ];
        assert_eq!(got, from_stats, "{ns}: metrics and stats() agree");
        let expected = match ns {
            "default" => [5, 1, 1, 1, 2, 1, 1, 1, 0, 0],
            _ => [2, 0, 0, 0, 1, 0, 0, 0, 1, 0],
        };
        assert_eq!(got, expected, "{ns}");
    }

    let histogram =
        |name: &str, pairs: &[(&str, &str)]| match metrics.get(&(name.to_owned(), labels(pairs))) {
            Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
            Some(other) => panic!("{name} is {other:?}"),
            None => Vec::new(),
        };
    let sync = [("durability", "sync")];
    let claims = histogram(
        "sled_idempotency_claim_seconds",
        &[("namespace", "default"), ("durability", "sync")],
    );
    assert_eq!(claims.len(), 8, "one latency per claim call");
    assert!(claims.iter().all(|s| *s > 0.0 && *s < 60.0));
    let waits = histogram("sled_idempotency_durability_wait_seconds", &sync);
    let groups = histogram("sled_idempotency_group_commit_size", &sync);
    assert!(!waits.is_empty());
    assert_eq!(
        groups.iter().sum::<f64>() as usize,
        waits.len(),
        "every acknowledged wait is in exactly one group commit"
    );
    assert!(groups.iter().all(|g| *g >= 1.0));
    assert_eq!(
        metrics.get(&(
            "sled_idempotency_io_failures_total".to_owned(),
            labels(&sync)
        )),
        Some(&DebugValue::Counter(0))
    );

    // A failed fdatasync latches the store and is counted once; the claim
    // it refuses still has its latency recorded.
    store.inject_sync_failure(true).await?;
    assert!(store.try_claim(&id(9), TTL).await.is_err());
    let metrics = snapshot(&snapshotter);
    let claims = match metrics.get(&(
        "sled_idempotency_claim_seconds".to_owned(),
        labels(&[("namespace", "default"), ("durability", "sync")]),
    )) {
        Some(DebugValue::Histogram(values)) => values.len(),
        other => panic!("claim_seconds is {other:?}"),
    };
    // The recorder hands out the samples taken since the last snapshot.
    assert_eq!(claims, 1, "the refused claim is in the latencies");
    assert_eq!(
        metrics.get(&(
            "sled_idempotency_io_failures_total".to_owned(),
            labels(&sync)
        )),
        Some(&DebugValue::Counter(1))
    );
    let _ = store.close().await;
    Ok(())
}
