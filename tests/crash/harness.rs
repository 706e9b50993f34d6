//! The crash harness shared by `tests/crash.rs` (SIGKILL) and
//! `tests/powerloss.rs` (power cuts on a FUSE file system): the child
//! workload, the parser of its output, and the check of every acknowledged
//! operation against the reopened database.
//!
//! The test binary re-runs itself as a child process (the ignored test
//! `harness::crash_child`) that runs a real workload: eight tasks claiming
//! leases over a key space, then completing, abandoning or keeping them. The
//! child prints every operation it is about to attempt (`intent`) and every
//! one the store acknowledged (`ack`), each tagged with its task.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{TestResult, copy_dir, id};
use sled_idempotency::{ClaimResult, Durability, ManualClock, Record, SledIdempotencyStore, State};

/// Keys the workload draws from: large enough that a run does not exhaust
/// them, small enough that tasks collide (a key abandoned by one task is
/// claimed by another).
pub const KEYS: u64 = 1 << 16;
pub const TASKS: u64 = 8;
pub const LEASE_TTL: Duration = Duration::from_secs(3600);
const CHILD_ENV: &str = "SLED_IDEMPOTENCY_CRASH_CHILD";
/// The child's test name, as libtest runs and prints it.
const CHILD_TEST: &str = "harness::crash_child";

/// Deterministic pseudo-random numbers (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the environment variable `var`, or from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn parse_durability(text: &str) -> Durability {
    match text {
        "sync" => Durability::Sync,
        "flush" => Durability::Flush,
        // One claim, then nothing is flushed before the kill.
        "one-claim" => Durability::Periodic(Duration::from_secs(3600)),
        _ => Durability::Periodic(Duration::from_millis(20)),
    }
}

/// The child: runs the workload until it is killed.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn crash_child() -> TestResult {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(()); // run by hand without the parent: nothing to do
    };
    let mut parts = spec.splitn(3, ';');
    let (mode, seed, path) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().parse::<u64>()?,
        parts.next().unwrap_or_default().to_owned(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = SledIdempotencyStore::builder(&path)
            .durability(parse_durability(&mode))
            .open()
            .await?;
        if mode == "one-claim" {
            if let ClaimResult::Acquired(lease) = store.claim(&id(1), LEASE_TTL).await? {
                println!("ack 0 claim 1 {}", lease.token());
            }
            println!("ready");
            std::future::pending::<()>().await;
        }
        println!("ready");
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut rng = Rng(seed ^ (task + 1).wrapping_mul(0x1234_5678_9ABC));
                    loop {
                        let key = rng.next() % KEYS;
                        let ClaimResult::Acquired(lease) =
                            store.claim(&id(key.into()), LEASE_TTL).await?
                        else {
                            continue;
                        };
                        let token = lease.token();
                        println!("ack {task} claim {key} {token}");
                        match rng.next() % 10 {
                            0..5 => {
                                println!("intent {task} complete {key} {token}");
                                store.complete(&lease).await?;
                                println!("ack {task} complete {key} {token}");
                            }
                            5..8 => {
                                println!("intent {task} abandon {key} {token}");
                                store.abandon(&lease).await?;
                                println!("ack {task} abandon {key} {token}");
                            }
                            _ => {} // left pending, as a crashed handler would
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<_, sled_idempotency::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Claim,
    Complete,
    Abandon,
}

#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub ack: bool,
    pub task: u64,
    pub kind: Kind,
    pub key: u64,
    pub token: u64,
}

pub fn parse(line: &str) -> Option<Line> {
    // libtest prints "test harness::crash_child ... " before the child's
    // first line.
    let line = line
        .strip_prefix("test ")
        .and_then(|l| l.strip_prefix(CHILD_TEST))
        .and_then(|l| l.strip_prefix(" ... "))
        .unwrap_or(line);
    let mut words = line.split_whitespace();
    let ack = match words.next()? {
        "ack" => true,
        "intent" => false,
        _ => return None,
    };
    let task = words.next()?.parse().ok()?;
    let kind = match words.next()? {
        "claim" => Kind::Claim,
        "complete" => Kind::Complete,
        "abandon" => Kind::Abandon,
        _ => return None,
    };
    let key = words.next()?.parse().ok()?;
    let token = words.next()?.parse().ok()?;
    // A line cut by the kill has no newline; the reader only sees whole lines.
    Some(Line {
        ack,
        task,
        kind,
        key,
        token,
    })
}

/// When the parent kills the child.
#[derive(Debug, Clone, Copy)]
pub enum KillAt {
    /// This long after the child printed `ready` (its store is open); a
    /// child that never gets ready is an error.
    AfterReady(Duration),
    /// This long after it was started, ready or not: a kill while the
    /// store may still be opening (creating or recovering the database).
    AfterSpawn(Duration),
}

/// Runs one child until killed; returns its whole output lines.
pub fn run_child(mode: &str, seed: u64, path: &Path, at: KillAt) -> Result<Vec<String>, String> {
    run_child_timed(mode, seed, path, at).map(|(lines, _)| lines)
}

/// Like `run_child`, also returning how long after its start the child
/// was ready, if it got there.
/// Held while a child is spawned: between `fork` and `exec` the child holds
/// copies of every file this process has open, on any mount, and a power
/// cut that unmounts a test file system meanwhile would fail with EBUSY.
/// The power-loss file system takes it around its unmount.
pub static SPAWNING: Mutex<()> = Mutex::new(());

pub fn run_child_timed(
    mode: &str,
    seed: u64,
    path: &Path,
    at: KillAt,
) -> Result<(Vec<String>, Option<Duration>), String> {
    let started = std::time::Instant::now();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(exe)
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{mode};{seed};{}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning the child: {e}"))?;
    drop(spawning);
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints "test harness::crash_child ... " on the
                // same line.
                if line.ends_with("ready") {
                    let _ = ready_tx.send(started.elapsed());
                }
                lines.lock().map(|mut l| l.push(line)).ok();
            }
        })
    };
    let mut ready_after = None;
    let ready = match at {
        KillAt::AfterReady(delay) => {
            let ready = ready_rx.recv_timeout(Duration::from_secs(120));
            if let Ok(after) = ready {
                ready_after = Some(after);
                std::thread::sleep(delay);
            }
            ready
                .map(|_| ())
                .map_err(|_| "the child never became ready".to_owned())
        }
        KillAt::AfterSpawn(delay) => {
            std::thread::sleep(delay);
            Ok(())
        }
    };
    child
        .kill()
        .map_err(|e| format!("killing the child: {e}"))?;
    let _ = child.wait();
    let _ = reader.join();
    ready?;
    let lines = lines.lock().map_err(|_| "poisoned")?.clone();
    Ok((lines, ready_after.or_else(|| ready_rx.try_iter().next())))
}

