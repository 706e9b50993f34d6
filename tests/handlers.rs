//! `Store::once` on both engines: one suite of contracts, generic over the
//! engine, run on sled and on a real `redis-server` (the conformance
//! suite's pattern). Expiry moves with a manual clock; where a contract
//! waits for something the store does in the background (a heartbeat, the
//! give-back of a cancelled run), it waits for its effect on the record,
//! bounded in real time, never for a fixed time.
#![cfg(feature = "handlers")]

mod common;
#[cfg(feature = "redis")]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sled_idempotency::handler::Outcome;
use sled_idempotency::{
    ClaimResult, Engine, Error, Lease, ManualClock, MessageId, SledIdempotencyStore, State, Store,
};

use common::{TestResult, id};

/// The manual clock's start: in the Redis server's future (it expires
/// records at the manual clock's times).
const T0: u64 = 4_000_000_000_000;
const TTL: Duration = Duration::from_secs(30);

/// Counts the handler's runs.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A handler that returns its lease's token and counts its runs.
fn token_of(runs: &Runs) -> impl FnOnce(Lease) -> std::future::Ready<Result<u64, String>> + use<> {
    let runs = runs.clone();
    move |lease| {
        runs.hit();
        std::future::ready(Ok(lease.token()))
    }
}

/// A handler that fails with `message` and counts its runs.
fn failing(
    runs: &Runs,
    message: &'static str,
) -> impl FnOnce(Lease) -> std::future::Ready<Result<u64, String>> + use<> {
    let runs = runs.clone();
    move |_| {
        runs.hit();
        std::future::ready(Err(message.to_string()))
    }
}

/// Polls `check` until it holds, for at most ten seconds of real time.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn stored_state<E: Engine>(s: &Store<E>, key: &MessageId) -> Option<(State, u64)> {
    s.get_record(key)
        .await
        .expect("read the record")
        .map(|r| (r.state, r.expires_at))
}

/// Runs a handler that returns its attempt number.
async fn run_again<E: Engine>(
    s: &Store<E>,
    key: &MessageId,
) -> sled_idempotency::Result<Outcome<u32, String>> {
    let attempt = |lease: Lease| async move { Ok::<u32, String>(lease.attempt()) };
    s.once(key, TTL).run(attempt).await
}

// ---- the contracts -------------------------------------------------------

/// A new key runs the handler and caches its value; every duplicate gets
/// the value back without running anything.
async fn a_new_key_runs_and_duplicates_replay<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let runs = Runs::default();
    let key = id(1);
    let first = s.once(&key, TTL).run(token_of(&runs)).await?;
    let Outcome::Ran(token) = first else {
        panic!("a new key runs: {first:?}")
    };
    assert!(first_is_settled(&Outcome::<u64, String>::Ran(token)));
    let record = s.get(&key).await?.expect("a done record");
    assert_eq!(record.state, State::Done);
    assert_eq!(record.token, token, "the handler saw the record's token");
    assert_eq!(
        record.result.as_deref(),
        Some(format!("{{\"ok\":{token}}}").as_bytes()),
        "the value is cached as JSON"
    );
    for _ in 0..3 {
        let again = s.once(&key, TTL).run(token_of(&runs)).await?;
        assert!(
            matches!(again, Outcome::Replayed(t) if t == token),
            "{again:?}"
        );
    }
    assert_eq!(runs.count(), 1, "the handler ran once");
    Ok(())
}

fn first_is_settled<T, Er>(outcome: &Outcome<T, Er>) -> bool {
    outcome.is_settled() && outcome.value().is_some()
}

/// A done record without a cached result, or with one of another type, is
/// an error; the handler does not run.
async fn a_done_record_that_cannot_be_replayed_is_an_error<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let runs = Runs::default();
    let bare = id(2);
    s.mark_done(&bare).await?;
    let err = s.once(&bare, TTL).run(token_of(&runs)).await.unwrap_err();
    assert!(matches!(err, Error::NoCachedResult { .. }), "{err}");

    let typed = id(3);
    assert!(matches!(
        s.once(&typed, TTL).run(token_of(&runs)).await?,
        Outcome::Ran(_)
    ));
    let other_type = |_: Lease| async { Ok::<Vec<String>, String>(vec![]) };
    let err = s.once(&typed, TTL).run(other_type).await.unwrap_err();
    let Error::UndecodableResult { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(reason.contains("invalid type"), "{reason}");
    assert_eq!(runs.count(), 1);
    Ok(())
}

