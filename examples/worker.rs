//! A single-node worker consuming a simulated at-least-once stream, crashed
//! for real.
//!
//! A broker delivers 2,000 messages with duplicates (some redelivered while
//! the first delivery is still being handled), and handlers sometimes fail
//! and give their claim back for a retry. Each delivery is one call,
//! `Store::once`. The worker's first life runs in a
//! child process, which the example kills with SIGKILL in mid-stream: claims
//! in flight, handlers half done, nothing closed or flushed by hand. Its
//! second life reopens the database and the broker, which never saw most
//! acknowledgements, redelivers the whole stream. Every handler's effect is
//! an append to a ledger file outside the worker (the downstream system).
//!
//! The store answers which messages are done, so those are skipped; a
//! message whose handler the crash interrupted comes back, after its claim
//! expires, as attempt 2 or later, and only then does the handler look in
//! the ledger for the effect of its earlier attempt. At the end the example
//! checks that every message's effect is in the ledger exactly once and
//! exits non-zero if not.
//!
//! Run: `cargo run --release --example worker [DIR]` (default
//! `./dedup-db`; the database is `DIR/store`, the ledger `DIR/ledger`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sled_idempotency::handler::Outcome;
use sled_idempotency::{Lease, MessageId, SledIdempotencyStore};
use tokio::sync::Mutex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const MESSAGES: u64 = 2_000;
const WORKERS: usize = 8;
/// How long a claim protects a message being handled. A crashed worker's
/// claim blocks redelivery for this long, then another worker takes over.
const CLAIM_TTL: Duration = Duration::from_secs(2);
/// Set in the child process that runs the worker's first life.
const CHILD_ENV: &str = "SLED_IDEMPOTENCY_WORKER_CHILD";

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

/// The downstream system: an append-only file of applied effects, one
/// message id per line. Each effect is one `write` of a whole line, so it
/// survives the worker's SIGKILL (the kernel keeps it).
struct Ledger {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
}

impl Ledger {
    fn open(path: &Path) -> std::io::Result<Ledger> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
        })
    }

    fn apply(&self, id: &MessageId) -> std::io::Result<()> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        file.write_all(format!("{id}\n").as_bytes())
    }

    /// How many times each message's effect was applied.
    fn counts(&self) -> std::io::Result<HashMap<String, u32>> {
        let mut counts = HashMap::new();
        for line in BufReader::new(std::fs::File::open(&self.path)?).lines() {
            *counts.entry(line?).or_default() += 1;
        }
        Ok(counts)
    }

    /// Whether an earlier attempt already applied `id`'s effect: asked only
    /// on attempt 2 or later, after a crash interrupted a handler.
    fn applied(&self, id: &MessageId) -> std::io::Result<bool> {
        Ok(self.counts()?.contains_key(&id.to_string()))
    }
}

#[derive(Default)]
struct Counters {
    suppressed_done: AtomicU64,
    suppressed_pending: AtomicU64,
    executions: AtomicU64,
    recovered: AtomicU64,
    failures: AtomicU64,
}

/// Deterministic pseudo-random numbers (splitmix64): the same stream shape
/// on every run, in both lives of the worker.
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

/// The run's messages (ids unique to the run), the deliveries (each message
/// one to three times, duplicates shuffled close to the original as a
/// broker's redeliveries are) and the messages whose handler fails once.
fn stream(run: u64) -> (Vec<MessageId>, VecDeque<MessageId>, HashSet<MessageId>) {
    let mut rng = Rng(0x5EED);
    let messages: Vec<MessageId> = (0..MESSAGES)
        .map(|i| MessageId::from_uuid(uuid::Uuid::from_u64_pair(run, i)))
        .collect();
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
    let failing = messages
        .iter()
        .filter(|_| rng.below(20) == 0)
        .cloned()
        .collect();
    (messages, deliveries.into(), failing)
}

/// Why a handler failed: a simulated, retryable failure, or the ledger
/// itself (which ends the example).
#[derive(Debug)]
enum Failure {
    Simulated,
    Ledger(std::io::Error),
}

struct Worker {
    store: SledIdempotencyStore,
    broker: Broker,
    ledger: Ledger,
    counters: Counters,
    failing: std::sync::Mutex<HashSet<MessageId>>,
    /// The child reports its progress to the parent on stdout.
    child: bool,
}

impl Worker {
    fn fails_once(&self, id: &MessageId) -> bool {
        self.failing.lock().is_ok_and(|mut set| set.remove(id))
    }

