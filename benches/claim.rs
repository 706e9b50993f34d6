//! The claim path against the limit beneath it, side by side in one run.
//!
//! `claim_new_key/1 task`: one task claiming never-seen keys.
//! - `raw sled cas`: sled `compare_and_swap(key, None, value)`, nothing else —
//!   the ceiling for `Periodic`.
//! - `raw sled cas + index insert`: the same plus a second insert into an
//!   expiry-index tree — what an index-driven sweeper would cost every claim.
//! - `raw sled cas + flush + fdatasync`: the ceiling for `Sync` with one
//!   writer.
//! - `store Periodic` / `store Flush` / `store Sync`: `SledIdempotencyStore::try_claim`.
//!
//! Run: `cargo bench --bench claim`. Quote ratios from one run, not absolutes.

use std::fs::File;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sled_idempotency::{Durability, MessageId, SledIdempotencyStore};

const TTL: Duration = Duration::from_secs(3600);

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

fn fresh_key() -> u128 {
    u128::from(next_key())
}

fn next_key() -> u64 {
    NEXT_KEY.fetch_add(1, Ordering::Relaxed)
}

/// A value the size of a stored record.
const VALUE: [u8; 18] = [1; 18];

fn raw_db(dir: &std::path::Path) -> sled::Db {
    sled::Config::new()
        .path(dir)
        .cache_capacity(sled_idempotency::DEFAULT_CACHE_CAPACITY)
        .flush_every_ms(None)
        .open()
        .expect("open raw sled")
}

fn claim_new_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_new_key");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_db(dir.path());
        let tree = db.open_tree("records").expect("tree");
        let index = db.open_tree("index").expect("tree");
        let log = File::open(dir.path().join("db")).expect("log file");
        group.bench_function(BenchmarkId::new("raw sled cas", "1 task"), |b| {
            b.iter(|| {
                let key = fresh_key().to_be_bytes();
                black_box(tree.compare_and_swap(key, None::<&[u8]>, Some(&VALUE[..])))
            })
        });
        group.bench_function(
            BenchmarkId::new("raw sled cas + index insert", "1 task"),
            |b| {
                b.iter(|| {
                    let key = fresh_key().to_be_bytes();
                    let ok = tree.compare_and_swap(key, None::<&[u8]>, Some(&VALUE[..]));
                    let mut index_key = [0u8; 24];
                    index_key[..8].copy_from_slice(&42u64.to_be_bytes());
                    index_key[8..].copy_from_slice(&key);
                    black_box((ok, index.insert(index_key, &[])))
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("raw sled cas + flush + fdatasync", "1 task"),
            |b| {
                b.iter(|| {
                    let key = fresh_key().to_be_bytes();
                    let ok = tree.compare_and_swap(key, None::<&[u8]>, Some(&VALUE[..]));
                    db.flush().expect("flush");
                    log.sync_data().expect("fdatasync");
                    black_box(ok)
                })
            },
        );
    }

    for (name, durability) in [
        (
            "store Periodic",
            Durability::Periodic(Duration::from_millis(100)),
        ),
        ("store Flush", Durability::Flush),
        ("store Sync", Durability::Sync),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = rt.block_on(async {
            SledIdempotencyStore::builder(dir.path().join("db"))
                .durability(durability)
                .open()
                .await
                .expect("open store")
        });
        group.bench_function(BenchmarkId::new(name, "1 task"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let store = store.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let key = MessageId::from_uuid(uuid::Uuid::from_u128(fresh_key()));
                        black_box(store.try_claim(&key, TTL).await.expect("claim"));
                    }
                    start.elapsed()
                }
            })
        });
        rt.block_on(store.close()).expect("close");
    }
    group.finish();
}

criterion_group!(benches, claim_new_key);
criterion_main!(benches);