/// A key claimed elsewhere answers with that claim's expiry and attempt;
/// waiting replays its completion, or takes it over once given back.
async fn in_flight_elsewhere_answers_or_waits<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let runs = Runs::default();
    let key = id(4);
    let ClaimResult::Acquired(held) = s.claim(&key, TTL).await? else {
        panic!("a fresh key")
    };
    let busy = s.once(&key, TTL).run(token_of(&runs)).await?;
    assert!(
        matches!(busy, Outcome::InProgress { expires_at, attempts: 1 } if expires_at == held.expires_at()),
        "{busy:?}"
    );
    // Waiting that runs out answers the same.
    let busy = s
        .once(&key, TTL)
        .wait(Duration::from_millis(30))
        .poll_interval(Duration::from_millis(5))
        .run(token_of(&runs))
        .await?;
    assert!(matches!(busy, Outcome::InProgress { .. }), "{busy:?}");

    // The other worker completes while this one waits: replayed.
    let other = s.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.complete_with(&held, br#"{"ok":7}"#).await
    });
    let waited = s
        .once(&key, TTL)
        .wait(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(5))
        .run(token_of(&runs))
        .await?;
    finisher.await??;
    assert!(matches!(waited, Outcome::Replayed(7)), "{waited:?}");

    // The other worker gives its claim back while this one waits: it runs.
    let key = id(5);
    let ClaimResult::Acquired(held) = s.claim(&key, TTL).await? else {
        panic!("a fresh key")
    };
    let other = s.clone();
    let quitter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.abandon(&held).await
    });
    let waited = s
        .once(&key, TTL)
        .wait(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(5))
        .run(token_of(&runs))
        .await?;
    quitter.await??;
    assert!(matches!(waited, Outcome::Ran(_)), "{waited:?}");
    assert_eq!(runs.count(), 1);
    Ok(())
}

/// A handler error gives the claim back: the error is returned, the next
/// run retries as the next attempt, and nothing is marked done.
async fn a_handler_error_gives_the_claim_back<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let runs = Runs::default();
    let key = id(6);
    let failed = s.once(&key, TTL).run(failing(&runs, "boom")).await?;
    assert!(
        matches!(&failed, Outcome::Failed { error, attempt: 1 } if error == "boom"),
        "{failed:?}"
    );
    assert!(!failed.is_settled());
    assert!(s.get(&key).await?.is_none(), "given back: free to claim");
    let record = s.get_record(&key).await?.expect("remembered");
    assert_eq!(
        (record.state, record.attempts),
        (State::Pending, 1),
        "remembered, so the next attempt is counted"
    );
    let retried = run_again(s, &key).await?;
    assert!(matches!(retried, Outcome::Ran(2)), "{retried:?}");
    Ok(())
}

/// Errors judged final are recorded: the key is done, and duplicates get
/// the error's message without running anything.
async fn final_errors_are_recorded<E: Engine>(s: &Store<E>, _: &ManualClock) -> TestResult {
    let runs = Runs::default();
    let key = id(7);
    let is_final = |e: &String| e.starts_with("invalid");
    let rejected = s
        .once(&key, TTL)
        .run_rejecting(failing(&runs, "invalid amount"), is_final)
        .await?;
    assert!(
        matches!(&rejected, Outcome::Rejected(e) if e == "invalid amount"),
        "{rejected:?}"
    );
    assert!(rejected.is_settled());
    assert_eq!(s.get(&key).await?.map(|r| r.state), Some(State::Done));
    let again = s
        .once(&key, TTL)
        .run_rejecting(failing(&runs, "invalid amount"), is_final)
        .await?;
    assert!(
        matches!(&again, Outcome::WasRejected { reason } if reason == "invalid amount"),
        "{again:?}"
    );
    // An error not judged final is given back as usual.
    let other = id(8);
    let failed = s
        .once(&other, TTL)
        .run_rejecting(failing(&runs, "timeout"), is_final)
        .await?;
    assert!(matches!(failed, Outcome::Failed { .. }), "{failed:?}");
    assert_eq!(runs.count(), 2);
    Ok(())
}

