//! One suite of contract tests, generic over the engine, run against sled,
//! a single Redis server and a three-master Redis Cluster: every cell of the
//! semantics table, the lease and fingerprint rules, results, namespaces,
//! 64 tasks racing for one key, fencing tokens, and the sweep-independence
//! property.
//!
//! Where the engines legitimately differ, it is said here, once:
//!
//! - **Sweeping.** sled removes forgotten records with its sweeper; Redis
//!   expires them on the server at the moment they are forgotten. The
//!   suite's clock is a manual one, which the server's expiry does not
//!   follow, so for Redis `sweep` deletes the records the model calls
//!   forgotten, as the server's own expiry would.
//! - **Token values.** Both engines hand out strictly increasing tokens
//!   along each key's history; sled's count up from 1 and are unique in the
//!   database, Redis's come from a counter per bucket of keys, never below
//!   the server's clock in microseconds, and tokens of different keys are
//!   not ordered. The suite checks the order along one key only.
//! - **Closing.** Closing a sled store flushes and releases its directory;
//!   closing a Redis store only ends its handles (every acknowledged write
//!   is already on the server).
#![cfg(feature = "redis")]

mod common;
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use sled_idempotency::redis::RedisEngine;
use sled_idempotency::{
    ClaimOutcome, ClaimResult, DEFAULT_PENDING_RETENTION, DEFAULT_TTL, Engine, Error, Holder,
    IdempotencyStore, Lease, ManualClock, MessageId, Record, Result, SledEngine,
    SledIdempotencyStore, State, Store,
};

use common::{TTL, TestResult, id};

/// Start of the suite's manual clock: the year 2096. Redis expires records
/// at the manual clock's times (`PEXPIREAT`), so they must lie in the
/// server's future for the server to keep them while the suite runs.
const T0: u64 = 4_000_000_000_000;

/// A store under test: the contracts call [`Store`]'s own methods, generic
/// over its engine, through `Deref`; only sweeping (see the module docs)
/// and the Redis server's address are the suite's.
#[derive(Clone)]
struct Target<E: Engine> {
    store: Store<E>,
    /// The Redis server or cluster, for deleting what the model forgets.
    url: Option<String>,
}

impl<E: Engine> std::ops::Deref for Target<E> {
    type Target = Store<E>;
    fn deref(&self) -> &Store<E> {
        &self.store
    }
}

impl<E: Forget> Target<E> {
    async fn namespace(&self, name: &str) -> Result<Self> {
        Ok(Target {
            store: self.store.namespace(name).await?,
            url: self.url.clone(),
        })
    }

    fn bus(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(self.store.clone())
    }

    /// Removes forgotten records of `keys` (see the module docs).
    async fn sweep(&self, keys: &[MessageId], now: u64) -> Result<()> {
        E::forget(self, keys, now).await
    }
}

/// How each engine's forgotten records go.
trait Forget: Engine {
    fn forget(
        target: &Target<Self>,
        keys: &[MessageId],
        now: u64,
    ) -> impl Future<Output = Result<()>> + Send;
}

impl Forget for SledEngine {
    async fn forget(target: &Target<Self>, _: &[MessageId], _: u64) -> Result<()> {
        target.store.sweep_expired().await.map(|_| ())
    }
}

impl Forget for RedisEngine {
    async fn forget(target: &Target<Self>, keys: &[MessageId], now: u64) -> Result<()> {
        let store = &target.store;
        let url = target.url.as_deref().expect("a Redis target has its url");
        for key in keys {
            if let Some(record) = store.get_record(key).await?
                && forgotten(&record, now)
            {
                let hex = key.as_uuid().simple().to_string();
                let bucket = &hex[hex.len() - 4..];
                let ns = store.namespace_name();
                let name = format!("sid:{{{bucket}}}:{ns}:{hex}");
                let deleted = raw_del(url, store.is_cluster(), &name);
                assert_eq!(deleted.ok(), Some(1), "deleting forgotten {name}");
            }
        }
        Ok(())
    }
}

/// `DEL name` on the server or cluster at `url`, through a plain client.
fn raw_del(url: &str, cluster: bool, name: &str) -> redis::RedisResult<i64> {
    let mut del = redis::cmd("DEL");
    del.arg(name);
    if cluster {
        let mut conn = redis::cluster::ClusterClient::new(vec![url])?.get_connection()?;
        del.query(&mut conn)
    } else {
        del.query(&mut redis::Client::open(url)?.get_connection()?)
    }
}

