//! A publisher and a consumer through `eventbus-nats`, deduplicated by a
//! `SledIdempotencyStore` (`EventBusBuilder::idempotency`). Every event is
//! published again past JetStream's duplicate window (1 s here), once
//! before and once after a consumer restart (bus dropped, store closed and
//! reopened, same durable consumer): JetStream delivers every copy, and the
//! store makes each handler run exactly once.
//!
//! ```text
//! nats-server -js &                  # Debian package nats-server
//! cargo run --example eventbus_nats -- nats://127.0.0.1:4222 [DB-DIR]
//! ```
//!
//! Here the bus itself speaks to the store through the `IdempotencyStore`
//! trait: `try_claim` before the handler, `mark_done` after it, `release`
//! on an error. A handler that needs more than that — a fencing token for
//! its downstream writes, a heartbeat while it runs long, its result cached
//! for duplicates, errors recorded as final — calls `Store::once` itself,
//! keyed by the delivery's `msg_id`, as [`OnceHandled`] shows (compiled,
//! not run here: register it with a bus built without `.idempotency`).
//!
//! It exits with status 1 if any handler ran other than once.
//! `tests/eventbus_nats.rs` runs it against a `nats-server` it starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{EventHandler, HandlerCtx, HandlerError, MessageId};
use eventbus_nats::prelude::Event;
use eventbus_nats::{EventBus, EventBusBuilder, SubscribeOptions};
use serde::{Deserialize, Serialize};
use sled_idempotency::handler::Outcome;
use sled_idempotency::{Lease, SledIdempotencyStore};
use tokio::sync::watch;

/// The event: `id` becomes the `Nats-Msg-Id`, which the consumer claims.
/// eventbus-nats streams carry `events.>` unless configured otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(subject = "events.orders.placed")]
struct OrderPlaced {
    id: MessageId,
    order: u32,
}

/// Counts handler runs per message id.
#[derive(Clone, Default)]
struct Handled {
    runs: Arc<Mutex<HashMap<MessageId, u32>>>,
    total: Arc<watch::Sender<usize>>,
}