/// After `max` attempts the key is recorded as poisoned and the handler
/// does not run again.
async fn max_attempts_poisons<E: Engine>(s: &Store<E>, _: &ManualClock) -> TestResult {
    let runs = Runs::default();
    let key = id(9);
    for attempt in 1..=3 {
        let failed = s
            .once(&key, TTL)
            .max_attempts(3)
            .run(failing(&runs, "boom"))
            .await?;
        assert!(
            matches!(failed, Outcome::Failed { attempt: a, .. } if a == attempt),
            "{failed:?}"
        );
    }
    for _ in 0..2 {
        let poisoned = s
            .once(&key, TTL)
            .max_attempts(3)
            .run(failing(&runs, "boom"))
            .await?;
        assert!(
            matches!(poisoned, Outcome::Poisoned { attempts: 3 }),
            "{poisoned:?}"
        );
    }
    assert_eq!(runs.count(), 3, "three attempts, then no more");
    assert_eq!(s.get(&key).await?.map(|r| r.state), Some(State::Done));
    Ok(())
}

/// A live record claimed with another fingerprint is a conflict; the
/// handler does not run.
async fn a_different_fingerprint_conflicts<E: Engine>(s: &Store<E>, _: &ManualClock) -> TestResult {
    let runs = Runs::default();
    let key = id(10);
    let ran = s
        .once(&key, TTL)
        .fingerprint(b"payload-a")
        .run(token_of(&runs))
        .await?;
    assert!(matches!(ran, Outcome::Ran(_)));
    let same = s
        .once(&key, TTL)
        .fingerprint(b"payload-a")
        .run(token_of(&runs))
        .await?;
    assert!(matches!(same, Outcome::Replayed(_)), "{same:?}");
    let other = s
        .once(&key, TTL)
        .fingerprint(b"payload-b")
        .run(token_of(&runs))
        .await?;
    assert!(
        matches!(other, Outcome::Conflict { done: true }),
        "{other:?}"
    );
    assert_eq!(runs.count(), 1);
    Ok(())
}

/// A handler that panics: the claim is given back before the panic
/// reaches the caller, and the key is not marked done.
async fn a_panic_gives_the_claim_back<E: Engine>(s: &Store<E>, _: &ManualClock) -> TestResult {
    let key = id(11);
    let (store, k) = (s.clone(), key.clone());
    let panicked = tokio::spawn(async move {
        store
            .once(&k, TTL)
            .run(|_: Lease| async {
                if true {
                    panic!("the handler panics");
                }
                Ok::<u64, String>(0)
            })
            .await
    })
    .await;
    let err = panicked.expect_err("the panic reaches the caller");
    assert!(err.is_panic());
    // Given back before the panic went on: no waiting needed.
    assert!(s.get(&key).await?.is_none(), "free to claim again");
    let record = s.get_record(&key).await?.expect("remembered");
    assert_eq!((record.state, record.attempts), (State::Pending, 1));

    // A handler that panics before returning its future, too.
    let key2 = id(12);
    let (store, k) = (s.clone(), key2.clone());
    let panicked = tokio::spawn(async move {
        store
            .once(&k, TTL)
            .run(|_: Lease| -> std::future::Ready<Result<u64, String>> {
                panic!("the handler panics at once")
            })
            .await
    })
    .await;
    assert!(
        panicked
            .expect_err("the panic reaches the caller")
            .is_panic()
    );
    assert!(s.get(&key2).await?.is_none(), "free to claim again");

    let retried = run_again(s, &key).await?;
    assert!(matches!(retried, Outcome::Ran(2)), "{retried:?}");
    Ok(())
}

