//! Power loss, per durability mode, on a file system that forgets.
//!
//! `tests/crash.rs` kills the process; the kernel still holds every write.
//! Here the database lives on a test-only FUSE file system
//! (`tests/powerloss/fs.rs`, served by a thread of this process) that keeps,
//! for every file and directory, what was written and what was made durable
//! by `fsync`. A *cut* throws away everything not durable — unsynced file
//! pages, unsynced directory entries, files only such entries reached — and
//! remounts, as a power loss would. With the torn model, each unsynced page
//! keeps its old or its new bytes at random.
//!
//! Each cut runs the crash harness's child workload (`tests/crash/harness.rs`)
//! on a database in the mount, kills it with SIGKILL at a seeded random
//! moment (while still opening, 0–5 ms after it is ready, or later; fresh
//! databases often), cuts, reopens the database in this process, and checks
//! every acknowledged operation as `tests/crash.rs` does. What it proves:
//!
//! - `Sync`: nothing acknowledged is lost, under clean and under torn cuts,
//!   and the database always reopens.
//! - `Flush` and `Periodic` do lose acknowledged writes under power loss
//!   (the negative control: a pass in which they lose nothing fails, since
//!   then the file system is not dropping data); their losses and any
//!   database that no longer opens are counted, not failures.
//! - Every mode: no fencing token is acknowledged for two claims (checked
//!   over all cuts of one database, the reopen's probe claims included).
//! - An `fsync` failing with EIO latches the store (docs/durability.md, "After an I/O failure"): the write that
//!   waited on it fails, every later mutating call fails at once with one
//!   error, `close()` returns it, and what was acknowledged before is there
//!   after a cut.
//! - sled's lock holds on this file system: a second open is `Locked`.
//!
//! It needs root and `/dev/fuse` (fuser mounts with mount(2), no libfuse and
//! no `fusermount`). Without them it is skipped with a message, except
//! under `CI=true`, where that is a failure.
//!
//! A short pass runs with `cargo test`. The long pass:
//!
//! ```text
//! POWERLOSS_CUTS=1000 cargo test --release --test powerloss -- --nocapture --test-threads=1
//! ```
//!
//! `POWERLOSS_CUTS` is the number of cuts per mode and model;
//! `POWERLOSS_SEED=<seed>` repeats a run (each test prints its seed).

mod common;
#[path = "powerloss/fs.rs"]
mod fs;
#[path = "crash/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestResult, id};
use fs::{CutReport, Fault, Model, PowerLossFs};
use harness::{
    Failure, KillAt, LEASE_TTL, Policy, Problem, Rng, Verified, parse, run_child_timed,
    seed_from_env, verify,
};
use sled_idempotency::{ClaimResult, Durability, Lease, SledIdempotencyStore, State};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Cuts on one database at most before a fresh one.
const CUTS_PER_DATABASE: u64 = 12;

/// Cuts per test: `POWERLOSS_CUTS`, or `default` for the short pass.
fn cuts(default: u64) -> u64 {
    std::env::var("POWERLOSS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A mounted file system in a temporary mount point, or `None` (after a
/// loud message) where FUSE cannot be mounted outside CI. The mount point
/// is under cargo's target directory, not `/tmp`: a process walking `/tmp`
/// (a cleaner, another test run) holds the mount point for a moment and
/// the unmount of a power cut fails with EBUSY.
fn mount() -> Result<Option<(tempfile::TempDir, PowerLossFs)>, BoxError> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    match PowerLossFs::mount(dir.path()) {
        Ok(fs) => Ok(Some((dir, fs))),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => Err(format!(
            "mounting the power-loss FUSE file system failed under CI=true: {e} \
             (it needs root and /dev/fuse)"
        )
        .into()),
        Err(e) => {
            eprintln!(
                "\n*** powerloss: SKIPPED, the FUSE file system could not be mounted: {e}\n\
                 *** (it needs root and /dev/fuse; under CI=true this is a failure)\n"
            );
            Ok(None)
        }
    }
}

fn block_on<F: Future>(future: F) -> Result<F::Output, BoxError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}

/// What one pass saw.
#[derive(Debug, Default)]
struct Tally {
    cuts: u64,
    before_ready: u64,
    soon_after_ready: u64,
    fresh_databases: u64,
    checked: usize,
    lost: usize,
    not_prefix: usize,
    unopenable: u64,
    damaged: u64,
    /// Cuts that lost at least one acknowledged operation.
    lossy_cuts: u64,
}

