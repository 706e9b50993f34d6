//! Claims are atomic: 64 tasks racing to claim one absent key on a
//! multi-threaded runtime yield exactly one `Claimed`, round after round, in
//! every durability mode.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome, Durability};

const TASKS: usize = 64;
const ROUNDS: u128 = 50;

async fn race(durability: Durability) -> TestResult {
    let fx = Fixture::new();
    let store = Arc::new(fx.open_with(durability).await?);
    for round in 0..ROUNDS {
        // A fresh key, then the same key again after its claim expired:
        // both the absent and the takeover path must admit one winner.
        for phase in 0..2 {
            let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (store, barrier) = (store.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.try_claim(&id(round), TTL).await
                    })
                })
                .collect();
            let mut claimed = 0;
            for task in tasks {
                match task.await?? {
                    ClaimOutcome::Claimed => claimed += 1,
                    ClaimOutcome::AlreadyPending => {}
                    ClaimOutcome::AlreadyDone => return Err("no key was ever done".into()),
                }
            }
            assert_eq!(
                claimed, 1,
                "round {round} phase {phase}: exactly one winner"
            );
            if phase == 0 {
                fx.advance(TTL + Duration::from_millis(1));
            }
        }
        let record = store
            .get_record(&id(round))
            .await?
            .ok_or("record missing")?;
        assert_eq!(record.attempts, 2);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_with_periodic_durability() -> TestResult {
    race(Durability::Periodic(Duration::from_millis(50))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_with_flush_durability() -> TestResult {
    race(Durability::Flush).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_with_sync_durability() -> TestResult {
    race(Durability::Sync).await
}