/// A run whose future is dropped mid-handler (its task aborted, or a
/// timeout around it) gives the claim back from a spawned task; the key is
/// never marked done.
async fn a_dropped_run_gives_the_claim_back<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    for (n, how) in [(13, "abort"), (14, "timeout")] {
        let key = id(n);
        let (started, is_started) = tokio::sync::oneshot::channel::<()>();
        let (store, k) = (s.clone(), key.clone());
        let run = async move {
            store
                .once(&k, TTL)
                .run(|_: Lease| async move {
                    let _ = started.send(());
                    std::future::pending::<Result<u64, String>>().await
                })
                .await
        };
        if how == "abort" {
            let task = tokio::spawn(run);
            is_started.await?;
            task.abort();
            assert!(task.await.expect_err("aborted").is_cancelled());
        } else {
            let timed =
                tokio::spawn(
                    async move { tokio::time::timeout(Duration::from_millis(50), run).await },
                );
            is_started.await?;
            assert!(timed.await?.is_err(), "the timeout fired");
        }
        eventually("the claim is given back", || async {
            s.get(&key).await.expect("read").is_none()
        })
        .await;
        let record = s.get_record(&key).await?.expect("remembered");
        assert_eq!(record.state, State::Pending, "{how}: not marked done");
        let retried = run_again(s, &key).await?;
        assert!(matches!(retried, Outcome::Ran(2)), "{how}: {retried:?}");
    }
    Ok(())
}

/// A handler that runs for three ttls keeps its lease by the heartbeat:
/// another worker's claim finds it in progress all along, and its result
/// is recorded.
async fn the_heartbeat_keeps_a_slow_handlers_lease<E: Engine>(
    s: &Store<E>,
    clock: &ManualClock,
) -> TestResult {
    let ttl = Duration::from_secs(1);
    let key = id(15);
    let (store, k) = (s.clone(), key.clone());
    let clock = clock.clone();
    let slow = move |_: Lease| async move {
        let key = k;
        for _ in 0..6 {
            // Let 600 ms pass (3.6 s in all, over three ttls), then wait
            // for a beat to extend the lease from the new time.
            clock.advance(Duration::from_millis(600));
            let due = clock.now() + 1_000;
            eventually("a heartbeat extends the lease", || async {
                matches!(stored_state(&store, &key).await, Some((State::Pending, e)) if e >= due)
            })
            .await;
            let other = store.claim(&key, ttl).await.expect("claim");
            assert!(
                matches!(other, ClaimResult::InProgress { .. }),
                "another worker finds it in progress: {other:?}"
            );
        }
        Ok::<String, String>("slow and done".into())
    };
    let outcome = s
        .once(&key, ttl)
        .heartbeat(Duration::from_millis(5), ttl)
        .run(slow)
        .await?;
    assert!(
        matches!(&outcome, Outcome::Ran(v) if v == "slow and done"),
        "{outcome:?}"
    );
    Ok(())
}

/// A handler whose lease is taken over while it runs (no heartbeat, or
/// one that cannot reach the store in time) does not complete the new
/// holder's claim: its result is not recorded, and the outcome says so.
async fn a_lost_lease_records_nothing<E: Engine>(s: &Store<E>, clock: &ManualClock) -> TestResult {
    for (n, heartbeat) in [(16, false), (17, true)] {
        let key = id(n);
        let (store, k) = (s.clone(), key.clone());
        let clock = clock.clone();
        let taken_over = Arc::new(std::sync::Mutex::new(None));
        let taken = taken_over.clone();
        let overrun = move |_: Lease| async move {
            let key = k;
            clock.advance(TTL + Duration::from_secs(1));
            let ClaimResult::Acquired(other) = store.claim(&key, TTL).await.expect("claim") else {
                panic!("an expired claim is taken over")
            };
            *taken.lock().expect("lock") = Some(other);
            // Give a heartbeat time to notice, if there is one.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<u32, String>(1)
        };
        let once = s.once(&key, TTL);
        let once = if heartbeat {
            once.heartbeat(Duration::from_millis(2), TTL)
        } else {
            once.without_heartbeat()
        };
        let outcome = once.run(overrun).await?;
        assert!(
            matches!(outcome, Outcome::LeaseLost { result: Ok(1) }),
            "heartbeat {heartbeat}: {outcome:?}"
        );
        let other = taken_over.lock().expect("lock").take().expect("taken over");
        let record = s.get(&key).await?.expect("the other claim");
        assert_eq!(
            (record.state, record.token),
            (State::Pending, other.token()),
            "the other worker's claim is untouched"
        );
    }
    Ok(())
}