impl Tally {
    fn add(&mut self, verified: &Verified) {
        self.checked += verified.checked;
        self.lost += verified.lost;
        self.not_prefix += verified.not_prefix;
        self.lossy_cuts += u64::from(verified.lost > 0);
    }
}

/// Every token acknowledged on one database, and for which claim.
#[derive(Default)]
struct Tokens(HashMap<u64, String>);

impl Tokens {
    fn issued(&mut self, token: u64, claim: String) -> Result<(), String> {
        match self.0.insert(token, claim.clone()) {
            Some(first) => Err(format!(
                "fencing token {token} was issued twice: to {first} and to {claim}"
            )),
            None => Ok(()),
        }
    }
}

/// Runs `cuts` power cuts of `model` on the child workload in `mode`.
fn power_cuts(mode: &str, model: Model, cuts: u64) -> Result<Option<Tally>, BoxError> {
    let seed = seed_from_env("POWERLOSS_SEED");
    println!("powerloss {mode}/{model:?}: seed {seed} (POWERLOSS_SEED={seed} repeats it)");
    let Some((_mountpoint, mut fs)) = mount()? else {
        return Ok(None);
    };
    let policy = Policy {
        lossless: mode == "sync",
        prefix: mode == "sync",
    };
    let mut rng = Rng(seed);
    let (mut tally, started) = (Tally::default(), Instant::now());
    let (mut db, mut on_db, mut max_token, mut tokens) = (0, 0, 0, Tokens::default());
    let mut path = fs.path().join("db0");
    let mut opening_us = 50_000;
    for cut in 0..cuts {
        // A fresh database often: the first open in a new directory, and
        // cuts right after it, are where creation must already be durable.
        if cut > 0 && (on_db >= CUTS_PER_DATABASE || rng.below(4) == 0) {
            // The file system holds every file in memory: drop the old
            // database for good (its removal made durable) before the new
            // one exists, so this sync cannot make the new one durable.
            std::fs::remove_dir_all(&path)?;
            std::fs::File::open(fs.path())?.sync_all()?;
            db += 1;
            (on_db, max_token, tokens) = (0, 0, Tokens::default());
            path = fs.path().join(format!("db{db}"));
        }
        if on_db == 0 {
            tally.fresh_databases += 1;
        }
        on_db += 1;
        let at = match rng.below(10) {
            // While opening: before the child's usual time to ready.
            0..2 => KillAt::AfterSpawn(Duration::from_micros(rng.below(opening_us + 1))),
            2..6 => KillAt::AfterReady(Duration::from_millis(rng.below(6))),
            _ => KillAt::AfterReady(Duration::from_millis(5 + rng.below(300))),
        };
        if let KillAt::AfterReady(d) = at
            && d.as_millis() <= 5
        {
            tally.soon_after_ready += 1;
        }
        let (child_seed, cut_seed) = (rng.next(), rng.next());
        let context = format!(
            "{mode}/{model:?} cut {cut} on {} (seed {seed}, child seed {child_seed}, \
             kill {at:?}, cut seed {cut_seed})",
            path.display()
        );
        let (lines, ready_after) =
            run_child_timed(mode, child_seed, &path, at).map_err(|e| format!("{context}: {e}"))?;
        if let Some(after) = ready_after {
            // Follow the time to ready, which a fresh database, debug or
            // release builds and the machine's load all change.
            opening_us = (opening_us * 3 + after.as_micros() as u64) / 4;
        }
        let report = fs.cut(model, cut_seed)?;
        tally.cuts += 1;
        tally.before_ready += u64::from(!lines.iter().any(|l| l.ends_with("ready")));
        for line in lines.iter().filter_map(|l| parse(l)) {
            if line.ack && line.kind == harness::Kind::Claim {
                let claim = format!("task {} key {} in cut {cut}", line.task, line.key);
                tokens
                    .issued(line.token, claim)
                    .map_err(|e| format!("{context}: {e}"))?;
            }
        }
        let before = max_token;
        match block_on(verify(mode, policy, &path, &lines, &mut max_token))? {
            Ok(verified) => {
                tally.add(&verified);
                tokens
                    .issued(
                        verified.probe_token,
                        format!("the probe claim after cut {cut}"),
                    )
                    .map_err(|e| format!("{context}: {e}"))?;
            }
            Err(failure) => {
                tally.add(&failure.verified);
                let failure = explain(&context, failure, &report);
                match failure.problem {
                    // Only Sync promises that acknowledged writes survive.
                    _ if mode == "sync" => return Err(failure.message.into()),
                    // Fencing is promised in every mode.
                    Problem::Unopenable => tally.unopenable += 1,
                    Problem::Damaged => tally.damaged += 1,
                    _ => return Err(failure.message.into()),
                }
                if tally.unopenable + tally.damaged <= 3 {
                    println!("(counted, not a failure) {}", failure.message);
                }
                // Go on with a fresh database.
                on_db = CUTS_PER_DATABASE;
                max_token = before;
            }
        }
    }
    let counts = fs.sync_counts();
    println!(
        "powerloss {mode}/{model:?}: {} cuts ({} before ready, {} within 5 ms of ready, \
         {} fresh databases), {} acknowledged operations checked, {} lost (in {} cuts), \
         {} not a prefix, {} unopenable, {} damaged; \
         {} fsyncs, {} directory fsyncs; {:.1?}",
        tally.cuts,
        tally.before_ready,
        tally.soon_after_ready,
        tally.fresh_databases,
        tally.checked,
        tally.lost,
        tally.lossy_cuts,
        tally.not_prefix,
        tally.unopenable,
        tally.damaged,
        counts.all_fsyncs,
        counts.fsyncdirs,
        started.elapsed()
    );
    Ok(Some(tally))
}

