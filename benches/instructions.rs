//! The claim path in instructions, not seconds: run under Valgrind's
//! callgrind by `benches/instructions.sh`, which counts only what runs
//! inside [`measured`] (`--toggle-collect`), so opening the database and
//! sled's background threads are left out. Instruction counts repeat from
//! run to run whatever else the machine does, so a 1 % change of the claim
//! path shows; criterion (`benches/store.rs`) keeps the wall-clock view.
//!
//! `instructions SCENARIO N`: N operations of one scenario on one task of
//! a current-thread runtime, `Durability::Periodic` (no fsync in the way):
//!
//! - `new`: a claim of a new key;
//! - `duplicate`: a claim of a key already claimed;
//! - `cycle`: a claim of a new key and its `mark_done`;
//! - `protocol`: the lease protocol by hand for a new key: `claim`, then
//!   `complete_with` the handler's value as JSON;
//! - `once`: the same through `Store::once` (its claim task, heartbeat
//!   timer and drop guard included).
//!
//! Without arguments (as `cargo bench` runs it) it runs each scenario
//! briefly and prints nothing to compare: the counts come from the script.

use std::time::Duration;

use sled_idempotency::handler::Outcome;
use sled_idempotency::{ClaimResult, Durability, Lease, MessageId, SledIdempotencyStore};

fn key(n: u64) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000, n))
}

/// The operations counted: everything this function runs on this thread.
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, store: &SledIdempotencyStore, scenario: &str, n: u64) {
    let ttl = Duration::from_secs(60);
    rt.block_on(async {
        for i in 0..n {
            match scenario {
                "new" => {
                    store.try_claim(&key(n + i), ttl).await.expect("claim");
                }
                "duplicate" => {
                    store.try_claim(&key(i % 64), ttl).await.expect("claim");
                }
                "protocol" => {
                    let claimed = store.claim(&key(n + i), ttl).await.expect("claim");
                    let ClaimResult::Acquired(lease) = claimed else {
                        panic!("a new key")
                    };
                    let value = serde_json::to_vec(&lease.token()).expect("json");
                    store.complete_with(&lease, &value).await.expect("complete");
                }
                "once" => {
                    let outcome = store
                        .once(&key(n + i), ttl)
                        .run(|lease: Lease| async move { Ok::<u64, String>(lease.token()) })
                        .await
                        .expect("once");
                    assert!(matches!(outcome, Outcome::Ran(_)));
                }
                _ => {
                    store.try_claim(&key(n + i), ttl).await.expect("claim");
                    store.mark_done(&key(n + i)).await.expect("done");
                }
            }
        }
    });
}

fn run(scenario: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rt
        .block_on(
            SledIdempotencyStore::builder(dir.path().join("db"))
                .durability(Durability::Periodic(Duration::from_secs(3600)))
                .sweep_interval(Duration::from_secs(3600))
                .open(),
        )
        .expect("open");
    // The same warm-up for every scenario: 64 claimed keys (the duplicates)
    // and the tree's first pages.
    rt.block_on(async {
        for i in 0..64 {
            store
                .try_claim(&key(i), Duration::from_secs(60))
                .await
                .expect("claim");
        }
    });
    measured(&rt, &store, scenario, n);
    rt.block_on(store.close()).expect("close");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [scenario, n] if !scenario.starts_with('-') => {
            run(scenario, n.parse().expect("N: a number of operations"));
        }
        _ => {
            for scenario in ["new", "duplicate", "cycle", "protocol", "once"] {
                run(scenario, 100);
            }
        }
    }
}
