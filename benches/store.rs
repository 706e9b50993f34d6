//! Criterion benchmarks of the store, as a parameter table:
//!
//! - `claim/{new,dup-pending,dup-done,cycle}/{Periodic,Flush,Sync}/{1,8,64}`:
//!   claim of a new key, claim of a duplicate (pending, done), and the full
//!   claim → mark_done cycle, per durability mode and number of concurrent
//!   tasks. Throughput is in operations (a cycle counts as one).
//! - `sweep_1m`: sweeping 1,000,000 expired records.
//! - `reopen_1m`: opening a database of 1,000,000 records.
//!
//! Run: `cargo bench --bench store` (a filter narrows it, e.g.
//! `cargo bench --bench store -- claim/new/Sync`). Comparisons with other
//! engines live in `compare/` (see BENCHMARKS.md).

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use sled_idempotency::{
    DEFAULT_PENDING_RETENTION, Durability, ManualClock, MessageId, SledIdempotencyStore,
};

const TTL: Duration = Duration::from_secs(3600);
const DUPLICATE_KEYS: u64 = 10_000;
const BIG: u64 = 1_000_000;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1 << 40);

fn fresh() -> MessageId {
    key(NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

fn key(n: u64) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u128(u128::from(n)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[derive(Clone, Copy)]
enum Op {
    New,
    DupPending,
    DupDone,
    Cycle,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::New => "new",
            Op::DupPending => "dup-pending",
            Op::DupDone => "dup-done",
            Op::Cycle => "cycle",
        }
    }
}

async fn one(store: &SledIdempotencyStore, op: Op, n: u64) {
    match op {
        Op::New => {
            black_box(store.try_claim(&fresh(), TTL).await.expect("claim"));
        }
        Op::DupPending => {
            black_box(
                store
                    .try_claim(&key(n % DUPLICATE_KEYS), TTL)
                    .await
                    .expect("claim"),
            );
        }
        Op::DupDone => {
            let k = key(DUPLICATE_KEYS + n % DUPLICATE_KEYS);
            black_box(store.try_claim(&k, TTL).await.expect("claim"));
        }
        Op::Cycle => {
            let k = fresh();
            store.try_claim(&k, TTL).await.expect("claim");
            store.mark_done(&k).await.expect("mark_done");
        }
    }
}

fn claim(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("claim");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    for (mode, durability) in [
        ("Periodic", Durability::Periodic(Duration::from_millis(100))),
        ("Flush", Durability::Flush),
        ("Sync", Durability::Sync),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = rt.block_on(async {
            let store = SledIdempotencyStore::builder(dir.path().join("db"))
                .durability(Durability::Periodic(Duration::from_millis(100)))
                .open()
                .await
                .expect("open");
            for n in 0..DUPLICATE_KEYS {
                store.try_claim(&key(n), TTL).await.expect("seed pending");
                let done = key(DUPLICATE_KEYS + n);
                store.try_claim(&done, TTL).await.expect("seed done");
                store.mark_done(&done).await.expect("seed done");
            }
            store.close().await.expect("close");
            SledIdempotencyStore::builder(dir.path().join("db"))
                .durability(durability)
                .open()
                .await
                .expect("open")
        });
        for op in [Op::New, Op::DupPending, Op::DupDone, Op::Cycle] {
            for tasks in [1u64, 8, 64] {
                let id = BenchmarkId::new(format!("{}/{mode}", op.name()), tasks);
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let store = store.clone();
                        async move {
                            let per_task = iters.div_ceil(tasks);
                            let start = Instant::now();
                            let handles: Vec<_> = (0..tasks)
                                .map(|t| {
                                    let store = store.clone();
                                    tokio::spawn(async move {
                                        for i in 0..per_task {
                                            one(&store, op, t * per_task + i).await;
                                        }
                                    })
                                })
                                .collect();
                            for h in handles {
                                h.await.expect("task");
                            }
                            // The time of `iters` operations.
                            start
                                .elapsed()
                                .mul_f64(iters as f64 / (per_task * tasks) as f64)
                        }
                    })
                });
            }
        }
        rt.block_on(store.close()).expect("close");
    }
    group.finish();
}

/// Fills a store at `path` with `count` claims of `ttl` through `clock`.
async fn fill(path: &Path, clock: &ManualClock, count: u64, ttl: Duration) -> SledIdempotencyStore {
    let store = SledIdempotencyStore::builder(path)
        .durability(Durability::Periodic(Duration::from_millis(100)))
        .clock(clock.clone())
        .open()
        .await
        .expect("open");
    for n in 0..count {
        store.try_claim(&key(n), ttl).await.expect("fill");
    }
    store
}

fn sweep_1m(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("sweep_1m");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BIG));
    group.bench_function("expired records", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let clock = ManualClock::new(1_800_000_000_000);
                let store = rt.block_on(fill(&dir.path().join("db"), &clock, BIG, TTL));
                // Past the claims' expiry and their pending retention.
                clock.advance(TTL + DEFAULT_PENDING_RETENTION);
                let start = Instant::now();
                let report = rt.block_on(store.sweep_expired()).expect("sweep");
                total += start.elapsed();
                assert_eq!(report.removed, BIG);
                rt.block_on(store.close()).expect("close");
            }
            total
        })
    });
    group.finish();
}

fn reopen_1m(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(1_800_000_000_000);
    let store = rt.block_on(fill(&path, &clock, BIG, TTL));
    rt.block_on(store.close()).expect("close");
    let mut group = c.benchmark_group("reopen_1m");
    group.sample_size(10);
    group.bench_function("open + close", |b| {
        b.iter(|| {
            rt.block_on(async {
                let store = SledIdempotencyStore::builder(&path)
                    .clock(clock.clone())
                    .open()
                    .await
                    .expect("reopen");
                store.close().await.expect("close");
            })
        })
    });
    group.finish();
}

criterion_group!(benches, claim, sweep_1m, reopen_1m);

/// `criterion_main!`, with a Prometheus recorder installed first when the
/// `metrics` feature is on: `benches/side-by-side.sh` on a build with and
/// one without the feature measures what metrics cost the claim path.
fn main() {
    #[cfg(feature = "metrics")]
    let _metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("install the Prometheus recorder");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
