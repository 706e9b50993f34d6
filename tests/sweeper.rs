//! The sweeper removes forgotten records only (expired done records, and
//! pending claims past their expiry plus the pending retention), never a
//! record re-claimed while it runs, runs on its own period, and stops when
//! the store is closed or dropped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, TTL, TestResult, forget_expiry_index, id};
use sled_idempotency::{ClaimOutcome, ClaimResult, DEFAULT_PENDING_RETENTION, Durability, Error};

#[tokio::test]
async fn sweep_removes_expired_records_only() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    // Short-lived: pending 0..10, done 10..20. Long-lived: pending 20..30, done 30..40.
    let short = Duration::from_secs(10);
    let long = Duration::from_secs(100);
    for n in 0..40 {
        store
            .try_claim(&id(n), if n < 20 { short } else { long })
            .await?;
    }
    for n in (10..20).chain(30..40) {
        store.mark_done(&id(n)).await?;
    }
    // Nothing is due: the sweep reads no record at all.
    let nothing = store.sweep_expired().await?;
    assert_eq!((nothing.examined, nothing.removed), (0, 0));

    // The short done records are gone; the short pending claims expired
    // but are remembered (attempts, token) for the pending retention. The
    // sweep reads the notes due now, not the forty records stored: the ten
    // done records it removes, the ten expired claims (noted again for the
    // moment they are forgotten) and the ten claims that were marked done
    // (their notes go).
    fx.advance(Duration::from_secs(10));
    let report = store.sweep_expired().await?;
    assert_eq!(
        (report.examined, report.removed, report.corrupt),
        (30, 10, 0)
    );
    assert_eq!(
        store.admin().expiry_index().await?.notes,
        40,
        "the ten expired claims noted again, the ten long claims, and two notes \
         for each long-lived done record (its claim's and its own, both due at 100 s)"
    );
    for n in 10..20 {
        assert!(store.get_record(&id(n)).await?.is_none(), "key {n} expired");
    }
    for n in (0..10).chain(20..40) {
        assert!(store.get_record(&id(n)).await?.is_some(), "key {n} is kept");
    }
    assert_eq!(
        store.try_claim(&id(25), TTL).await?,
        ClaimOutcome::AlreadyPending
    );
    assert_eq!(
        store.try_claim(&id(35), TTL).await?,
        ClaimOutcome::AlreadyDone
    );
    // A day on, the long done records have expired and go; the expired
    // claims go only once their retention has passed too.
    fx.advance(DEFAULT_PENDING_RETENTION - Duration::from_millis(1));
    let report = store.sweep_expired().await?;
    assert_eq!(
        report.removed, 10,
        "only the long done records; claims remembered"
    );
    fx.advance(Duration::from_millis(1));
    assert_eq!(store.sweep_expired().await?.removed, 10);
    for n in 0..10 {
        assert!(
            store.get_record(&id(n)).await?.is_none(),
            "key {n} forgotten"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sweep_walks_every_batch() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .sweep_batch(7)
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    for n in 0..100 {
        store
            .try_claim(&id(n), if n % 2 == 0 { TTL } else { TTL * 2 })
            .await?;
    }
    fx.advance(TTL);
    let report = store.sweep_expired().await?;
    assert_eq!((report.examined, report.removed), (50, 50));
    assert_eq!(
        store.sweep_expired().await?.examined,
        0,
        "nothing more is due"
    );
    fx.advance(TTL);
    assert_eq!(store.sweep_expired().await?.removed, 50);
    assert_eq!(store.sweep_expired().await?.examined, 0);
    Ok(())
}

/// Under `Periodic` with a long period, notes would pile up in memory
/// until the next flush: once 16,384 wait, the flusher is asked to run
/// early (never the claiming task itself), and the flush writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_notes_bring_the_periodic_flush_forward() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .open()
        .await?;
    let before = store.stats().await?.flushes;
    for n in 0..16_384 {
        store.try_claim(&id(n), TTL).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.stats().await?.flushes == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush within a minute"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.close().await?;
    Ok(())
}

/// After a crash the index may lack the notes of the last writes: the
/// first sweep reads every record once, batch by batch, removes what is
/// forgotten and notes the rest, so that later sweeps find every record
/// again through the index alone.
#[tokio::test]
async fn the_first_sweep_after_a_crash_scans_everything_once() -> TestResult {
    let fx = Fixture::new();
    let open = || {
        fx.builder()
            .durability(Durability::Periodic(Duration::from_secs(3600)))
            .sweep_batch(7)
            .pending_retention(Duration::ZERO)
            .open()
    };
    let store = open().await?;
    for n in 0..100 {
        let ttl = [TTL, TTL * 2, TTL * 3][n as usize % 3];
        store.try_claim(&id(n), ttl).await?;
    }
    store.close().await?;
    forget_expiry_index(&fx.path())?;

    let store = open().await?;
    fx.advance(TTL);
    let first = store.sweep_expired().await?;
    assert_eq!(
        (first.examined, first.removed),
        (100, 34),
        "the full scan reads all 100 records, removes the 34 expired"
    );
    assert_eq!(
        store.sweep_expired().await?.examined,
        0,
        "scanned once only"
    );
    fx.advance(TTL);
    let second = store.sweep_expired().await?;
    assert_eq!(
        (second.examined, second.removed),
        (33, 33),
        "the scan noted the records it kept"
    );
    store.close().await?;

    // A clean close leaves a complete index: no scan after this open.
    let store = open().await?;
    fx.advance(TTL);
    assert_eq!(store.sweep_expired().await?.examined, 33);
    let stats = store.stats().await?;
    assert_eq!((stats.records_pending, stats.records_done), (0, 0));
    assert!(
        stats.records_exact,
        "counted again by the full scan after the crash: exact"
    );
    store.close().await?;
    Ok(())
}

/// Claimers race the sweeper over keys whose claims just expired. Whatever
/// the interleaving, every key a claimer won must still be there, pending,
/// after the sweep: the sweeper removes by compare-and-swap on the bytes it
/// read, so it cannot delete a claim made after its read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeping_never_removes_a_claim_made_while_it_runs() -> TestResult {
    const KEYS: u128 = 2_000;
    let fx = Fixture::new();
    let store = Arc::new(
        fx.builder()
            .durability(Durability::Periodic(Duration::from_secs(3600)))
            .sweep_batch(16)
            .open()
            .await?,
    );
    for round in 0..5u32 {
        for n in 0..KEYS {
            store.try_claim(&id(n), TTL).await?;
        }
        fx.advance(TTL); // every claim is now expired
        let sweeper = {
            let store = store.clone();
            tokio::spawn(async move { store.sweep_expired().await })
        };
        let claimers: Vec<_> = (0..4u128)
            .map(|part| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut won = Vec::new();
                    for n in (part..KEYS).step_by(4) {
                        if store.try_claim(&id(n), TTL).await? == ClaimOutcome::Claimed {
                            won.push(n);
                        }
                        if n % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    Ok::<_, sled_idempotency::Error>(won)
                })
            })
            .collect();
        let mut won = Vec::new();
        for claimer in claimers {
            won.extend(claimer.await??);
        }
        sweeper.await??;
        assert_eq!(
            won.len(),
            KEYS as usize,
            "round {round}: every expired key is claimable"
        );
        for n in won {
            let record = store.get_record(&id(n)).await?;
            let record = record
                .ok_or_else(|| format!("round {round}: the sweeper deleted fresh claim {n}"))?;
            assert!(record.is_live(fx.clock.now()), "round {round}: key {n}");
        }
    }
    Ok(())
}