/// What the recovered record says about one acknowledged operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// The operation's effect is there (or superseded by a later claim).
    Survived,
    /// Consistent with the effect being there or not (an abandon whose
    /// removal cannot be told from a lost claim).
    Unknown,
    /// The effect is missing.
    Lost,
}

pub fn fate(line: &Line, record: Option<&Record>, abandon_attempted: bool) -> Fate {
    let token = record.map(|r| r.token);
    match (line.kind, record) {
        (_, Some(r)) if r.token > line.token => Fate::Survived, // re-claimed after this lease ended
        (Kind::Claim, Some(r)) if r.token == line.token => Fate::Survived,
        (Kind::Complete, Some(r)) if r.token == line.token && r.state == State::Done => {
            Fate::Survived
        }
        (Kind::Abandon, _) if token != Some(line.token) => Fate::Unknown,
        (Kind::Claim, _) if abandon_attempted && token != Some(line.token) => Fate::Unknown,
        _ => Fate::Lost,
    }
}

/// What `verify` accepts.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A lost acknowledged operation is an error.
    pub lossless: bool,
    /// A task whose surviving operations follow a lost one is an error
    /// (sled recovers a prefix of its log).
    pub prefix: bool,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verified {
    /// Acknowledged operations checked.
    pub checked: usize,
    /// Acknowledged operations whose effect is missing.
    pub lost: usize,
    /// Tasks that kept an operation after losing an earlier one.
    pub not_prefix: usize,
    /// Token of the probe claim made after reopening (acknowledged to the
    /// parent, so it counts as issued).
    pub probe_token: u64,
}

/// What kind of check `verify` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The database did not open.
    Unopenable,
    /// It opened, but records do not decode.
    Damaged,
    /// An acknowledged operation was lost (with `Policy::lossless`).
    Lost,
    /// A task kept an operation after losing an earlier one (with
    /// `Policy::prefix`).
    NotPrefix,
    /// The next token is not above every token seen before.
    Token,
    /// A record is left after a sweep at a time when every record is
    /// forgotten: the expiry index lost it.
    Escaped,
    /// Reading, claiming or closing failed.
    Store,
}