/// A failure with what the cut discarded, to find the mechanism.
fn explain(context: &str, failure: Failure, report: &CutReport) -> Failure {
    Failure {
        message: format!(
            "{context}: {failure}\nwhat the cut discarded (paths in the mount):\n{report}"
        ),
        ..failure
    }
}

#[test]
fn sync_loses_nothing_acknowledged_when_power_is_cut() -> TestResult {
    power_cuts("sync", Model::Drop, cuts(24))?;
    Ok(())
}

#[test]
fn sync_loses_nothing_acknowledged_when_unsynced_pages_are_torn() -> TestResult {
    power_cuts("sync", Model::Torn, cuts(16))?;
    Ok(())
}

/// A negative control: `mode` acknowledges writes before they are synced,
/// so power cuts must cost it some. If it never lost anything, the file
/// system would not be dropping data and the Sync tests would prove nothing.
fn loses_acknowledged_writes(mode: &str) -> TestResult {
    // A pass of a few cuts can lose nothing by chance (a cut before the
    // store was ready, or right after a periodic flush); three cannot.
    let (mut checked, mut cut) = (0, 0);
    for _ in 0..3 {
        let Some(tally) = power_cuts(mode, Model::Drop, cuts(10))? else {
            return Ok(());
        };
        if tally.lost > 0 {
            return Ok(());
        }
        (checked, cut) = (checked + tally.checked, cut + tally.cuts);
    }
    Err(format!(
        "negative control failed: {mode} lost none of {checked} acknowledged operations over \
         {cut} cuts; the file system is not dropping unsynced data"
    )
    .into())
}

#[test]
fn flush_loses_acknowledged_writes_when_power_is_cut() -> TestResult {
    loses_acknowledged_writes("flush")
}

#[test]
fn periodic_loses_acknowledged_writes_when_power_is_cut() -> TestResult {
    loses_acknowledged_writes("periodic")
}

/// Flush and Periodic under torn pages: losses and damage are counted;
/// only a fencing token issued again fails.
#[test]
fn flush_and_periodic_with_torn_pages_never_reuse_a_token() -> TestResult {
    power_cuts("flush", Model::Torn, cuts(5))?;
    power_cuts("periodic", Model::Torn, cuts(5))?;
    Ok(())
}

/// A lease acknowledged before the fault, and whether it was completed.
struct Acked {
    lease: Lease,
    done: bool,
}

/// Claims `n` keys from `first`, completing every other one.
async fn claim_some(
    store: &SledIdempotencyStore,
    first: u128,
    n: u128,
) -> Result<Vec<Acked>, BoxError> {
    let mut acked = Vec::new();
    for key in first..first + n {
        let ClaimResult::Acquired(lease) = store.claim(&id(key), LEASE_TTL).await? else {
            return Err(format!("key {key} was not free").into());
        };
        let done = key % 2 == 0;
        if done {
            store.complete(&lease).await?;
        }
        acked.push(Acked { lease, done });
    }
    Ok(acked)
}

