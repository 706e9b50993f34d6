//! The admin API: census and filtered listings count exactly what a
//! scripted sequence did, verify names each bad key, export and import
//! round-trip byte for byte and refuse bad input with nothing written, and
//! import and compaction keep the fencing guarantee.

#![cfg(feature = "admin")]

mod common;

use std::time::Duration;

use common::{Fixture, T0, TTL, TestResult, id};
use sled_idempotency::admin::{ATTEMPTS_BUCKETS, ListFilter, MAX_IMPORTED_TOKEN, OnConflict};
use sled_idempotency::{ClaimResult, Error, SledIdempotencyStore, State};

const RECORDS_TREE: &str = "sled-idempotency/records";

/// Claims 0..40 with ttl 30 s; 0..10 done, 10..20 claimed three times
/// (two takeovers after expiry), 30..40 expire for good.
async fn scripted(fx: &Fixture, store: &SledIdempotencyStore) -> TestResult {
    for n in 10..20 {
        for _ in 0..2 {
            store.try_claim(&id(n), Duration::from_millis(5)).await?;
            fx.advance(Duration::from_millis(5));
        }
    }
    for n in 0..40 {
        let ttl = if n >= 30 {
            Duration::from_millis(1)
        } else {
            TTL
        };
        store.try_claim(&id(n), ttl).await?;
        if n < 10 {
            store.mark_done(&id(n)).await?;
        }
    }
    fx.advance(Duration::from_millis(1));
    Ok(())
}

fn export_text(exported: &[u8]) -> String {
    String::from_utf8_lossy(exported).into_owned()
}

async fn export_all(store: &SledIdempotencyStore) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut names = store.namespaces().await?;
    names[1..].sort();
    for name in names {
        out = store.namespace(&name).await?.admin().export(out).await?.out;
    }
    Ok(out)
}

#[tokio::test]
async fn census_and_filters_count_a_scripted_sequence_exactly() -> TestResult {
    let fx = Fixture::new();
    let retention = Duration::from_secs(10);
    let store = fx.builder().pending_retention(retention).open().await?;
    scripted(&fx, &store).await?;
    let census = store.admin().census().await?;
    // 30..40 expired; as pending claims they are remembered for a while.
    assert_eq!(
        (
            census.live_pending,
            census.live_done,
            census.expired,
            census.sweepable,
            census.corrupt
        ),
        (20, 10, 10, 0, 0)
    );
    let mut attempts = [0; ATTEMPTS_BUCKETS.len()];
    attempts[1] = 20; // 0..10 and 20..30
    attempts[3] = 10; // 10..20
    assert_eq!(census.attempts, attempts);
    assert!(census.record_bytes > 30 * 16);

    let poison = store
        .admin()
        .list(&ListFilter::new(100).min_attempts(3))
        .await?;
    let keys: Vec<u128> = poison.iter().map(|(k, _)| k.as_uuid().as_u128()).collect();
    assert_eq!(keys, (10..20).collect::<Vec<_>>());
    let page = store
        .admin()
        .list(&ListFilter::new(4).state(State::Pending).after(id(12)))
        .await?;
    let keys: Vec<u128> = page.iter().map(|(k, _)| k.as_uuid().as_u128()).collect();
    assert_eq!(keys, vec![13, 14, 15, 16]);
    let expired = store
        .admin()
        .list(&ListFilter::new(100).include_expired(true).after(id(29)))
        .await?;
    assert_eq!(expired.len(), 10, "30..40, expired and not swept");
    fx.advance(retention);
    let census = store.admin().census().await?;
    assert_eq!((census.expired, census.sweepable), (10, 10));
    let report = store.admin().sweep().await?;
    assert_eq!((report.examined, report.removed), (40, 10));
    assert_eq!(store.admin().census().await?.expired, 0);
    store.close().await?;
    Ok(())
}