/// With tokio's clock paused, sleeps complete in virtual time, in order.
/// `Periodic` durability keeps claims from waiting on the flusher thread,
/// which would let the paused clock jump ahead while they wait.
#[tokio::test(start_paused = true)]
async fn the_background_sweeper_runs_every_interval() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .sweep_interval(Duration::from_secs(10))
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    store.try_claim(&id(1), TTL).await?;
    fx.advance(TTL);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        store.get_record(&id(1)).await?.is_some(),
        "no sweep before the first interval"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        store.get_record(&id(1)).await?.is_none(),
        "swept at the first interval"
    );

    store.try_claim(&id(2), TTL).await?;
    fx.advance(TTL);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        store.get_record(&id(2)).await?.is_none(),
        "swept at the second interval"
    );
    Ok(())
}

/// Waits (bounded, in real time) until `done` holds.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) -> TestResult {
    for _ in 0..3_000 {
        if done().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("timed out waiting until {what}").into())
}

async fn sweeper_stops(close: bool) -> TestResult {
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let fx = Fixture::new();
    let before = tasks();
    let store = fx
        .builder()
        .sweep_interval(Duration::from_millis(20))
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    // The sweeper runs: an expired record disappears by itself.
    store.try_claim(&id(1), TTL).await?;
    fx.advance(TTL);
    let probe = store.clone();
    eventually("the sweeper removed the expired record", async || {
        matches!(probe.get_record(&id(1)).await, Ok(None))
    })
    .await?;
    drop(probe);
    eventually("only the sweeper is left", async || tasks() == before + 1).await?;
    if close {
        store.close().await?;
    } else {
        drop(store);
    }
    eventually("the sweeper task ended", async || tasks() == before).await?;
    // And the directory is free again.
    fx.open().await?.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_sweeper_stops_when_the_store_is_dropped() -> TestResult {
    sweeper_stops(false).await
}

#[tokio::test]
async fn the_sweeper_stops_when_the_store_is_closed() -> TestResult {
    sweeper_stops(true).await
}

/// Regression: an expired pending claim counted as held only until the
/// sweeper removed it. Before a sweep, completing the expired lease worked
/// and the next claim was attempt 2; after a sweep the same calls gave
/// `LeaseLost` and attempt 1, so the poison-message counter reset whenever
/// a sweep fell between two redeliveries (with the default 60 s interval,
/// almost always). Now the answers are the same either way.
#[tokio::test]
async fn regression_expired_claims_answer_the_same_whether_or_not_swept() -> TestResult {
    let mut answers = Vec::new();
    for sweep in [false, true] {
        let fx = Fixture::new();
        let store = fx.open().await?;
        let lease = |r: ClaimResult| r.lease().cloned().ok_or("not acquired");
        // A handler that died: its claim expires, a redelivery takes over.
        let first = lease(store.claim(&id(1), TTL).await?)?;
        fx.advance(TTL);
        if sweep {
            store.sweep_expired().await?;
        }
        let second = lease(store.claim(&id(1), TTL).await?)?;
        // A stalled handler finishing after its claim expired.
        let stalled = lease(store.claim(&id(2), TTL).await?)?;
        fx.advance(TTL);
        if sweep {
            store.sweep_expired().await?;
        }
        let late = store.complete(&stalled).await.is_ok();
        let lost = matches!(store.complete(&first).await, Err(Error::LeaseLost { .. }));
        answers.push((second.attempt(), late, lost));
    }
    assert_eq!(answers[0], (2, true, true), "without a sweep");
    assert_eq!(answers[1], answers[0], "a sweep changed the answers");
    Ok(())
}

/// Regression (a day of traffic): a claim was noted in the expiry index at
/// the moment it would be forgotten, its expiry plus `pending_retention`
/// (a day by default), and that note stayed after the claim was marked
/// done. A consumer completing every message kept one dead note per
/// message for a day, and a sweep a day later read them all. Now a
/// finished claim's note goes once its ttl has passed.
#[tokio::test]
async fn completed_claims_leave_no_notes_for_a_day() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .sweep_interval(Duration::from_secs(3600))
        .done_retention(Duration::from_secs(60))
        .open()
        .await?;
    for n in 0..1_000 {
        store.try_claim(&id(n), TTL).await?;
        store.mark_done(&id(n)).await?;
    }
    fx.advance(Duration::from_secs(61));
    assert_eq!(store.sweep_expired().await?.removed, 1_000);
    assert_eq!(
        store.admin().expiry_index().await?.notes,
        0,
        "nothing is left to sweep"
    );
    fx.advance(Duration::from_secs(86_400));
    let a_day_later = store.sweep_expired().await?;
    assert_eq!(
        a_day_later.examined, 0,
        "no note of a finished claim is left to read"
    );
    store.close().await?;
    Ok(())
}

