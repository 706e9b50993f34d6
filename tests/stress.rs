//! Concurrency stress: many tasks over a few keys with short leases while a
//! clock task keeps time moving. A checker records every acquired lease and
//! every completion; at no moment may two tasks hold live claims on one key,
//! a key that is live `Done` may never be claimed, and each key's tokens
//! strictly increase.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Fixture, TestResult, id};
use sled_idempotency::{ClaimResult, Durability, Error};

const KEYS: u64 = 4;
const TASKS: u64 = 16;
const ROUNDS: u64 = 300;
const DONE_RETENTION_MS: u64 = 25;

/// What the tasks saw, in clock time. A store call takes effect at some
/// moment between the clock readings taken just before and just after it,
/// so the checks only flag what is certain whatever that moment was (equal
/// readings are unordered: the clock has millisecond resolution).
/// Registration order is not store order (a task may be descheduled between
/// a call and its report), so the log is analysed once all tasks finished.
#[derive(Default)]
struct Log {
    /// (key, token, before, after): a lease acquired between `before` and
    /// `after`.
    claims: Vec<(u64, u64, u64, u64)>,
    /// (key, token, from, until): the key is certainly this token's from
    /// `from` (read after the claim or extension returned) until `until`
    /// (its expiry), unless let go earlier.
    holds: Vec<(u64, u64, u64, u64)>,
    /// token -> clock read just before its holder completed or abandoned.
    let_go: HashMap<u64, u64>,
    /// (key, token, from, until): the key is certainly done and live:
    /// completed no later than `from`, its done record living at least
    /// until `until`.
    done: Vec<(u64, u64, u64, u64)>,
}

impl Log {
    fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for &(key, token, before, after) in &self.claims {
            for &(k, holder, from, until) in &self.holds {
                let until = self
                    .let_go
                    .get(&holder)
                    .map_or(until, |&gone| until.min(gone));
                if k == key && holder != token && from < before && after < until {
                    out.push(format!(
                        "key {key}: token {token} claimed in [{before}, {after}] while token {holder} held it [{from}, {until})"
                    ));
                }
            }
            for &(k, completer, from, until) in &self.done {
                if k == key && completer != token && from < before && after < until {
                    out.push(format!(
                        "key {key}: token {token} claimed in [{before}, {after}] while done [{from}, {until})"
                    ));
                }
            }
            for &(k, other, other_before, other_after) in &self.claims {
                if k == key && other_after < before && other >= token {
                    out.push(format!(
                        "key {key}: token {token} claimed in [{before}, {after}] does not exceed token {other} claimed in [{other_before}, {other_after}]"
                    ));
                }
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_live_claims_and_no_claim_of_a_live_done_key() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_millis(50)))
        .done_retention(Duration::from_millis(DONE_RETENTION_MS))
        .open()
        .await?;
    let log = Arc::new(Mutex::new(Log::default()));
    let running = Arc::new(AtomicBool::new(true));
    let ticker = {
        let (clock, running) = (fx.clock.clone(), running.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                clock.advance(Duration::from_millis(1));
                tokio::task::yield_now().await;
            }
        })
    };
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, log, clock) = (store.clone(), log.clone(), fx.clock.clone());
            tokio::spawn(async move {
                let mut rng = task * 7919 + 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for _ in 0..ROUNDS {
                    let key = next() % KEYS;
                    let ttl_ms = 2 + next() % 12;
                    let before = clock.now();
                    let claimed = store
                        .claim(&id(key.into()), Duration::from_millis(ttl_ms))
                        .await?;
                    let after = clock.now();
                    let ClaimResult::Acquired(lease) = claimed else {
                        clock.advance(Duration::from_millis(1)); // waiting takes time
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let record = |f: &mut dyn FnMut(&mut Log)| {
                        log.lock().map(|mut l| f(&mut l)).map_err(|_| Error::Closed)
                    };
                    record(&mut |l| {
                        l.claims.push((key, lease.token(), before, after));
                        l.holds
                            .push((key, lease.token(), after, lease.expires_at()));
                    })?;
                    tokio::task::yield_now().await; // the "handler"
                    let lease = if next() % 3 == 0 {
                        match store.extend(&lease, Duration::from_millis(ttl_ms)).await {
                            Ok(extended) => {
                                let from = clock.now();
                                record(&mut |l| {
                                    l.holds.push((
                                        key,
                                        extended.token(),
                                        from,
                                        extended.expires_at(),
                                    ))
                                })?;
                                extended
                            }
                            Err(Error::LeaseLost { .. }) => continue, // taken over meanwhile
                            Err(e) => return Err(e),
                        }
                    } else {
                        lease
                    };
                    match next() % 4 {
                        0 | 1 => {
                            let before = clock.now();
                            record(&mut |l| {
                                l.let_go.insert(lease.token(), before);
                            })?;
                            match store.complete(&lease).await {
                                Ok(()) => {
                                    let after = clock.now();
                                    record(&mut |l| {
                                        l.done.push((
                                            key,
                                            lease.token(),
                                            after,
                                            before + DONE_RETENTION_MS,
                                        ))
                                    })?;
                                }
                                Err(Error::LeaseLost { .. }) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        2 => {
                            let before = clock.now();
                            record(&mut |l| {
                                l.let_go.insert(lease.token(), before);
                            })?;
                            match store.abandon(&lease).await {
                                Ok(()) | Err(Error::LeaseLost { .. }) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        _ => {} // stall: the lease runs out
                    }
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    running.store(false, Ordering::Relaxed);
    ticker.await?;
    let log = log.lock().map_err(|_| "poisoned")?;
    println!(
        "{} leases acquired, {} completed, over {KEYS} keys by {TASKS} tasks; clock moved {} ms",
        log.claims.len(),
        log.done.len(),
        fx.clock.now() - common::T0
    );
    let violations = log.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        log.claims.len() as u64 > KEYS * 50,
        "the stress acquired too few leases to mean much"
    );
    assert!(!log.done.is_empty());
    Ok(())
}