#[tokio::test]
async fn verify_names_each_bad_key_and_passes_a_sound_database() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    scripted(&fx, &store).await?;
    let sound = store.admin().verify().await?;
    assert_eq!((sound.examined, sound.problems.len()), (40, 0));
    store.close().await?;

    let db = sled::open(fx.path())?;
    let tree = db.open_tree(RECORDS_TREE)?;
    tree.insert(id(3).as_uuid().as_bytes(), &[9u8, 1, 2][..])?;
    let record5 = tree.get(id(5).as_uuid().as_bytes())?.ok_or("record 5")?;
    tree.insert(b"short", record5.clone())?;
    let mut forged = sled_idempotency::Record::decode(&record5)?;
    forged.token = u64::MAX - 1; // a token the database has not handed out
    tree.insert(id(5).as_uuid().as_bytes(), forged.encode())?;
    db.open_tree("some-other-tree")?.insert(b"k", b"v")?;
    db.flush()?;
    drop((tree, db));
    common::wait_for_sled_to_let_go(&fx.path());

    let store = fx.open().await?;
    let report = store.admin().verify().await?;
    let shown: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(report.problems.len(), 4, "{shown:#?}");
    let key3 = id(3).to_string();
    assert!(
        shown
            .iter()
            .any(|p| p.contains(&key3) && p.contains("unknown record version 9"))
    );
    assert!(
        shown
            .iter()
            .any(|p| p.contains("73686f7274") && p.contains("not 16"))
    );
    assert!(
        shown
            .iter()
            .any(|p| p.contains(&id(5).to_string()) && p.contains("fencing"))
    );
    assert!(shown.iter().any(|p| p.contains("some-other-tree")));
    // Compaction copies a value that does not decode as it is: nothing
    // stored is lost, and verify still names it.
    let dest = fx.dir.path().join("compacted");
    // A destination that holds anything is refused by name, untouched.
    std::fs::create_dir(&dest).expect("mkdir");
    std::fs::write(dest.join("notes.txt"), b"mine").expect("write");
    match store.admin().compact_into(&dest).await {
        Err(sled_idempotency::Error::DestinationNotEmpty { path }) => assert_eq!(path, dest),
        other => panic!("expected DestinationNotEmpty, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(dest.join("notes.txt")).expect("read"),
        b"mine"
    );
    std::fs::remove_dir_all(&dest).expect("rm");
    let report = store.admin().compact_into(&dest).await?;
    assert_eq!(report.corrupt, 1);
    store.close().await?;
    let compacted = SledIdempotencyStore::open(&dest).await?;
    let shown: Vec<String> = compacted
        .admin()
        .verify()
        .await?
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        shown
            .iter()
            .any(|p| p.contains(&key3) && p.contains("version 9")),
        "{shown:?}"
    );
    compacted.close().await?;
    Ok(())
}

/// Records of record version 1 (from databases older than format 2)
/// equal to the imported ones are not conflicts: re-importing an export
/// into the database it came from changes nothing.
#[tokio::test]
async fn an_export_of_version_1_records_imports_back_unchanged() -> TestResult {
    let copy = tempfile::tempdir()?;
    let path = copy.path().join("db");
    std::fs::create_dir(&path)?;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    for entry in std::fs::read_dir(fixture)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), path.join(entry.file_name()))?;
        }
    }
    let store = SledIdempotencyStore::builder(&path)
        .clock(sled_idempotency::ManualClock::new(T0))
        .open()
        .await?;
    let exported = export_all(&store).await?;
    assert!(!exported.is_empty());
    let report = store
        .admin()
        .import(std::io::Cursor::new(exported.clone()), OnConflict::Fail)
        .await?;
    assert_eq!((report.unchanged, report.written), (report.lines, 0));
    assert_eq!(export_all(&store).await?, exported);
    store.close().await?;
    Ok(())
}

/// Claims that land while a running store is compacted carry tokens above
/// the floor set when the copy began; the floor is raised past them once
/// the copy ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacting_a_running_store_keeps_the_floor_above_claims_made_meanwhile() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    for n in 0..20_000 {
        store.try_claim(&id(n), TTL).await?;
    }
    let dest = fx.dir.path().join("compacted");
    let claimer = store.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let claims = tokio::spawn(async move {
        // Keys after every existing one: the copy reaches them last.
        let mut n = 1_000_000;
        while !*stopped.borrow() {
            claimer.try_claim(&id(n), TTL).await?;
            n += 1;
        }
        Ok::<u128, Error>(n - 1_000_000)
    });
    let report = store.admin().compact_into(&dest).await?;
    let _ = stop.send(true);
    let made = claims.await??;
    store.close().await?;
    let compacted = SledIdempotencyStore::open(&dest).await?;
    let copied = compacted
        .admin()
        .list(&ListFilter::new(usize::MAX).include_expired(true))
        .await?;
    let highest = copied.iter().map(|(_, r)| r.token).max().ok_or("records")?;
    assert!(
        report.token_floor > highest,
        "floor {} above every copied token ({highest}; {made} claims ran during the copy)",
        report.token_floor
    );
    assert!(compacted.admin().verify().await?.problems.is_empty());
    compacted.close().await?;
    Ok(())
}

