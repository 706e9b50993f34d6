//! An I/O failure in the middle of a write (sled's `failpoints` feature)
//! surfaces as a clear error, never a panic, and after reopening the store
//! holds every operation acknowledged before the fault.
//!
//! sled's failpoint registry is process-wide, so the tests in this file take
//! one lock and run one at a time.

mod common;

use std::sync::Mutex;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome::*, Durability, Error, SledIdempotencyStore, State};

static FAILPOINTS: Mutex<()> = Mutex::new(());

/// Claims 0..n, completes the even ones.
async fn acknowledged(store: &SledIdempotencyStore, n: u128) -> TestResult {
    for k in 0..n {
        assert_eq!(store.try_claim(&id(k), TTL).await?, Claimed);
        if k % 2 == 0 {
            store.mark_done(&id(k)).await?;
        }
    }
    Ok(())
}

async fn assert_acknowledged(store: &SledIdempotencyStore, n: u128) -> TestResult {
    for k in 0..n {
        let expected = if k % 2 == 0 {
            AlreadyDone
        } else {
            AlreadyPending
        };
        assert_eq!(store.try_claim(&id(k), TTL).await?, expected, "key {k}");
    }
    Ok(())
}

/// What an acknowledged operation left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Pending,
    Done,
    Absent,
}

/// Arms `failpoint` with `bitset`, runs claim → done / release over fresh
/// keys until an operation fails, then checks the error, reopens, and
/// checks that every operation acknowledged before the fault is there.
async fn write_fails(durability: Durability, failpoint: &'static str, bitset: u64) -> TestResult {
    let fx = Fixture::new();
    let store = fx.open_with(durability).await?;
    acknowledged(&store, 20).await?;

    let mut expected: Vec<(u128, Expect)> = Vec::new();
    let mut failure = None;
    sled::fail::set(failpoint, bitset);
    'ops: for k in 100..400u128 {
        let steps: &[Expect] = match k % 3 {
            0 => &[Expect::Pending],
            1 => &[Expect::Pending, Expect::Done],
            _ => &[Expect::Pending, Expect::Absent],
        };
        for step in steps {
            let result = match step {
                Expect::Pending => store.try_claim(&id(k), TTL).await.map(|_| ()),
                Expect::Done => store.mark_done(&id(k)).await,
                Expect::Absent => store.release(&id(k)).await,
            };
            match result {
                Ok(()) => {
                    expected.retain(|(key, _)| *key != k);
                    expected.push((k, *step));
                }
                Err(err) => {
                    failure = Some((k, err));
                    break 'ops;
                }
            }
        }
    }
    sled::fail::reset();
    let (failed_key, err) = failure.ok_or("the failpoint never fired")?;
    assert!(
        matches!(err, Error::PreviousIo { .. } | Error::Storage { .. }),
        "unexpected error kind: {err}"
    );
    // The store latched: every later write fails at once with PreviousIo,
    // whatever the key, and so does `close`.
    for k in [999, 1000] {
        match store.try_claim(&id(k), TTL).await {
            Err(Error::PreviousIo { .. }) => {}
            other => return Err(format!("a claim after the fault returned {other:?}").into()),
        }
    }
    for result in [store.mark_done(&id(1)).await, store.release(&id(2)).await] {
        assert!(
            matches!(result, Err(Error::PreviousIo { .. })),
            "{result:?}"
        );
    }
    match store.close().await {
        Err(Error::PreviousIo { .. }) => {}
        other => return Err(format!("close after the fault returned {other:?}").into()),
    }
    drop(store);

    let store = fx.open_with(durability).await?;
    assert_acknowledged(&store, 20).await?;
    for (k, expect) in &expected {
        if *k == failed_key {
            continue; // its last, unacknowledged operation may or may not be there
        }
        let state = store.get_record(&id(*k)).await?.map(|r| r.state);
        let found = match state {
            None => Expect::Absent,
            Some(State::Pending) => Expect::Pending,
            Some(State::Done) => Expect::Done,
        };
        assert_eq!(found, *expect, "key {k}, acknowledged before the fault");
    }
    store.close().await?;
    Ok(())
}

/// Runs `scenario` on its own runtime while holding the failpoint lock.
fn serially(scenario: impl std::future::Future<Output = TestResult>) -> TestResult {
    let _serial = FAILPOINTS.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(scenario)
}

/// Every combination of failing log write (before or after the bytes are
/// written), which write fails (the 1st to the 6th after arming), and
/// durability mode.
#[test]
fn failed_log_writes_lose_nothing_acknowledged() -> TestResult {
    for durability in [Durability::Sync, Durability::Flush] {
        for failpoint in ["buffer write", "buffer write post"] {
            for nth in 0..6 {
                serially(write_fails(durability, failpoint, 1 << nth))
                    .map_err(|e| format!("{durability:?} {failpoint} #{nth}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// A failure while creating a database is an error, not a panic, and
/// leaves a directory that opens once the fault is gone.
#[test]
fn a_failure_while_creating_the_database_is_a_clean_error() -> TestResult {
    serially(async {
        let fx = Fixture::new();
        sled::fail::set("write_config bytes", 1);
        let result = fx.open().await;
        sled::fail::reset();
        let err = result.err().ok_or("the failpoint never fired")?;
        assert!(
            matches!(
                err,
                Error::Storage { .. } | Error::Io { .. } | Error::NotADatabase { .. }
            ),
            "{err}"
        );
        let store = match fx.open().await {
            Ok(store) => store,
            Err(Error::NotADatabase { .. }) => {
                // A half-written configuration is refused as unreadable; the
                // directory can be removed and created again.
                std::fs::remove_dir_all(fx.path())?;
                fx.open().await?
            }
            Err(other) => return Err(other.into()),
        };
        store.try_claim(&id(1), TTL).await?;
        store.close().await?;
        Ok(())
    })
}