/// 64 callers on one key: the handler runs exactly once, and every other
/// caller, waiting, gets its value replayed.
async fn sixty_four_callers_run_the_handler_once<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let runs = Runs::default();
    let key = id(18);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (store, key) = (s.clone(), key.clone());
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            store
                .once(&key, TTL)
                .wait(Duration::from_secs(60))
                .poll_interval(Duration::from_millis(2))
                .run(|lease: Lease| async move {
                    runs.hit();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<u64, String>(lease.token())
                })
                .await
        }));
    }
    let (mut ran, mut replayed) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await?? {
            Outcome::Ran(token) => ran.push(token),
            Outcome::Replayed(token) => replayed.push(token),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(runs.count(), 1, "the handler ran exactly once");
    assert_eq!(ran.len(), 1);
    assert_eq!(replayed.len(), 63);
    assert!(
        replayed.iter().all(|t| *t == ran[0]),
        "every caller got its value"
    );
    Ok(())
}

/// A heartbeat that cannot keep a lease is refused before anything runs.
async fn a_useless_heartbeat_is_refused<E: Engine>(s: &Store<E>, _: &ManualClock) -> TestResult {
    let runs = Runs::default();
    for (every, ttl) in [(Duration::ZERO, TTL), (TTL, TTL)] {
        let err = s
            .once(&id(19), TTL)
            .heartbeat(every, ttl)
            .run(token_of(&runs))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }
    let err = s
        .once(&id(19), TTL)
        .heartbeat(Duration::from_micros(200), Duration::from_micros(500))
        .run(token_of(&runs))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "under 1 ms: {err}");
    assert_eq!(runs.count(), 0);
    assert!(s.get_record(&id(19)).await?.is_none(), "nothing claimed");
    // The default heartbeat never refuses a ttl: none under 3 ms, and a
    // zero ttl is the claim's own error.
    let ran = s
        .once(&id(23), Duration::from_millis(1))
        .run(token_of(&runs))
        .await?;
    assert!(matches!(ran, Outcome::Ran(_)), "{ran:?}");
    let err = s
        .once(&id(24), Duration::ZERO)
        .run(token_of(&runs))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TtlTooShort { .. }), "{err}");
    Ok(())
}