/// Claims of `n` fresh keys from `base` that are never completed: each
/// expires after a second and is remembered for the pending retention.
async fn abandoned(
    store: &sled_idempotency::SledIdempotencyStore,
    base: u128,
    n: u128,
) -> TestResult {
    for k in base..base + n {
        store.try_claim(&id(k), Duration::from_secs(1)).await?;
    }
    Ok(())
}

/// A store swept only when asked, one note per first batch, so a test can
/// watch a sweep behind.
async fn one_batch_at_a_time(
    fx: &Fixture,
) -> Result<sled_idempotency::SledIdempotencyStore, Error> {
    fx.builder()
        .sweep_interval(Duration::from_secs(3600))
        .sweep_batch(1)
        .open()
        .await
}

/// `sweep_expired()` on a task of its own.
fn sweep_in_background(
    store: &sled_idempotency::SledIdempotencyStore,
) -> tokio::task::JoinHandle<Result<sled_idempotency::SweepReport, Error>> {
    let store = store.clone();
    tokio::spawn(async move { store.sweep_expired().await })
}

/// A sweep far behind on notes it cannot act on yet (claims expired but
/// remembered, noted again for when they are forgotten) removes nothing,
/// so nothing says writers outpace it: no claim is slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_behind_on_notes_it_cannot_act_on_slows_no_claim() -> TestResult {
    let fx = Fixture::new();
    let store = one_batch_at_a_time(&fx).await?;
    abandoned(&store, 0, 3_000).await?;
    // Three hours: more than two sweep intervals behind, within the
    // pending retention.
    fx.advance(Duration::from_secs(3 * 3600));
    let sweep = sweep_in_background(&store);
    let mut k = 1 << 40;
    while !sweep.is_finished() {
        store.try_claim(&id(k), TTL).await?;
        k += 1;
    }
    assert_eq!(sweep.await??.removed, 0);
    let stats = store.stats().await?;
    assert!(k > 1 << 40, "claims ran beside the sweep");
    assert_eq!(stats.claims_slowed, 0);
    store.close().await?;
    Ok(())
}