/// Every mutating call after the failure, then `close()`: each must fail,
/// at once, with the same error. Uses leases from `pending` (at least four).
async fn mutating_calls_after_the_failure(
    store: &SledIdempotencyStore,
    pending: &[&Lease],
    first_key: u128,
    violations: &mut Vec<String>,
) {
    type Call<'a> = std::pin::Pin<Box<dyn Future<Output = sled_idempotency::Result<()>> + 'a>>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "claim of a new key",
            Box::pin(async move { store.claim(&id(first_key), LEASE_TTL).await.map(drop) }),
        ),
        (
            "try_claim of a new key",
            Box::pin(async move {
                store
                    .try_claim(&id(first_key + 1), LEASE_TTL)
                    .await
                    .map(drop)
            }),
        ),
        ("complete", Box::pin(store.complete(pending[0]))),
        ("abandon", Box::pin(store.abandon(pending[1]))),
        ("mark_done", Box::pin(store.mark_done(pending[2].key()))),
        ("release", Box::pin(store.release(pending[3].key()))),
    ];
    let mut kind = None;
    for (name, call) in calls {
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Err(_) => violations.push(format!("{name} after the failure hung for 5 s")),
            Ok(Ok(())) => violations.push(format!(
                "{name} after the failure was acknowledged; the store must refuse every \
                 mutating call until it is reopened (docs/durability.md, After an I/O failure)"
            )),
            Ok(Err(e)) => {
                let d = std::mem::discriminant(&e);
                if *kind.get_or_insert(d) != d {
                    violations.push(format!("{name} failed with a different error: {e}"));
                }
                if !e.to_string().contains("open") {
                    violations.push(format!(
                        "{name}: the error does not say the database must be reopened: {e}"
                    ));
                }
                if started.elapsed() > Duration::from_secs(1) {
                    violations.push(format!(
                        "{name} took {:?} to fail, not at once",
                        started.elapsed()
                    ));
                }
            }
        }
    }
    match store.close().await {
        Ok(()) => violations.push("close() after the failure returned Ok".into()),
        Err(e) if kind.is_some_and(|k| k != std::mem::discriminant(&e)) => violations.push(
            format!("close() returned another error than the calls: {e}"),
        ),
        Err(e) => println!("close() after the failure: {e}"),
    }
}

/// Reopens after a cut and checks the leases acknowledged before the
/// failure; returns the problems found.
fn check_after_cut(
    fs: &mut PowerLossFs,
    path: &Path,
    acked: &[Acked],
) -> Result<Vec<String>, BoxError> {
    fs.set_fault(None);
    let report = fs.cut(Model::Drop, 1)?;
    block_on(async {
        let store = SledIdempotencyStore::builder(path)
            .durability(Durability::Sync)
            .open()
            .await?;
        let mut lost = Vec::new();
        for a in acked {
            let record = store.get_record(a.lease.key()).await?;
            let kept = record
                .as_ref()
                .is_some_and(|r| r.token == a.lease.token() && (r.state == State::Done) == a.done);
            if !kept {
                lost.push(format!(
                    "acknowledged before the failure, lost after the cut: {} (token {}, done \
                     {}); the key holds {record:?}",
                    a.lease.key(),
                    a.lease.token(),
                    a.done
                ));
            }
        }
        if !lost.is_empty() {
            lost.push(format!("what the cut discarded:\n{report}"));
        }
        store.close().await?;
        Ok::<_, BoxError>(lost)
    })?
}