/// A failed check of `verify`.
#[derive(Debug)]
pub struct Failure {
    pub problem: Problem,
    pub message: String,
    /// What was counted before the check failed (the acknowledged
    /// operations when only the token check failed).
    pub verified: Verified,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failure(problem: Problem) -> impl Fn(String) -> Failure {
    move |message| Failure {
        problem,
        message,
        verified: Verified::default(),
    }
}

/// Checks one run's acknowledgements against the reopened database.
pub async fn verify(
    mode: &str,
    policy: Policy,
    path: &Path,
    lines: &[String],
    max_token_seen: &mut u64,
) -> Result<Verified, Failure> {
    let parsed: Vec<Line> = lines.iter().filter_map(|l| parse(l)).collect();
    let abandons: HashSet<(u64, u64)> = parsed
        .iter()
        .filter(|l| l.kind == Kind::Abandon)
        .map(|l| (l.key, l.token))
        .collect();
    let store = SledIdempotencyStore::builder(path)
        .durability(Durability::Sync)
        .open()
        .await
        .map_err(|e| format!("the database did not reopen: {e}"))
        .map_err(failure(Problem::Unopenable))?;
    // Every record decodes: the sweeper reads them all and counts corrupt ones.
    let report = store
        .sweep_expired()
        .await
        .map_err(|e| format!("sweep after reopen: {e}"))
        .map_err(failure(Problem::Damaged))?;
    if report.corrupt != 0 {
        return Err(failure(Problem::Damaged)(format!(
            "{mode}: {} corrupted records after the crash",
            report.corrupt
        )));
    }
    let mut records: HashMap<u64, Option<Record>> = HashMap::new();
    for key in parsed.iter().map(|l| l.key) {
        if records.contains_key(&key) {
            continue;
        }
        let record = store
            .get_record(&id(key.into()))
            .await
            .map_err(|e| format!("key {key} does not decode after the crash: {e}"))
            .map_err(failure(Problem::Damaged))?;
        records.insert(key, record);
    }
    for (_, r) in store
        .list(None, None, usize::MAX)
        .await
        .map_err(|e| failure(Problem::Damaged)(e.to_string()))?
    {
        *max_token_seen = (*max_token_seen).max(r.token);
    }
    let mut by_task: BTreeMap<u64, Vec<(Line, Fate)>> = BTreeMap::new();
    let mut verified = Verified::default();
    for line in parsed.iter().filter(|l| l.ack) {
        *max_token_seen = (*max_token_seen).max(line.token);
        let record = records.get(&line.key).and_then(Option::as_ref);
        let fate = fate(line, record, abandons.contains(&(line.key, line.token)));
        if fate == Fate::Lost {
            if policy.lossless {
                return Err(failure(Problem::Lost)(format!(
                    "{mode}: acknowledged {line:?} was lost; the key holds {record:?}"
                )));
            }
            verified.lost += 1;
        }
        by_task.entry(line.task).or_default().push((*line, fate));
        verified.checked += 1;
    }
    for (task, ops) in &by_task {
        if let Some(first_lost) = ops.iter().position(|(_, f)| *f == Fate::Lost)
            && let Some((later, _)) = ops[first_lost..].iter().find(|(_, f)| *f == Fate::Survived)
        {
            if policy.prefix {
                return Err(failure(Problem::NotPrefix)(format!(
                    "{mode}: task {task} lost {:?} but kept the later {later:?}: not a prefix",
                    ops[first_lost].0
                )));
            }
            verified.not_prefix += 1;
        }
    }
    // The next token exceeds every token seen before the kill.
    let probe = id(u128::from(KEYS) + 1_000_000 + u128::from(*max_token_seen));
    match store
        .claim(&probe, LEASE_TTL)
        .await
        .map_err(|e| failure(Problem::Store)(e.to_string()))?
    {
        ClaimResult::Acquired(lease) if lease.token() > *max_token_seen => {
            *max_token_seen = lease.token();
            verified.probe_token = lease.token();
            store
                .abandon(&lease)
                .await
                .map_err(|e| failure(Problem::Store)(e.to_string()))?;
        }
        other => {
            return Err(Failure {
                verified,
                ..failure(Problem::Token)(format!(
                    "{mode}: token after reopen not above {max_token_seen}: {other:?}"
                ))
            });
        }
    }
    store
        .close()
        .await
        .map_err(|e| failure(Problem::Store)(e.to_string()))?;
    if let Err(e) = no_record_escapes(mode, path).await {
        return Err(Failure { verified, ..e });
    }
    Ok(verified)
}

/// Reopens a copy of the database a year ahead, when every record is
/// forgotten, and sweeps once: every record must go. The open above
/// followed a crash, so its first sweep read every record (the backstop)
/// and its close wrote a complete index: this sweep finds records through
/// the index alone. And the next crash run opens a database whose index
/// was complete: its open must make the marker's removal durable before
/// its writes, or the next verification would trust an index that misses
/// them. (A copy, so that the next run meets the records of this one.)
async fn no_record_escapes(mode: &str, original: &Path) -> Result<(), Failure> {
    let copy = tempfile::tempdir()
        .map_err(|e| failure(Problem::Store)(format!("a directory for the copy: {e}")))?;
    let path = &copy.path().join("db");
    copy_dir(original, path)
        .map_err(|e| failure(Problem::Store)(format!("copying the database: {e}")))?;
    let year = 365 * 24 * 3_600_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let store = SledIdempotencyStore::builder(path)
        .durability(Durability::Sync)
        .clock(ManualClock::new(now + year))
        .open()
        .await
        .map_err(|e| failure(Problem::Store)(format!("reopening a year ahead: {e}")))?;
    let swept = store
        .sweep_expired()
        .await
        .map_err(|e| failure(Problem::Store)(e.to_string()))?;
    let left = store
        .admin()
        .census()
        .await
        .map_err(|e| failure(Problem::Store)(e.to_string()))?;
    store
        .close()
        .await
        .map_err(|e| failure(Problem::Store)(e.to_string()))?;
    let left = left.live_pending + left.live_done + left.expired + left.corrupt;
    if left != 0 {
        return Err(failure(Problem::Escaped)(format!(
            "{mode}: {left} records left after a sweep a year ahead (it removed {})",
            swept.removed
        )));
    }
    Ok(())
}