#[tokio::test]
async fn export_import_export_is_byte_identical_and_keeps_fencing() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    scripted(&fx, &store).await?;
    let orders = store.namespace("orders").await?;
    for n in 100..105 {
        match orders
            .claim_with_fingerprint(&id(n), TTL, b"payload")
            .await?
        {
            ClaimResult::Acquired(lease) if n % 2 == 0 => {
                orders.complete_with(&lease, b"result bytes").await?
            }
            _ => {}
        }
    }
    let first = export_all(&store).await?;
    let text = export_text(&first);
    assert_eq!(text.lines().count(), 40 + 5, "all remembered records");
    assert!(text.contains(r#""namespace":"orders""#));
    assert!(text.contains(&format!(r#""result":"{}""#, hex(b"result bytes"))));
    let highest = store
        .admin()
        .list(&ListFilter::new(100).include_expired(true))
        .await?
        .iter()
        .chain(orders.admin().list(&ListFilter::new(100)).await?.iter())
        .map(|(_, r)| r.token)
        .max()
        .ok_or("records")?;
    store.close().await?;

    let other = Fixture::new();
    other.clock.set(fx.clock.now());
    let target = other.open().await?;
    let report = target
        .admin()
        .import(std::io::Cursor::new(first.clone()), OnConflict::Fail)
        .await?;
    assert_eq!((report.lines, report.written), (45, 45));
    assert!(report.token_floor >= highest);
    let second = export_all(&target).await?;
    assert_eq!(export_text(&second), text);
    assert_eq!(second, first);

    // Every token the new database hands out is above every imported one,
    // also after a reopen.
    let lease = match target.claim(&id(7_000), TTL).await? {
        ClaimResult::Acquired(lease) => lease,
        other => return Err(format!("claimed: {other:?}").into()),
    };
    assert!(lease.token() > highest, "{} > {highest}", lease.token());
    target.close().await?;
    let target = other.open().await?;
    let lease = match target.claim(&id(7_001), TTL).await? {
        ClaimResult::Acquired(lease) => lease,
        other => return Err(format!("claimed: {other:?}").into()),
    };
    assert!(lease.token() > highest);

    // A second import of the same lines changes nothing; a conflicting
    // line is refused with nothing written, unless told how to resolve it.
    let again = target
        .admin()
        .import(std::io::Cursor::new(first.clone()), OnConflict::Fail)
        .await?;
    assert_eq!((again.unchanged, again.written), (45, 0));
    let changed = text.replacen(r#""attempts":1,"#, r#""attempts":7,"#, 1)
        + &text
            .lines()
            .next()
            .ok_or("a line")?
            .replace(&id(0).to_string(), &id(8_000).to_string())
        + "\n";
    let refused = target
        .admin()
        .import(std::io::Cursor::new(changed.clone()), OnConflict::Fail)
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::ImportConflict {
                line: 1,
                conflicts: 1,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(
        target.get_record(&id(8_000)).await?.is_none(),
        "nothing written"
    );
    let in_new_namespace = text
        .lines()
        .next()
        .ok_or("a line")?
        .replace(r#""namespace":"default""#, r#""namespace":"fresh""#);
    let refused = target
        .admin()
        .import(
            std::io::Cursor::new(format!("{in_new_namespace}\n{changed}")),
            OnConflict::Fail,
        )
        .await;
    assert!(matches!(refused, Err(Error::ImportConflict { .. })));
    assert!(
        !target.namespaces().await?.contains(&"fresh".to_owned()),
        "a refused import creates no namespace"
    );
    let kept = target
        .admin()
        .import(std::io::Cursor::new(changed.clone()), OnConflict::Keep)
        .await?;
    assert_eq!((kept.kept, kept.written, kept.unchanged), (1, 1, 44));
    let replaced = target
        .admin()
        .import(std::io::Cursor::new(changed), OnConflict::Replace)
        .await?;
    assert_eq!((replaced.replaced, replaced.unchanged), (1, 45));
    assert_eq!(target.get_record(&id(0)).await?.ok_or("id 0")?.attempts, 7);
    target.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_bad_import_line_is_named_and_nothing_is_written() -> TestResult {
    let fx = Fixture::new();
    let source = fx.open().await?;
    for n in 0..3 {
        source.try_claim(&id(n), TTL).await?;
    }
    let good = export_text(&export_all(&source).await?);
    source.close().await?;
    let lines: Vec<&str> = good.lines().collect();
    let cases = [
        (
            lines[1].replace(r#""state":"pending""#, r#""state":"gone""#),
            "unknown variant",
        ),
        (
            lines[1].replace(r#""schema":1"#, r#""schema":2"#),
            "schema 2",
        ),
        (
            lines[1].replace(r#""format":3"#, r#""format":4"#),
            "format version 4",
        ),
        (
            lines[1].replace(&id(1).to_string(), "not-a-uuid"),
            "not a UUID",
        ),
        (
            lines[1].replace(r#""namespace":"default""#, r#""namespace":"a b""#),
            "namespace",
        ),
        (
            lines[1].replace(r#""fingerprint":null"#, r#""fingerprint":"zz""#),
            "not hex",
        ),
        (
            lines[1].replace(r#""attempts":1"#, r#""attempts":0"#),
            "no attempts",
        ),
        (
            with_token(lines[1], MAX_IMPORTED_TOKEN + 1),
            "not below the next token",
        ),
        (
            lines[1].replace(r#""ttl_ms":30000"#, r#""ttl_ms":0"#),
            "a ttl of 0 ms",
        ),
        (lines[1].replace("}", r#","extra":1}"#), "unknown field"),
        (lines[1][..20].to_owned(), "EOF"),
        (String::new(), "empty"),
        (lines[0].to_owned(), "also on line 1"),
    ];
    let target_fx = Fixture::new();
    target_fx.clock.set(T0);
    let target = target_fx.open().await?;
    for (bad, expected) in cases {
        let input = format!("{}\n{bad}\n{}\n", lines[0], lines[2]);
        match target
            .admin()
            .import(std::io::Cursor::new(input), OnConflict::Replace)
            .await
        {
            Err(Error::ImportLine { line: 2, reason }) => {
                assert!(
                    reason.contains(expected),
                    "{reason:?} should say {expected:?}"
                )
            }
            other => return Err(format!("{bad:?}: {other:?}").into()),
        }
        assert_eq!(
            target.admin().census().await?.live_pending,
            0,
            "nothing written"
        );
    }
    target.close().await?;
    Ok(())
}

#[tokio::test]
async fn compaction_copies_what_a_sweep_keeps_and_raises_the_token_floor() -> TestResult {
    let fx = Fixture::new();
    // Each reopen moves sled's id counter on by a million or more: the
    // old database's tokens end up far above a fresh database's ids.
    for _ in 0..3 {
        fx.open().await?.close().await?;
    }
    let store = fx
        .builder()
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    scripted(&fx, &store).await?;
    // A released claim's token must stay below every later token too.
    let released = match store.claim(&id(500), TTL).await? {
        ClaimResult::Acquired(lease) => lease.token(),
        other => return Err(format!("claimed: {other:?}").into()),
    };
    store.release(&id(500)).await?;
    let before = export_all(&store).await?;
    let dest = fx.dir.path().join("compacted");
    let report = store.admin().compact_into(&dest).await?;
    assert_eq!(
        (report.records, report.dropped, report.namespaces),
        (30, 10, 1)
    );
    assert!(report.token_floor > released);
    store.close().await?;

    let compacted = SledIdempotencyStore::builder(&dest)
        .clock(fx.clock.clone())
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    assert_eq!(export_all(&compacted).await?, before);
    assert_eq!(compacted.admin().census().await?.expired, 0);
    assert!(compacted.admin().verify().await?.problems.is_empty());
    let lease = match compacted.claim(&id(500), TTL).await? {
        ClaimResult::Acquired(lease) => lease,
        other => return Err(format!("claimed: {other:?}").into()),
    };
    assert!(lease.token() > released, "{} > {released}", lease.token());
    // The copy comes with a complete expiry index: once everything is
    // forgotten, one sweep finds all 31 records through the index alone (a
    // full scan would read each record and its note).
    fx.advance(Duration::from_secs(86_400));
    let swept = compacted.sweep_expired().await?;
    assert_eq!((swept.examined, swept.removed), (31, 31));
    compacted.close().await?;
    Ok(())
}

/// `line` with its token replaced by `token`.
fn with_token(line: &str, token: u64) -> String {
    let start = line
        .find(r#""token":"#)
        .map_or(0, |i| i + r#""token":"#.len());
    let end = line[start..].find(',').map_or(line.len(), |i| start + i);
    format!("{}{token}{}", &line[..start], &line[end..])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Regression: `import` with `OnConflict::Replace` wrote the imported
/// record as it was, so a key's fencing token could go down (a record
/// exported long ago, replayed over the key's newer claim). A replacement
/// whose token is not above the stored one now gets a fresh token.
#[tokio::test]
async fn replace_never_lowers_a_fencing_token() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    let old = export_text(&export_all(&store).await?);
    let old_token = store.get_record(&id(1)).await?.ok_or("id 1")?.token;
    store.release(&id(1)).await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    let newer = store.get_record(&id(1)).await?.ok_or("id 1")?;
    assert!(newer.token > old_token);
    let replaced = store
        .admin()
        .import(std::io::Cursor::new(old), OnConflict::Replace)
        .await?;
    assert_eq!(replaced.replaced, 1);
    let now = store.get_record(&id(1)).await?.ok_or("id 1")?;
    assert_eq!(
        now.state,
        sled_idempotency::State::Pending,
        "the imported record"
    );
    assert!(
        now.token > newer.token,
        "token {} must be above the replaced record's {}",
        now.token,
        newer.token
    );
    store.close().await?;
    Ok(())
}