    /// One delivery, through `Store::once`: the handler runs only if the
    /// message is new (or its last attempt failed or died), and the outcome
    /// says whether to acknowledge it.
    async fn handle(&self, id: MessageId) -> Result<(), BoxError> {
        let handler = |lease: Lease| async move {
            if self.fails_once(lease.key()) {
                return Err(Failure::Simulated);
            }
            // Attempt 2 or later: a crash interrupted an earlier attempt,
            // which may have applied the effect before it died.
            if lease.attempt() > 1 && self.ledger.applied(lease.key()).map_err(Failure::Ledger)? {
                self.counters.recovered.fetch_add(1, Relaxed);
            } else {
                self.counters.executions.fetch_add(1, Relaxed);
                self.ledger.apply(lease.key()).map_err(Failure::Ledger)?;
            }
            Ok(())
        };
        match self.store.once(&id, CLAIM_TTL).run(handler).await? {
            Outcome::Ran(()) => {} // ack
            Outcome::Replayed(()) => {
                self.counters.suppressed_done.fetch_add(1, Relaxed); // ack, skip
            }
            Outcome::InProgress { .. } | Outcome::LeaseLost { .. } => {
                self.counters.suppressed_pending.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await; // nack with delay
                self.broker.redeliver(id).await;
            }
            Outcome::Failed {
                error: Failure::Simulated,
                ..
            } => {
                // The claim was given back: the redelivery retries.
                self.counters.failures.fetch_add(1, Relaxed);
                self.broker.redeliver(id).await;
            }
            Outcome::Failed {
                error: Failure::Ledger(error),
                ..
            } => return Err(error.into()),
            other => return Err(format!("unexpected outcome {other:?}").into()),
        }
        Ok(())
    }

    /// Runs `WORKERS` tasks until the queue has drained for good.
    async fn run(self: &Arc<Self>) -> Result<(), BoxError> {
        let tasks: Vec<_> = (0..WORKERS)
            .map(|_| {
                let worker = self.clone();
                tokio::spawn(async move {
                    let mut idle = 0;
                    loop {
                        let Some(id) = worker.broker.next().await else {
                            // Others may still redeliver: wait before quitting.
                            idle += 1;
                            if idle > 400 {
                                return Ok::<(), BoxError>(());
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        idle = 0;
                        worker.handle(id).await?;
                        let done = worker.broker.deliveries.load(Relaxed);
                        if worker.child && done.is_multiple_of(100) {
                            println!("progress {done}"); // read by the parent
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        Ok(())
    }
}

async fn worker(dir: &Path, run: u64, child: bool) -> Result<Arc<Worker>, BoxError> {
    let (_, deliveries, failing) = stream(run);
    Ok(Arc::new(Worker {
        store: SledIdempotencyStore::open(dir.join("store")).await?,
        broker: Broker {
            queue: Mutex::new(deliveries),
            deliveries: AtomicU64::new(0),
        },
        ledger: Ledger::open(&dir.join("ledger"))?,
        counters: Counters::default(),
        failing: std::sync::Mutex::new(failing),
        child,
    }))
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

/// Starts the first life in a child process and kills it with SIGKILL once
/// it has taken about a third of the deliveries. Returns how many it had
/// reported.
fn first_life_killed(dir: &Path, run: u64) -> Result<u64, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(dir)
        .env(CHILD_ENV, run.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut seen = 0;
    for line in BufReader::new(stdout).lines() {
        if let Some(n) = line?.strip_prefix("progress ") {
            seen = n.parse()?;
            if seen >= MESSAGES * 2 / 3 {
                break;
            }
        }
    }
    child.kill()?; // SIGKILL: no destructor, no close, no final flush
    child.wait()?;
    Ok(seen)
}

/// Runs the simulation; `Ok(false)` when some effect did not happen exactly
/// once.
async fn run() -> Result<bool, BoxError> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "./dedup-db".into()),
    );
    if let Ok(run) = std::env::var(CHILD_ENV) {
        // The first life: work until killed.
        worker(&dir, run.parse()?, true).await?.run().await?;
        return Ok(true);
    }
    let started = Instant::now();
    std::fs::create_dir_all(&dir)?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let killed_after = first_life_killed(&dir, run)?;

    // Second life: reopen the database; the broker redelivers everything.
    let worker = worker(&dir, run, false).await?;
    worker.run().await?;
    worker.store.close().await?;

    let (messages, _, _) = stream(run);
    let applied = worker.ledger.counts()?;
    let count = |id: &MessageId| applied.get(&id.to_string()).copied().unwrap_or(0);
    let exactly_once = messages.iter().filter(|id| count(id) == 1).count();
    let twice = messages.iter().filter(|id| count(id) > 1).count();
    let never = messages.iter().filter(|id| count(id) == 0).count();
    let ok = exactly_once == messages.len();

    let c = &worker.counters;
    println!("sled-idempotency worker report ({})", dir.display());
    println!("  messages                      {:>6}", messages.len());
    println!(
        "  first life killed (SIGKILL)   {:>6}  deliveries in",
        killed_after
    );
    println!(
        "  second life deliveries        {:>6}",
        worker.broker.deliveries.load(Relaxed)
    );
    println!(
        "  duplicates suppressed         {:>6}  ({} already done, {} in flight elsewhere)",
        c.suppressed_done.load(Relaxed) + c.suppressed_pending.load(Relaxed),
        c.suppressed_done.load(Relaxed),
        c.suppressed_pending.load(Relaxed)
    );
    println!(
        "  handler executions            {:>6}  (second life)",
        c.executions.load(Relaxed)
    );
    println!(
        "  interrupted, found applied    {:>6}  (attempt > 1, effect already in the ledger)",
        c.recovered.load(Relaxed)
    );
    println!(
        "  handler failures (given back) {:>6}  (second life)",
        c.failures.load(Relaxed)
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