impl Handled {
    fn runs(&self) -> HashMap<MessageId, u32> {
        self.runs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits (at most 30 s) until `id` has been handled.
    async fn wait_for(&self, id: &MessageId) -> Result<(), String> {
        let mut seen = self.total.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.runs().contains_key(id) {
            if tokio::time::timeout_at(deadline, seen.changed())
                .await
                .is_err()
            {
                return Err(format!("{id} was not handled within 30 s"));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventHandler<OrderPlaced> for Handled {
    async fn handle(&self, _ctx: HandlerCtx, event: OrderPlaced) -> Result<(), HandlerError> {
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(event.id).or_default() += 1;
        }
        self.total.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// The handler calling `Store::once` itself, keyed by the delivery's
/// message id: a permanent error is recorded as final (a redelivery gets
/// it again without running the handler), a transient one gives the claim
/// back and goes to the bus, which redelivers.
pub struct OnceHandled {
    /// The store; the bus is built without `.idempotency` for this handler.
    pub store: SledIdempotencyStore,
}

#[async_trait]
impl EventHandler<OrderPlaced> for OnceHandled {
    async fn handle(&self, ctx: HandlerCtx, event: OrderPlaced) -> Result<(), HandlerError> {
        let charge = |lease: Lease| async move {
            if event.order == 0 {
                return Err(HandlerError::Permanent("order 0 does not exist".into()));
            }
            // lease.token() goes with every downstream write as a fencing
            // token; the receipt is cached for redeliveries.
            Ok(format!(
                "order {} charged, token {}",
                event.order,
                lease.token()
            ))
        };
        let is_final = |e: &HandlerError| matches!(e, HandlerError::Permanent(_));
        let outcome = self
            .store
            .once(&ctx.msg_id, Duration::from_secs(30))
            .run_rejecting(charge, is_final)
            .await
            .map_err(|e| HandlerError::Transient(e.to_string()))?;
        match outcome {
            Outcome::Ran(_) | Outcome::Replayed(_) => Ok(()),
            Outcome::Rejected(error) => Err(error),
            Outcome::WasRejected { reason } => Err(HandlerError::Permanent(reason)),
            Outcome::Failed { error, .. } => Err(error),
            other => Err(HandlerError::Transient(format!(
                "not handled here: {other:?}"
            ))),
        }
    }
}

const STREAM: &str = "ORDERS";
const WINDOW: Duration = Duration::from_secs(1);

async fn bus(url: &str, store: &SledIdempotencyStore) -> Result<EventBus, String> {
    EventBusBuilder::new()
        .url(url)
        .stream_name(STREAM)
        // One server: the default of three replicas needs a cluster.
        .replicas(1)
        .dedup_window(WINDOW)
        // The store is a cheap handle: the bus gets a clone, we keep one
        // to close it.
        .idempotency(store.clone())
        .build()
        .await
        .map_err(|e| format!("connecting to NATS at {url}: {e}"))
}

fn options() -> SubscribeOptions {
    SubscribeOptions {
        stream: STREAM.into(),
        durable: "orders-worker".into(),
        filter: "events.orders.>".into(),
        ack_wait: Duration::from_secs(30),
        // With a backoff the server uses its first step as the ack wait.
        backoff: vec![],
        ..SubscribeOptions::default()
    }
}

/// Publishes `event` again until JetStream stores it as a new message
/// (its duplicate window for the id has passed).
async fn republish(bus: &EventBus, event: &OrderPlaced) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let receipt = bus.publish(event).await.map_err(|e| e.to_string())?;
        if !receipt.duplicate {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("JetStream's duplicate window never passed".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes a fresh sentinel and waits until it is handled and marked
/// done (the bus marks it done after the handler returns): with one
/// message at a time in stream order, everything published before it has
/// been handled (or skipped) by then.
async fn drain(
    bus: &EventBus,
    store: &SledIdempotencyStore,
    handled: &Handled,
    order: u32,
) -> Result<(), String> {
    let sentinel = OrderPlaced {
        id: MessageId::new(),
        order,
    };
    bus.publish(&sentinel).await.map_err(|e| e.to_string())?;
    handled.wait_for(&sentinel.id).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = store.get(&sentinel.id).await.map_err(|e| e.to_string())?;
        if record.is_some_and(|r| r.state == sled_idempotency::State::Done) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} was not marked done within 30 s", sentinel.id));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The whole scenario against the server at `url`, with the store at
/// `db`: whether every order was handled exactly once.
pub async fn run(url: &str, db: PathBuf) -> Result<bool, String> {
    let handled = Handled::default();
    let events: Vec<OrderPlaced> = (0..20)
        .map(|order| OrderPlaced {
            id: MessageId::new(),
            order,
        })
        .collect();

    let store = SledIdempotencyStore::open(&db)
        .await
        .map_err(|e| e.to_string())?;
    let first = bus(url, &store).await?;
    let consumer = first
        .subscribe(options(), handled.clone())
        .await
        .map_err(|e| e.to_string())?;
    for event in &events {
        first.publish(event).await.map_err(|e| e.to_string())?;
    }
    drain(&first, &store, &handled, 1000).await?;
    for event in &events {
        republish(&first, event).await?;
    }
    drain(&first, &store, &handled, 1001).await?;
    println!("published 20 orders, then each again past the duplicate window");

    // Restart: the consumer goes, the store is closed and reopened.
    drop(consumer);
    drop(first);
    store.close().await.map_err(|e| e.to_string())?;
    let store = SledIdempotencyStore::open(&db)
        .await
        .map_err(|e| e.to_string())?;
    let second = bus(url, &store).await?;
    let _consumer = second
        .subscribe(options(), handled.clone())
        .await
        .map_err(|e| e.to_string())?;
    for event in &events {
        republish(&second, event).await?;
    }
    drain(&second, &store, &handled, 1002).await?;
    println!("restarted the consumer, published each order a third time");

    let stats = store.stats().await.map_err(|e| e.to_string())?;
    store.close().await.map_err(|e| e.to_string())?;
    let runs = handled.runs();
    let once = events.iter().all(|e| runs.get(&e.id) == Some(&1));
    println!(
        "handler runs per order: {:?}",
        events
            .iter()
            .map(|e| runs.get(&e.id).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    );
    println!(
        "store after the restart: {} claims, {} duplicates skipped as done",
        stats.claims, stats.duplicates_done
    );
    println!(
        "{}",
        if once {
            "each order was handled exactly once"
        } else {
            "SOME ORDER WAS NOT HANDLED EXACTLY ONCE"
        }
    );
    Ok(once)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let scratch = tempfile::tempdir();
    let db = match (args.next(), &scratch) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Ok(dir)) => dir.path().join("dedup-db"),
        (None, Err(e)) => {
            eprintln!("cannot create a temporary directory: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&url, db).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
