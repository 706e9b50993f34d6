//! A single-node worker consuming a simulated at-least-once stream.
//!
//! A broker delivers 2,000 messages with duplicates (some redelivered while
//! the first delivery is still being handled), handlers sometimes fail and
//! `release` their claim for a retry, and halfway through the worker
//! "crashes": one message is claimed but never handled, the store is dropped
//! without `close`, and a new worker reopens the database. At the end the
//! example checks that every message's effect happened exactly once and
//! exits non-zero if not.
//!
//! Run: `cargo run --release --example worker [DB_DIR]` (default
//! `./dedup-db`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sled_idempotency::{ClaimOutcome, MessageId, SledIdempotencyStore};
use tokio::sync::Mutex;

const MESSAGES: usize = 2_000;
const WORKERS: usize = 8;
/// How long a claim protects a message being handled. A crashed worker's
/// claim blocks redelivery for this long, then another worker takes over.
const CLAIM_TTL: Duration = Duration::from_secs(2);

/// The broker: a queue of deliveries; an unacknowledged delivery comes back.
struct Broker {
    queue: Mutex<VecDeque<MessageId>>,
    deliveries: AtomicU64,
}

impl Broker {
    async fn next(&self) -> Option<MessageId> {
        let next = self.queue.lock().await.pop_front();
        if next.is_some() {
            self.deliveries.fetch_add(1, Relaxed);
        }
        next
    }

    /// Negative acknowledgement: deliver again later.
    async fn redeliver(&self, id: MessageId) {
        self.queue.lock().await.push_back(id);
    }
}

/// The downstream system the handler changes: how often each message's
/// effect was applied. It lives outside the worker and survives its crash.
#[derive(Default)]
struct Ledger {
    applied: std::sync::Mutex<HashMap<MessageId, u32>>,
}

#[derive(Default)]
struct Counters {
    suppressed_done: AtomicU64,
    suppressed_pending: AtomicU64,
    executions: AtomicU64,
    failures: AtomicU64,
}

/// Deterministic pseudo-random numbers (splitmix64): the same stream shape
/// on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Messages, each delivered one to three times, duplicates shuffled close to
/// the original as a broker's redeliveries are.
fn stream(rng: &mut Rng) -> (Vec<MessageId>, VecDeque<MessageId>) {
    let messages: Vec<MessageId> = (0..MESSAGES).map(|_| MessageId::new()).collect();
    let mut deliveries = Vec::new();
    for id in &messages {
        let copies = 1 + usize::from(rng.below(3) == 0) + usize::from(rng.below(8) == 0);
        deliveries.extend(std::iter::repeat_n(id.clone(), copies));
    }
    for i in (1..deliveries.len()).rev() {
        let window = (i as u64).min(16);
        let j = i - rng.below(window + 1) as usize;
        deliveries.swap(i, j);
    }
    (messages, deliveries.into())
}

/// One delivery: claim, run the handler, mark done or release.
async fn handle(
    store: &SledIdempotencyStore,
    broker: &Broker,
    ledger: &Ledger,
    counters: &Counters,
    failing: &Failing,
    id: MessageId,
) -> Result<(), sled_idempotency::Error> {
    match store.try_claim(&id, CLAIM_TTL).await? {
        ClaimOutcome::AlreadyDone => {
            counters.suppressed_done.fetch_add(1, Relaxed); // ack, skip
        }
        ClaimOutcome::AlreadyPending => {
            counters.suppressed_pending.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await; // nack with delay
            broker.redeliver(id).await;
        }
        ClaimOutcome::Claimed if failing.fail_once(&id) => {
            counters.failures.fetch_add(1, Relaxed);
            store.release(&id).await?;
            broker.redeliver(id).await;
        }
        ClaimOutcome::Claimed => {
            counters.executions.fetch_add(1, Relaxed);
            if let Ok(mut applied) = ledger.applied.lock() {
                *applied.entry(id.clone()).or_default() += 1;
            }
            store.mark_done(&id).await?;
        }
    }
    Ok(())
}