/// `keep_result_for`: the lease runs for the claim's ttl while the
/// handler runs, and the outcome is kept for the retention.
async fn a_result_is_kept_for_its_retention<E: Engine>(
    s: &Store<E>,
    clock: &ManualClock,
) -> TestResult {
    let day = Duration::from_secs(86_400);
    let key = id(21);
    let (store, k, now) = (s.clone(), key.clone(), clock.now());
    let handler = move |lease: Lease| async move {
        let record = store.get(&k).await.expect("read").expect("claimed");
        assert_eq!(
            record.expires_at,
            now + 30_000,
            "the lease is the claim's ttl"
        );
        assert_eq!(lease.expires_at(), now + 30_000);
        Ok::<u8, String>(1)
    };
    let ran = s.once(&key, TTL).keep_result_for(day).run(handler).await?;
    assert!(matches!(ran, Outcome::Ran(1)), "{ran:?}");
    let record = s.get(&key).await?.expect("done");
    assert_eq!(
        record.expires_at,
        now + 86_400_000,
        "kept for the retention"
    );
    clock.advance(day - Duration::from_secs(1));
    let again = s
        .once(&key, TTL)
        .run(|_: Lease| async { Ok::<u8, String>(9) })
        .await?;
    assert!(
        matches!(again, Outcome::Replayed(1)),
        "still kept: {again:?}"
    );
    let err = s
        .once(&id(22), TTL)
        .keep_result_for(Duration::from_secs(1))
        .run(token_of(&Runs::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    Ok(())
}

/// Polls a future `n` times (while it is pending), then drops it: a
/// cancellation at its n-th await point.
struct DropAfter<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
    left: usize,
}

impl<F: Future> Future for DropAfter<F> {
    type Output = bool;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<bool> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(false);
        };
        if inner.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(true);
        }
        self.left -= 1;
        if self.left == 0 {
            self.inner = None;
            return std::task::Poll::Ready(false);
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// A run dropped at any await point — while its claim is written, while
/// its lease is cut back (`keep_result_for`), while the handler runs —
/// leaves no claim behind: a redelivery soon runs the handler. (Before the
/// claim ran on its own task, a drop during the claim's write left the key
/// held for the whole ttl, or the whole retention.)
async fn a_run_dropped_at_any_await_leaves_no_claim<E: Engine>(
    s: &Store<E>,
    _: &ManualClock,
) -> TestResult {
    let mut n = 100;
    for retention in [None, Some(Duration::from_secs(86_400))] {
        for polls in 1..=6 {
            n += 1;
            let key = id(n);
            let once = s.once(&key, TTL);
            let once = match retention {
                Some(retention) => once.keep_result_for(retention),
                None => once,
            };
            let run = once.run(|_: Lease| std::future::pending::<Result<u8, String>>());
            let finished = DropAfter {
                inner: Some(Box::pin(run)),
                left: polls,
            }
            .await;
            assert!(!finished);
            let started = Instant::now();
            loop {
                let again = s
                    .once(&key, TTL)
                    .run(|_: Lease| async { Ok::<u8, String>(1) })
                    .await?;
                match again {
                    Outcome::Ran(1) => break,
                    Outcome::InProgress { .. } => {}
                    other => panic!("dropped after {polls} polls: {other:?}"),
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "dropped after {polls} polls ({retention:?}): the key stays claimed"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    Ok(())
}

macro_rules! contracts {
    ($($contract:ident),* $(,)?) => {
        mod sled_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    let clock = super::ManualClock::new(super::T0);
                    let dir = tempfile::tempdir()?;
                    let store = super::SledIdempotencyStore::builder(dir.path().join("db"))
                        .clock(clock.clone())
                        .open()
                        .await?;
                    super::$contract(&store, &clock).await?;
                    store.close().await?;
                    Ok(())
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    if !super::redis_server::available() {
                        return Ok(());
                    }
                    let server = super::redis_server::Server::start();
                    let clock = super::ManualClock::new(super::T0);
                    let store = super::redis_server::flush_store(server.url(), Some(&clock)).await?;
                    super::$contract(&store, &clock).await?;
                    Ok(())
                }
            )*
        }
    };
}

contracts!(
    a_new_key_runs_and_duplicates_replay,
    a_done_record_that_cannot_be_replayed_is_an_error,
    in_flight_elsewhere_answers_or_waits,
    a_handler_error_gives_the_claim_back,
    final_errors_are_recorded,
    max_attempts_poisons,
    a_different_fingerprint_conflicts,
    a_panic_gives_the_claim_back,
    a_dropped_run_gives_the_claim_back,
    the_heartbeat_keeps_a_slow_handlers_lease,
    a_lost_lease_records_nothing,
    sixty_four_callers_run_the_handler_once,
    a_useless_heartbeat_is_refused,
    a_result_is_kept_for_its_retention,
    a_run_dropped_at_any_await_leaves_no_claim,
);

/// A run is `Send` whenever the handler's future, value and error are, so
/// that it can be spawned: the value is serialized before any wait, never
/// borrowed across one (a value that is not `Sync` once made the run's
/// future not `Send`).
#[tokio::test]
async fn a_run_can_be_spawned_with_a_value_that_is_not_sync() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
    let spawned = store.clone();
    let ran = tokio::spawn(async move {
        spawned
            .once(&id(30), TTL)
            .run(|_: Lease| async { Ok::<_, String>(std::cell::Cell::new(7_u32)) })
            .await
    })
    .await??;
    assert!(matches!(ran, Outcome::Ran(ref v) if v.get() == 7));
    store.close().await?;
    Ok(())
}

/// A value over `max_result_size` still completes the key (running the
/// handler again would repeat its effects); a duplicate then gets a clear
/// error instead of a replay.
#[tokio::test]
async fn a_value_too_large_to_cache_completes_without_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SledIdempotencyStore::builder(dir.path().join("db"))
        .max_result_size(16)
        .open()
        .await?;
    let key = id(20);
    let big = |_: Lease| async { Ok::<String, String>("x".repeat(100)) };
    let ran = store.once(&key, TTL).run(big).await?;
    assert!(matches!(ran, Outcome::Ran(ref v) if v.len() == 100));
    assert_eq!(store.get(&key).await?.map(|r| r.state), Some(State::Done));
    let err = store.once(&key, TTL).run(big).await.unwrap_err();
    assert!(matches!(err, Error::NoCachedResult { .. }), "{err}");
    store.close().await?;
    Ok(())
}