/// A `sweep_expired()` dropped while it is behind (a timeout around it)
/// lets claims go: none is slowed once it is gone, however fast they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sweep_slows_no_claim_after_it() -> TestResult {
    let fx = Fixture::new();
    let store = one_batch_at_a_time(&fx).await?;
    abandoned(&store, 0, 20_000).await?;
    // Forgotten, and a day behind.
    fx.advance(DEFAULT_PENDING_RETENTION + Duration::from_secs(2));
    let sweep = sweep_in_background(&store);
    // Batches of 64 (the most a sweep this far behind reads): past the
    // first, which only starts measuring the sweep's rate.
    while store.stats().await?.swept < 256 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!sweep.is_finished(), "the sweep is dropped half way");
    sweep.abort();
    assert!(sweep.await.is_err_and(|e| e.is_cancelled()));
    let slowed = store.stats().await?.claims_slowed;
    let claimers: Vec<_> = (0..64u128)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for k in 0..50 {
                    store.try_claim(&id((1 << 40) + t * 1_000 + k), TTL).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for claimer in claimers {
        claimer.await??;
    }
    assert_eq!(store.stats().await?.claims_slowed, slowed);
    store.close().await?;
    Ok(())
}

/// A clock that panics once, when armed, on any thread but the test's.
#[derive(Debug, Clone)]
struct PanicsOnce {
    clock: sled_idempotency::ManualClock,
    armed: Arc<std::sync::atomic::AtomicBool>,
    test: std::thread::ThreadId,
}

impl sled_idempotency::Clock for PanicsOnce {
    fn now_millis(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        if std::thread::current().id() != self.test && self.armed.swap(false, SeqCst) {
            panic!("a panic in a sweep batch");
        }
        self.clock.now_millis()
    }
}

/// A sweep batch that panics (sled panics on some damaged data) stops that
/// sweep only: the sweeper sweeps again at its next period.
#[tokio::test] // current thread: every claim reads the clock on the test's thread
async fn the_sweeper_outlives_a_panicking_batch() -> TestResult {
    let fx = Fixture::new();
    let clock = PanicsOnce {
        clock: fx.clock.clone(),
        armed: Arc::default(),
        test: std::thread::current().id(),
    };
    let store = sled_idempotency::SledIdempotencyStore::builder(fx.path())
        .clock(clock.clone())
        .durability(Durability::Periodic(Duration::from_millis(100)))
        .sweep_interval(Duration::from_millis(200))
        .open()
        .await?;
    abandoned(&store, 0, 100).await?;
    fx.advance(DEFAULT_PENDING_RETENTION + Duration::from_secs(2));
    clock.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.stats().await?.swept < 100 {
        assert!(std::time::Instant::now() < deadline, "the sweeper stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !clock.armed.load(std::sync::atomic::Ordering::SeqCst),
        "it panicked"
    );
    store.try_claim(&id(1 << 40), TTL).await?;
    store.close().await?;
    Ok(())
}