/// Runs `WORKERS` tasks until `stop_after` deliveries were taken (or the
/// queue drained for good).
async fn run_workers(
    store: &SledIdempotencyStore,
    broker: &Arc<Broker>,
    ledger: &Arc<Ledger>,
    counters: &Arc<Counters>,
    stop_after: u64,
    failing: &Arc<Failing>,
) -> Result<(), sled_idempotency::Error> {
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (store, broker, ledger, counters, failing) = (
                store.clone(),
                broker.clone(),
                ledger.clone(),
                counters.clone(),
                failing.clone(),
            );
            tokio::spawn(async move {
                let mut idle = 0;
                while broker.deliveries.load(Relaxed) < stop_after {
                    let Some(id) = broker.next().await else {
                        // Others may still redeliver: wait a little before quitting.
                        idle += 1;
                        if idle > 50 {
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    idle = 0;
                    handle(&store, &broker, &ledger, &counters, &failing, id).await?;
                }
                Ok::<_, sled_idempotency::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| {
            sled_idempotency::Error::InvalidConfig(format!("worker panicked: {e}"))
        })??;
    }
    Ok(())
}

/// Messages whose handler fails on its first run (then succeeds on retry).
struct Failing(std::sync::Mutex<std::collections::HashSet<MessageId>>);

impl Failing {
    fn fail_once(&self, id: &MessageId) -> bool {
        self.0.lock().is_ok_and(|mut set| set.remove(id))
    }
}

#[tokio::main]
async fn main() {
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs the simulation; `Ok(false)` when some effect did not happen exactly
/// once.
async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./dedup-db".into());
    let started = Instant::now();
    let mut rng = Rng(0x5EED);
    let (messages, deliveries) = stream(&mut rng);
    let planned = deliveries.len();
    let failing = Arc::new(Failing(std::sync::Mutex::new(
        messages
            .iter()
            .filter(|_| rng.below(20) == 0)
            .cloned()
            .collect(),
    )));
    let broker = Arc::new(Broker {
        queue: Mutex::new(deliveries),
        deliveries: AtomicU64::new(0),
    });
    let ledger = Arc::new(Ledger::default());
    let counters = Arc::new(Counters::default());

    // First life of the worker: half the stream.
    let store = SledIdempotencyStore::open(&path).await?;
    run_workers(
        &store,
        &broker,
        &ledger,
        &counters,
        planned as u64 / 2,
        &failing,
    )
    .await?;

    // The crash: a message is claimed, the process dies before the handler
    // runs, the broker never got an ack so the message comes back.
    let in_flight = broker.next().await.ok_or("stream ended before the crash")?;
    let crashed_claim = store.try_claim(&in_flight, CLAIM_TTL).await?;
    broker.redeliver(in_flight.clone()).await;
    drop(store); // no close(): whatever the worker held in memory is gone

    // Second life: reopen the same database and drain the stream.
    let store = SledIdempotencyStore::open(&path).await?;
    run_workers(&store, &broker, &ledger, &counters, u64::MAX, &failing).await?;
    store.close().await?;

    let applied = ledger.applied.lock().map_err(|_| "ledger poisoned")?;
    let exactly_once = messages
        .iter()
        .filter(|id| applied.get(*id) == Some(&1))
        .count();
    let twice: usize = applied.values().filter(|&&n| n > 1).count();
    let never = messages.len() - applied.len();
    let ok = exactly_once == messages.len();

    println!("sled-idempotency worker report ({path})");
    println!("  messages                      {:>6}", messages.len());
    println!(
        "  deliveries                    {:>6}",
        broker.deliveries.load(Relaxed)
    );
    println!(
        "  duplicates suppressed         {:>6}  ({} already done, {} in flight elsewhere)",
        counters.suppressed_done.load(Relaxed) + counters.suppressed_pending.load(Relaxed),
        counters.suppressed_done.load(Relaxed),
        counters.suppressed_pending.load(Relaxed)
    );
    println!(
        "  handler executions            {:>6}",
        counters.executions.load(Relaxed)
    );
    println!(
        "  handler failures (released)   {:>6}",
        counters.failures.load(Relaxed)
    );
    println!(
        "  simulated crashes             {:>6}  (claim before crash: {crashed_claim:?})",
        1
    );
    println!(
        "  effects exactly once          {exactly_once:>6} / {}",
        messages.len()
    );
    println!("  effects applied twice or more {twice:>6}");
    println!("  effects never applied         {never:>6}");
    println!(
        "  elapsed                       {:>6.2?}",
        started.elapsed()
    );
    println!(
        "{}",
        if ok {
            "OK: every message's effect happened exactly once"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}