/// docs/durability.md, "After an I/O failure", end to end: the next fdatasync of the log fails with EIO, only
/// that one (the disk recovers, which is when a store that does not latch
/// acknowledges writes on top of the hole the failed pages left).
fn eio_latches_the_store(durability: Durability) -> TestResult {
    let Some((_mountpoint, mut fs)) = mount()? else {
        return Ok(());
    };
    let path = fs.path().join("db");
    let mut violations = Vec::new();
    let acked = block_on(async {
        let store = SledIdempotencyStore::builder(&path)
            .durability(durability)
            .open()
            .await?;
        let acked = claim_some(&store, 0, 20).await?;
        if let Durability::Periodic(_) = durability {
            // Let a periodic flush make them durable.
            let synced = fs.sync_counts().all_fsyncs;
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs.sync_counts().all_fsyncs == synced && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fs.set_fault(Some(Fault {
            nth: 1,
            sticky: false,
            name: Some(OsString::from("db")),
        }));
        if durability == Durability::Sync {
            // The claim that waits on the failed fdatasync fails.
            if let Ok(r) = store.claim(&id(100), LEASE_TTL).await {
                violations.push(format!(
                    "the claim whose fdatasync failed was acknowledged: {r:?}"
                ));
            }
        } else {
            // Writes are acknowledged before any flush: the failed
            // background flush must stop the store within a few periods.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut key = 100;
            while store.claim(&id(key), LEASE_TTL).await.is_ok() {
                if Instant::now() > deadline {
                    violations.push(
                        "mutating calls kept succeeding for 2 s after the periodic flush failed"
                            .into(),
                    );
                    break;
                }
                key += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if fs.sync_counts().failed != 1 {
            violations.push(format!(
                "the fault did not fire once: {:?}",
                fs.sync_counts()
            ));
        }
        // Four pending leases go to the calls after the failure; the rest
        // must be found as acknowledged after the cut.
        let (mut used, mut kept) = (Vec::new(), Vec::new());
        for a in acked {
            if !a.done && used.len() < 4 {
                used.push(a.lease);
            } else {
                kept.push(a);
            }
        }
        let used: Vec<&Lease> = used.iter().collect();
        mutating_calls_after_the_failure(&store, &used, 10_000, &mut violations).await;
        Ok::<_, BoxError>(kept)
    })??;
    violations.extend(check_after_cut(&mut fs, &path, &acked)?);
    assert!(
        violations.is_empty(),
        "{durability:?}, after an EIO from fdatasync:\n- {}",
        violations.join("\n- ")
    );
    Ok(())
}

#[test]
fn eio_on_fsync_latches_the_store() -> TestResult {
    eio_latches_the_store(Durability::Sync)
}

/// A failed background flush latches too.
#[test]
fn eio_on_a_periodic_flush_latches_the_store() -> TestResult {
    eio_latches_the_store(Durability::Periodic(Duration::from_millis(20)))
}

/// sled's `flock` works on this file system (the kernel handles it), so a
/// second open of the same database fails with `Locked`.
#[test]
fn a_second_open_of_a_database_in_the_mount_is_locked() -> TestResult {
    let Some((_mountpoint, fs)) = mount()? else {
        return Ok(());
    };
    let path = fs.path().join("db");
    block_on(async {
        let store = SledIdempotencyStore::open(&path).await?;
        match SledIdempotencyStore::open(&path).await {
            Err(sled_idempotency::Error::Locked { .. }) => {}
            other => return Err(format!("a second open was not Locked: {other:?}").into()),
        }
        store.close().await?;
        SledIdempotencyStore::open(&path).await?.close().await?;
        Ok::<_, BoxError>(())
    })??;
    Ok(())
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The file system itself: what a cut keeps and drops.
#[test]
fn the_file_system_keeps_exactly_what_was_synced() -> TestResult {
    use std::io::Write;
    let Some((_mountpoint, mut fs)) = mount()? else {
        return Ok(());
    };
    let root: PathBuf = fs.path().to_path_buf();
    let (dir, file) = (root.join("d"), root.join("d/f"));

    // A synced file in a directory whose own entry was never synced.
    std::fs::create_dir(&dir)?;
    std::fs::File::create(&file)?.write_all(b"one")?;
    std::fs::File::open(&file)?.sync_all()?;
    fsync_dir(&dir)?;
    std::fs::write(root.join("unsynced"), b"x")?;
    fs.cut(Model::Drop, 0)?;
    assert!(
        !dir.exists(),
        "a directory whose entry was not synced survived"
    );
    assert!(!root.join("unsynced").exists());

    // Everything synced survives; unsynced changes and renames do not.
    std::fs::create_dir(&dir)?;
    std::fs::write(&file, b"one")?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)?
        .sync_data()?;
    fsync_dir(&dir)?;
    fsync_dir(&root)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)?
        .write_all(b" two")?;
    std::fs::rename(&file, dir.join("g"))?;
    assert_eq!(read(&dir.join("g")).as_deref(), Some(&b"one two"[..]));
    let report = fs.cut(Model::Drop, 0)?;
    assert_eq!(read(&file).as_deref(), Some(&b"one"[..]), "{report}");
    assert!(!dir.join("g").exists(), "an unsynced rename survived");
    assert_eq!(report.lost_entries, vec!["/d/g".to_owned()]);
    assert_eq!(report.revived_entries, vec!["/d/f".to_owned()]);

    // A synced rename over an existing file survives.
    std::fs::write(dir.join("new"), b"replacement")?;
    std::fs::File::open(dir.join("new"))?.sync_all()?;
    std::fs::rename(dir.join("new"), &file)?;
    fsync_dir(&dir)?;
    fs.cut(Model::Drop, 0)?;
    assert_eq!(read(&file).as_deref(), Some(&b"replacement"[..]));

    // Torn: each unsynced page is old or new, both happen.
    let old = vec![b'o'; 8 * fs::PAGE];
    std::fs::write(&file, &old)?;
    std::fs::File::open(&file)?.sync_all()?;
    let (mut kept_old, mut kept_new) = (0, 0);
    for seed in 0..8 {
        std::fs::write(&file, vec![b'n'; 8 * fs::PAGE])?;
        fs.cut(Model::Torn, seed)?;
        let bytes = read(&file).ok_or("the torn file is gone")?;
        assert_eq!(bytes.len(), 8 * fs::PAGE);
        for page in bytes.chunks(fs::PAGE) {
            assert!(
                page.iter().all(|&b| b == page[0]),
                "a page mixes old and new"
            );
            if page[0] == b'o' {
                kept_old += 1;
            } else {
                kept_new += 1;
            }
        }
        std::fs::write(&file, &old)?;
        std::fs::File::open(&file)?.sync_all()?;
    }
    assert!(
        kept_old > 0 && kept_new > 0,
        "old {kept_old}, new {kept_new}"
    );

    // Fault injection: the first fsync of `f` fails, its data is not
    // durable even after a later successful fsync, and the next succeeds.
    fs.set_fault(Some(Fault {
        nth: 1,
        sticky: false,
        name: Some("f".into()),
    }));
    let mut handle = std::fs::OpenOptions::new().write(true).open(&file)?;
    handle.write_all(b"NEW")?;
    let first = handle.sync_data();
    assert_eq!(first.map_err(|e| e.raw_os_error()), Err(Some(5)), "EIO");
    handle.sync_data()?;
    drop(handle);
    fs.cut(Model::Drop, 0)?;
    assert_eq!(
        read(&file).as_deref(),
        Some(&old[..]),
        "failed pages came back"
    );
    Ok(())
}

/// Regression: on a disk whose fsyncs keep failing, sled 0.34 panics in its
/// own `Drop` (it unwraps an fsync). After a drop the panic killed the
/// thread releasing the database before it deregistered it, so every later
/// `open` of the path in this process waited out the durability timeout;
/// after `close` the panic replaced the cause that latched the store. Now
/// the release catches it: `close` reports the fsync failure, and a reopen
/// after a drop does not wait once the disk is healthy again.
#[test]
fn a_failing_disk_at_shutdown_is_reported_and_does_not_stall_a_reopen() -> TestResult {
    let Some((_mountpoint, fs)) = mount()? else {
        return Ok(());
    };
    let path = fs.path().join("db");
    let timeout = Duration::from_secs(20);
    let open = || {
        SledIdempotencyStore::builder(&path)
            .durability(Durability::Sync)
            .durability_timeout(timeout)
            .open()
    };
    let failing = || Fault {
        nth: 1,
        sticky: true,
        name: Some("db".into()),
    };
    block_on(async {
        for close in [true, false] {
            let key = if close { 10 } else { 20 };
            let store = open().await?;
            store.try_claim(&id(key), LEASE_TTL).await?;
            fs.set_fault(Some(failing()));
            let claim = store.try_claim(&id(key + 1), LEASE_TTL).await;
            assert!(
                matches!(claim, Err(sled_idempotency::Error::PreviousIo { .. })),
                "{claim:?}"
            );
            if close {
                match store.close().await {
                    Err(sled_idempotency::Error::PreviousIo { cause }) => {
                        assert!(cause.contains("fdatasync"), "close reported {cause:?}");
                    }
                    other => return Err(format!("close returned {other:?}").into()),
                }
            } else {
                drop(store);
                std::thread::sleep(Duration::from_millis(500)); // the release runs
            }
            fs.set_fault(None);
            let started = Instant::now();
            let store = open().await?;
            assert!(
                started.elapsed() < timeout,
                "the reopen waited {:?}",
                started.elapsed()
            );
            assert_eq!(
                store.try_claim(&id(key), LEASE_TTL).await?,
                sled_idempotency::ClaimOutcome::AlreadyPending,
                "acknowledged before the failure"
            );
            store.close().await?;
        }
        Ok::<_, BoxError>(())
    })??;
    Ok(())
}
