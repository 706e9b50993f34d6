//! The store inside `eventbus-nats` 0.1.2, against a real `nats-server -js`:
//! the example's scenario (every event republished past JetStream's
//! duplicate window and across a consumer restart, each handled exactly
//! once), and what the consumer does with the store's other answers, which
//! docs/operating.md documents:
//!
//! - on `AlreadyPending` it runs the handler anyway, at once, and then
//!   marks the key done under the other holder's claim;
//! - after `AlreadyPending`, a transient handler error releases the other
//!   holder's claim;
//! - a store error naks the message without counting attempts, and after
//!   `max_deliver` deliveries the message is never handled.

mod nats_server;

#[path = "../examples/eventbus_nats.rs"]
#[allow(dead_code)]
mod example;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{EventHandler, HandlerCtx, HandlerError, MessageId};
use eventbus_nats::prelude::Event;
use eventbus_nats::{EventBus, EventBusBuilder, SubscribeOptions};
use futures_util::StreamExt;
use nats_server::Nats;
use serde::{Deserialize, Serialize};
use sled_idempotency::{ClaimResult, Error, SledIdempotencyStore, State};
use tokio::sync::watch;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const STREAM: &str = "PROBE";
const DURABLE: &str = "probe-worker";
const TTL: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_handles_each_event_exactly_once() -> TestResult {
    if !nats_server::available() {
        return Ok(());
    }
    let nats = Nats::start();
    let dir = tempfile::tempdir()?;
    let once = example::run(&nats.url, dir.path().join("dedup-db")).await?;
    assert!(once, "some event was not handled exactly once");
    // The restarted consumer's store saw every copy as done.
    let store = SledIdempotencyStore::open(dir.path().join("dedup-db")).await?;
    assert_eq!(store.admin().census().await?.live_done, 20 + 3);
    store.close().await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(subject = "events.probe")]
struct Probe {
    id: MessageId,
    flaky: bool,
}

impl Probe {
    fn new(flaky: bool) -> Probe {
        Probe {
            id: MessageId::new(),
            flaky,
        }
    }
}

/// Records the delivery count of each handler run; fails the first
/// delivery of a flaky event with a transient error.
#[derive(Clone, Default)]
struct Log {
    runs: Arc<Mutex<Vec<(MessageId, u64)>>>,
    changed: Arc<watch::Sender<usize>>,
}

impl Log {
    fn deliveries(&self, id: &MessageId) -> Vec<u64> {
        let runs = self.runs.lock().map(|r| r.clone()).unwrap_or_default();
        runs.iter()
            .filter(|(run, _)| run == id)
            .map(|(_, delivered)| *delivered)
            .collect()
    }

    async fn wait_runs(&self, id: &MessageId, n: usize) {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.deliveries(id).len() < n {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                panic!("{id}: {} runs, expected {n}", self.deliveries(id).len());
            }
        }
    }
}

#[async_trait]
impl EventHandler<Probe> for Log {
    async fn handle(&self, ctx: HandlerCtx, event: Probe) -> Result<(), HandlerError> {
        if let Ok(mut runs) = self.runs.lock() {
            runs.push((event.id.clone(), ctx.delivered));
        }
        self.changed.send_modify(|n| *n += 1);
        if event.flaky && ctx.delivered == 1 {
            return Err(HandlerError::Transient("the first try fails".into()));
        }
        Ok(())
    }
}

async fn bus(url: &str, store: &SledIdempotencyStore) -> Result<EventBus, bus_core::BusError> {
    EventBusBuilder::new()
        .url(url)
        .stream_name(STREAM)
        .replicas(1)
        .idempotency(store.clone())
        .build()
        .await
}

fn options() -> SubscribeOptions {
    SubscribeOptions {
        stream: STREAM.into(),
        durable: DURABLE.into(),
        filter: "events.>".into(),
        ack_wait: Duration::from_secs(30),
        backoff: vec![Duration::from_secs(1)],
        ..SubscribeOptions::default()
    }
}