/// Whether the sweeper may remove `record` at `now` under the default
/// retention: a `Done` once expired, a `Pending` once `pending_retention`
/// past its expiry (docs/semantics.md, "Semantics").
fn forgotten(record: &Record, now: u64) -> bool {
    let pending_ms = DEFAULT_PENDING_RETENTION.as_millis() as u64;
    now >= match record.state {
        State::Done => record.expires_at,
        State::Pending => record.expires_at.saturating_add(pending_ms),
    }
}

async fn sled_engine(clock: &ManualClock) -> Result<(Target<SledEngine>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().map_err(|e| Error::Io {
        context: "tempdir",
        source: e,
    })?;
    let store = SledIdempotencyStore::builder(dir.path().join("db"))
        .clock(clock.clone())
        .open()
        .await?;
    Ok((Target { store, url: None }, dir))
}

async fn redis_engine(url: String, clock: &ManualClock) -> Result<Target<RedisEngine>> {
    let store = redis_server::flush_store(url.clone(), Some(clock)).await?;
    Ok(Target {
        store,
        url: Some(url),
    })
}

/// The lease of a claim that must acquire one.
fn leased(result: ClaimResult) -> Lease {
    match result {
        ClaimResult::Acquired(lease) => lease,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn holder(result: Result<impl std::fmt::Debug>) -> Holder {
    match result {
        Err(Error::LeaseLost { holds, .. }) => holds,
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

// ---- the semantics table ------------------------------------------------

async fn claim_absent_then_duplicates<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    let lease = leased(s.claim(&id(1), TTL).await?);
    assert_eq!((lease.attempt(), lease.expires_at()), (1, T0 + 30_000));
    let dup = s.claim(&id(1), TTL).await?;
    assert_eq!(
        dup,
        ClaimResult::InProgress {
            expires_at: T0 + 30_000,
            attempts: 1
        }
    );
    clock.advance(Duration::from_millis(29_999));
    assert!(matches!(
        s.claim(&id(1), TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    clock.advance(Duration::from_millis(1)); // exactly at expiry: expired
    let again = leased(s.claim(&id(1), TTL).await?);
    assert_eq!(again.attempt(), 2, "a takeover counts the attempt");
    assert!(again.token() > lease.token());
    Ok(())
}

async fn live_done_is_done_and_expired_done_starts_afresh<E: Forget>(
    s: &Target<E>,
    clock: &ManualClock,
) -> TestResult {
    let lease = leased(s.claim(&id(2), TTL).await?);
    s.complete(&lease).await?;
    assert_eq!(
        s.claim(&id(2), TTL).await?,
        ClaimResult::Done { result: None }
    );
    let record = s.get_record(&id(2)).await?.expect("done record");
    assert_eq!(
        (record.state, record.expires_at),
        (State::Done, T0 + 30_000)
    );
    clock.advance(TTL);
    let fresh = leased(s.claim(&id(2), TTL).await?);
    assert_eq!(fresh.attempt(), 1, "an expired done record is forgotten");
    Ok(())
}

async fn mark_done_cells<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    // Live pending: done for the claim's ttl, token kept.
    let lease = leased(s.claim(&id(3), TTL).await?);
    clock.advance(Duration::from_secs(5));
    s.mark_done(&id(3)).await?;
    let r = s.get_record(&id(3)).await?.expect("record");
    assert_eq!(
        (r.state, r.expires_at, r.token),
        (State::Done, T0 + 35_000, lease.token())
    );
    // Live done: no write.
    clock.advance(Duration::from_secs(5));
    s.mark_done(&id(3)).await?;
    assert_eq!(
        s.get_record(&id(3)).await?.map(|r| r.expires_at),
        Some(T0 + 35_000)
    );
    // Expired but remembered pending: acts as on a live one.
    let lease = leased(s.claim(&id(4), TTL).await?);
    clock.advance(TTL + Duration::from_secs(1));
    s.mark_done(&id(4)).await?;
    let r = s.get_record(&id(4)).await?.expect("record");
    assert_eq!(
        (r.state, r.token, r.attempts),
        (State::Done, lease.token(), 1)
    );
    // Absent: a late completion, done for the default ttl, token 0.
    let now = clock.now();
    s.mark_done(&id(5)).await?;
    let r = s.get_record(&id(5)).await?.expect("record");
    let default = DEFAULT_TTL.as_millis() as u64;
    assert_eq!(
        (r.state, r.token, r.expires_at),
        (State::Done, 0, now + default)
    );
    assert_eq!(
        s.claim(&id(5), TTL).await?,
        ClaimResult::Done { result: None }
    );
    Ok(())
}

async fn release_cells<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    leased(s.claim(&id(6), TTL).await?);
    s.release(&id(6)).await?;
    assert_eq!(
        s.get_record(&id(6)).await?,
        None,
        "a live claim is released"
    );
    leased(s.claim(&id(6), TTL).await?);
    clock.advance(TTL + Duration::from_secs(1));
    s.release(&id(6)).await?;
    assert_eq!(
        s.get_record(&id(6)).await?,
        None,
        "an expired claim is released"
    );
    s.mark_done(&id(7)).await?;
    s.release(&id(7)).await?;
    assert_eq!(
        s.claim(&id(7), TTL).await?,
        ClaimResult::Done { result: None }
    );
    s.release(&id(8)).await?;
    assert_eq!(
        s.get_record(&id(8)).await?,
        None,
        "releasing nothing writes nothing"
    );
    Ok(())
}

// ---- leases -------------------------------------------------------------

async fn a_taken_over_lease_is_lost<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    let old = leased(s.claim(&id(10), TTL).await?);
    clock.advance(TTL);
    let new = leased(s.claim(&id(10), TTL).await?);
    let expected = Holder::Claim {
        token: new.token(),
        expires_at: new.expires_at(),
        attempts: 2,
    };
    assert_eq!(holder(s.complete(&old).await), expected);
    assert_eq!(holder(s.abandon(&old).await), expected);
    assert_eq!(holder(s.extend(&old, TTL).await), expected);
    s.complete(&new).await?;
    s.complete(&new).await?; // completing twice is fine
    let done = holder(s.abandon(&new).await);
    assert!(matches!(done, Holder::Done { token, .. } if token == new.token()));
    Ok(())
}

async fn an_expired_lease_nobody_reclaimed_is_held_and_extend_keeps_it<E: Forget>(
    s: &Target<E>,
    clock: &ManualClock,
) -> TestResult {
    let lease = leased(s.claim(&id(11), TTL).await?);
    clock.advance(Duration::from_secs(20));
    let longer = s.extend(&lease, TTL).await?;
    assert_eq!(longer.expires_at(), clock.now() + 30_000);
    clock.advance(Duration::from_secs(20)); // past the first expiry
    assert!(matches!(
        s.claim(&id(11), TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    clock.advance(Duration::from_secs(20)); // expired, nobody re-claimed
    s.complete_with(&longer, b"ok").await?;
    assert_eq!(
        s.claim(&id(11), TTL).await?,
        ClaimResult::Done {
            result: Some(b"ok".to_vec())
        }
    );
    let abandoned = leased(s.claim(&id(12), TTL).await?);
    s.abandon(&abandoned).await?;
    assert_eq!(holder(s.complete(&abandoned).await), Holder::Nothing);
    Ok(())
}

async fn leases_refuse_another_namespace_and_bad_ttls<E: Forget>(
    s: &Target<E>,
    _: &ManualClock,
) -> TestResult {
    let other = s.namespace("other").await?;
    let lease = leased(s.claim(&id(13), TTL).await?);
    assert!(matches!(
        other.complete(&lease).await,
        Err(Error::WrongNamespace { .. })
    ));
    assert!(matches!(
        s.claim(&id(14), Duration::ZERO).await,
        Err(Error::TtlTooShort { .. })
    ));
    assert!(matches!(
        s.extend(&lease, Duration::ZERO).await,
        Err(Error::TtlTooShort { .. })
    ));
    assert!(matches!(
        s.claim(&id(14), Duration::from_millis(u64::MAX)).await,
        Err(Error::TtlOverflow { .. })
    ));
    assert!(matches!(
        s.namespace("bad name").await,
        Err(Error::InvalidNamespace { .. })
    ));
    assert_eq!(s.get_record(&id(14)).await?, None);
    Ok(())
}

// ---- results and fingerprints --------------------------------------------

async fn results<E: Forget>(s: &Target<E>, _: &ManualClock) -> TestResult {
    let lease = leased(s.claim(&id(20), TTL).await?);
    let big = vec![7u8; sled_idempotency::DEFAULT_MAX_RESULT_SIZE + 1];
    assert!(matches!(
        s.complete_with(&lease, &big).await,
        Err(Error::ResultTooLarge { .. })
    ));
    assert_eq!(
        s.get_record(&id(20)).await?.map(|r| r.state),
        Some(State::Pending)
    );
    let binary = [0u8, 255, 10, 13, 0];
    s.complete_with(&lease, &binary).await?;
    s.complete_with(&lease, &binary).await?; // same result again: fine
    assert!(matches!(
        s.complete_with(&lease, b"other").await,
        Err(Error::DifferentResult { .. })
    ));
    assert_eq!(
        s.claim(&id(20), TTL).await?,
        ClaimResult::Done {
            result: Some(binary.to_vec())
        }
    );
    Ok(())
}

async fn fingerprints<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    let lease = leased(s.claim_with_fingerprint(&id(21), TTL, b"a").await?);
    assert!(matches!(
        s.claim_with_fingerprint(&id(21), TTL, b"a").await?,
        ClaimResult::InProgress { .. }
    ));
    assert_eq!(
        s.claim_with_fingerprint(&id(21), TTL, b"b").await?,
        ClaimResult::Conflict { done: false }
    );
    assert!(matches!(
        s.claim(&id(21), TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    s.complete(&lease).await?;
    assert_eq!(
        s.claim_with_fingerprint(&id(21), TTL, b"b").await?,
        ClaimResult::Conflict { done: true }
    );
    assert_eq!(
        s.get_record(&id(21)).await?.and_then(|r| r.fingerprint),
        Some(b"a".to_vec())
    );
    clock.advance(TTL);
    leased(s.claim_with_fingerprint(&id(21), TTL, b"b").await?); // expired: a new message
    assert!(matches!(
        s.claim_with_fingerprint(&id(22), TTL, &[0; 65]).await,
        Err(Error::FingerprintTooLong { .. })
    ));
    Ok(())
}

// ---- namespaces, concurrency, tokens -------------------------------------

async fn namespaces_are_isolated<E: Forget>(s: &Target<E>, _: &ManualClock) -> TestResult {
    let a = s.namespace("orders").await?;
    let b = s.namespace("billing").await?;
    let lease = leased(a.claim(&id(30), TTL).await?);
    leased(b.claim(&id(30), TTL).await?);
    assert!(matches!(
        s.claim(&id(30), TTL).await?,
        ClaimResult::Acquired(_)
    ));
    a.complete(&lease).await?;
    assert!(matches!(
        b.claim(&id(30), TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    let names = s.namespaces().await?;
    assert_eq!(names.first().map(String::as_str), Some("default"));
    assert!(names.iter().any(|n| n == "orders") && names.iter().any(|n| n == "billing"));
    assert_eq!(
        a.bus().try_claim(&id(31), TTL).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(b.get_record(&id(31)).await?, None);
    Ok(())
}

async fn sixty_four_tasks_one_winner<E: Forget>(s: &Target<E>, _: &ManualClock) -> TestResult {
    for round in 0..10u128 {
        let key = id(1_000 + round);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let s = s.clone();
                let key = key.clone();
                tokio::spawn(async move { s.claim(&key, TTL).await })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if matches!(task.await??, ClaimResult::Acquired(_)) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one claim wins");
    }
    Ok(())
}

async fn tokens_increase_along_each_keys_history<E: Forget>(
    s: &Target<E>,
    clock: &ManualClock,
) -> TestResult {
    let key = id(40);
    let mut last = 0;
    let mut next = |lease: &Lease| {
        assert!(lease.token() > last, "{} after {last}", lease.token());
        last = lease.token();
    };
    let lease = leased(s.claim(&key, TTL).await?);
    next(&lease);
    s.release(&key).await?;
    let lease = leased(s.claim(&key, TTL).await?);
    next(&lease);
    s.abandon(&lease).await?;
    let lease = leased(s.claim(&key, TTL).await?);
    next(&lease);
    clock.advance(TTL); // expired: taken over
    let lease = leased(s.claim(&key, TTL).await?);
    next(&lease);
    s.complete(&lease).await?;
    clock.advance(TTL + DEFAULT_PENDING_RETENTION);
    s.sweep(std::slice::from_ref(&key), clock.now()).await?;
    assert_eq!(s.get_record(&key).await?, None);
    let lease = leased(s.claim(&key, TTL).await?);
    next(&lease);
    // Claims of other keys in between do not matter to the order.
    leased(s.claim(&id(41), TTL).await?);
    s.release(&key).await?;
    next(&leased(s.claim(&key, TTL).await?));
    Ok(())
}

/// Removing a forgotten record changes no outcome: the same script with
/// and without sweeps gives the same answers.
async fn sweeps_change_no_outcome<E: Forget>(s: &Target<E>, clock: &ManualClock) -> TestResult {
    let mut answers = Vec::new();
    for (name, sweeping) in [("swept", true), ("kept", false)] {
        clock.set(T0);
        let s = s.namespace(name).await?;
        let keys = [id(50), id(51), id(52)];
        let mut seen = Vec::new();
        leased(s.claim(&keys[0], TTL).await?);
        s.mark_done(&keys[1]).await?;
        let lease = leased(s.claim(&keys[2], TTL).await?);
        for step in 0..4 {
            clock.advance(DEFAULT_TTL.max(TTL + DEFAULT_PENDING_RETENTION));
            if sweeping {
                s.sweep(&keys, clock.now()).await?;
            }
            for key in &keys {
                let claimed = s.claim(key, TTL).await?;
                seen.push(format!("{step}: {:?}", claimed.lease().map(Lease::attempt)));
            }
            let completed = s
                .complete(&lease)
                .await
                .map_err(|e| match holder(Err::<(), _>(e)) {
                    Holder::Nothing => "nothing",
                    Holder::Claim { .. } => "a claim",
                    Holder::Done { .. } => "done",
                });
            seen.push(format!("{completed:?}"));
            s.mark_done(&keys[step % 3]).await?;
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    Ok(())
}

async fn behind_the_bus_core_trait<E: Forget>(s: &Target<E>, _: &ManualClock) -> TestResult {
    let bus = s.bus();
    assert_eq!(bus.try_claim(&id(60), TTL).await?, ClaimOutcome::Claimed);
    assert_eq!(
        bus.try_claim(&id(60), TTL).await?,
        ClaimOutcome::AlreadyPending
    );
    bus.release(&id(60)).await?;
    assert_eq!(bus.try_claim(&id(60), TTL).await?, ClaimOutcome::Claimed);
    bus.mark_done(&id(60)).await?;
    assert_eq!(
        bus.try_claim(&id(60), TTL).await?,
        ClaimOutcome::AlreadyDone
    );
    Ok(())
}

/// Generates one test per contract and engine (sled, one Redis server), and
/// one test that runs every contract in turn on one Redis Cluster.
macro_rules! conformance {
    ($($contract:ident),* $(,)?) => {
        mod sled_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    let clock = super::ManualClock::new(super::T0);
                    let (engine, _dir) = super::sled_engine(&clock).await?;
                    super::$contract(&engine, &clock).await?;
                    engine.store.close().await?;
                    Ok(())
                }
            )*
        }

        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    if !super::redis_server::available() {
                        return Ok(());
                    }
                    let server = super::redis_server::Server::start();
                    let clock = super::ManualClock::new(super::T0);
                    let engine = super::redis_engine(server.url(), &clock).await?;
                    assert!(!engine.store.is_cluster());
                    super::$contract(&engine, &clock).await?;
                    Ok(())
                }
            )*
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis_cluster_runs_every_contract() -> TestResult {
            if !redis_server::available() {
                return Ok(());
            }
            let cluster = redis_server::Cluster::start();
            let mut ran = 0;
            $(
                cluster.flush();
                let clock = ManualClock::new(T0);
                let engine = redis_engine(cluster.url(), &clock).await?;
                assert!(engine.store.is_cluster(), "open(url) detects the cluster");
                $contract(&engine, &clock).await?;
                ran += 1;
            )*
            eprintln!("{ran} contracts passed on a 3-master cluster");
            Ok(())
        }
    };
}

conformance!(
    claim_absent_then_duplicates,
    live_done_is_done_and_expired_done_starts_afresh,
    mark_done_cells,
    release_cells,
    a_taken_over_lease_is_lost,
    an_expired_lease_nobody_reclaimed_is_held_and_extend_keeps_it,
    leases_refuse_another_namespace_and_bad_ttls,
    results,
    fingerprints,
    namespaces_are_isolated,
    sixty_four_tasks_one_winner,
    tokens_increase_along_each_keys_history,
    sweeps_change_no_outcome,
    behind_the_bus_core_trait,
);