/// The durable consumer's state, once everything up to `sequence` is
/// acknowledged.
async fn acked(nats: &Nats, sequence: u64) -> async_nats::jetstream::consumer::Info {
    let client = async_nats::connect(&nats.url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let info = js
            .get_stream(STREAM)
            .await
            .expect("the stream")
            .consumer_info(DURABLE)
            .await
            .expect("the consumer")
            .clone();
        if info.ack_floor.stream_sequence >= sequence && info.num_ack_pending == 0 {
            return info;
        }
        assert!(std::time::Instant::now() < deadline, "not acked: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer running on a store in which another worker (here a lease
/// taken directly) holds the key of `event` when it is published.
struct Held {
    nats: Nats,
    _dir: tempfile::TempDir,
    store: SledIdempotencyStore,
    log: Log,
    _bus: EventBus,
    _consumer: eventbus_nats::SubscriptionHandle,
    event: Probe,
    lease: sled_idempotency::Lease,
    sequence: u64,
}

async fn held_when_published(
    flaky: bool,
) -> Result<Held, Box<dyn std::error::Error + Send + Sync>> {
    let nats = Nats::start();
    let dir = tempfile::tempdir()?;
    let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
    let log = Log::default();
    let bus = bus(&nats.url, &store).await?;
    let consumer = bus.subscribe(options(), log.clone()).await?;
    let event = Probe::new(flaky);
    let ClaimResult::Acquired(lease) = store.claim(&event.id, TTL).await? else {
        return Err("a fresh key".into());
    };
    let sequence = bus.publish(&event).await?.sequence;
    Ok(Held {
        nats,
        _dir: dir,
        store,
        log,
        _bus: bus,
        _consumer: consumer,
        event,
        lease,
        sequence,
    })
}

/// The consumer answers `AlreadyPending` by running the handler at once,
/// then marks the key done under the other worker's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_already_pending_the_consumer_runs_the_handler_anyway() -> TestResult {
    if !nats_server::available() {
        return Ok(());
    }
    let held = held_when_published(false).await?;
    held.log.wait_runs(&held.event.id, 1).await;
    let info = acked(&held.nats, held.sequence).await;
    assert_eq!(
        held.log.deliveries(&held.event.id),
        vec![1],
        "no nak, no delay"
    );
    assert_eq!(info.num_redelivered, 0);
    let stats = held.store.stats().await?;
    assert_eq!((stats.duplicates_pending, stats.completions), (1, 1));
    let record = held.store.get(&held.event.id).await?.ok_or("a record")?;
    assert_eq!(
        (record.state, record.token),
        (State::Done, held.lease.token())
    );
    // The other worker completes as if nothing happened.
    held.store.complete(&held.lease).await?;
    held.store.close().await?;
    Ok(())
}

/// After `AlreadyPending`, a transient handler error makes the consumer
/// release the key, a claim it never held; the redelivery claims it
/// afresh and runs the handler again, and the holder loses its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_after_already_pending_releases_the_holders_claim() -> TestResult {
    if !nats_server::available() {
        return Ok(());
    }
    let held = held_when_published(true).await?;
    held.log.wait_runs(&held.event.id, 2).await;
    acked(&held.nats, held.sequence).await;
    assert_eq!(held.log.deliveries(&held.event.id), vec![1, 2]);
    let stats = held.store.stats().await?;
    assert_eq!((stats.releases, stats.claims), (1, 2));
    assert!(matches!(
        held.store.complete(&held.lease).await,
        Err(Error::LeaseLost { .. })
    ));
    held.store.close().await?;
    Ok(())
}

/// A store that fails (here: closed) makes the consumer nak the message
/// without running the handler or counting attempts; after `max_deliver`
/// deliveries JetStream stops, and a consumer restarted on a working store
/// never gets the message back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_loses_the_message_after_max_deliver() -> TestResult {
    if !nats_server::available() {
        return Ok(());
    }
    let nats = Nats::start();
    let dir = tempfile::tempdir()?;
    let log = Log::default();
    let opts = || SubscribeOptions {
        max_deliver: 3,
        backoff: vec![],
        ..options()
    };
    let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
    let first = bus(&nats.url, &store).await?;
    let consumer = first.subscribe(opts(), log.clone()).await?;
    store.close().await?;

    let client = async_nats::connect(&nats.url).await?;
    let mut advisories = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.{DURABLE}"
        ))
        .await?;
    client.flush().await?;
    let lost = Probe::new(false);
    let receipt = first.publish(&lost).await?;
    tokio::time::timeout(DEADLINE, advisories.next())
        .await?
        .ok_or("no advisory")?;

    drop(consumer);
    drop(first);
    let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
    let second = bus(&nats.url, &store).await?;
    let _consumer = second.subscribe(opts(), log.clone()).await?;
    let sentinel = Probe::new(false);
    let after = second.publish(&sentinel).await?;
    log.wait_runs(&sentinel.id, 1).await;
    acked(&nats, after.sequence).await;
    assert!(after.sequence > receipt.sequence);
    assert!(log.deliveries(&lost.id).is_empty(), "never handled");
    assert!(store.get(&lost.id).await?.is_none(), "never claimed");
    store.close().await?;
    Ok(())
}
