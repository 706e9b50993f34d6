//! The on-disk format is pinned on purpose: a dependency bump (bincode,
//! serde) must not silently change the bytes of existing databases, and a
//! database written by version 1 must keep opening.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestResult, id};
use sled_idempotency::{
    ClaimOutcome::*, ClaimResult, DecodeError, Durability, FORMAT_VERSION, ManualClock,
    RECORD_VERSION, Record, SledIdempotencyStore, State,
};

fn record(state: State, expires_at: u64, token: u64, attempts: u32, ttl_ms: u64) -> Record {
    Record {
        state,
        expires_at,
        token,
        attempts,
        ttl_ms,
        fingerprint: None,
        result: None,
    }
}

/// Version 1 bytes, as databases of format 1 hold them: still decoded.
#[test]
fn version_1_records_still_decode() {
    #[rustfmt::skip]
    let golden_v1: &[u8] = &[
        1,                                              // record version 1
        0,                                              // State::Pending (varint variant index)
        0xFD, 0x30, 0xC5, 0x5C, 0x18, 0xA3, 0x01, 0, 0, // expires_at 1_800_000_030_000: u64 marker + 8 bytes LE
        42,                                             // token (single-byte varint)
        3,                                              // attempts
        0xFB, 0x30, 0x75,                               // ttl_ms 30000: u16 marker + 2 bytes LE
    ];
    let expected = record(State::Pending, 1_800_000_030_000, 42, 3, 30_000);
    assert_eq!(Record::decode(golden_v1), Ok(expected));
    let done_v1 = [1, 1, 250, 0, 0, 0xFB, 251, 0];
    assert_eq!(
        Record::decode(&done_v1),
        Ok(record(State::Done, 250, 0, 0, 251))
    );
}

#[test]
fn record_encoding_is_pinned() {
    assert_eq!(
        RECORD_VERSION, 2,
        "a new record version needs its own golden bytes"
    );
    let plain = record(State::Pending, 1_800_000_030_000, 42, 3, 30_000);
    #[rustfmt::skip]
    let golden: &[u8] = &[
        2,                                              // record version 2
        0,                                              // State::Pending
        0xFD, 0x30, 0xC5, 0x5C, 0x18, 0xA3, 0x01, 0, 0, // expires_at
        42,                                             // token
        3,                                              // attempts
        0xFB, 0x30, 0x75,                               // ttl_ms
        0,                                              // fingerprint: None
        0,                                              // result: None
    ];
    assert_eq!(plain.encode(), golden);
    assert_eq!(Record::decode(golden), Ok(plain));

    let full = Record {
        fingerprint: Some(vec![0xAA, 0xBB]),
        result: Some(b"ok".to_vec()),
        ..record(State::Done, 250, 7, 1, 251)
    };
    #[rustfmt::skip]
    let golden_full: &[u8] = &[
        2, 1, 250, 7, 1, 0xFB, 251, 0,
        1, 2, 0xAA, 0xBB,                               // Some(fingerprint): tag, length, bytes
        1, 2, b'o', b'k',                               // Some(result): tag, length, bytes
    ];
    assert_eq!(full.encode(), golden_full);
    assert_eq!(Record::decode(golden_full), Ok(full));
}

#[test]
fn decoder_rejects_what_is_not_one_record() {
    let good = record(State::Done, 9, 1, 1, 9).encode();
    assert_eq!(Record::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(Record::decode(&[3, 0]), Err(DecodeError::UnknownVersion(3)));
    assert_eq!(Record::decode(&[0, 0]), Err(DecodeError::UnknownVersion(0)));
    assert!(matches!(
        Record::decode(&good[..good.len() - 1]),
        Err(DecodeError::Malformed(_))
    ));
    assert!(
        matches!(
            Record::decode(&[2, 9, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Malformed(_))
        ),
        "state 9"
    );
    let mut long = good.clone();
    long.push(0);
    assert_eq!(Record::decode(&long), Err(DecodeError::TrailingBytes(1)));
    // A length prefix far beyond the bytes present is an error, not an allocation.
    assert!(Record::decode(&[2, 0, 1, 1, 1, 1, 1, 0xFC, 0xFF, 0xFF, 0xFF, 0x7F]).is_err());
}

fn fixture(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/format-v{version}"))
}

/// Copies a committed fixture into a temporary directory (opening upgrades
/// and writes, and the committed copy must stay as it is).
fn copy_fixture(version: u32) -> Result<(tempfile::TempDir, PathBuf), std::io::Error> {
    let copy = tempfile::tempdir()?;
    let path = copy.path().join("db");
    std::fs::create_dir(&path)?;
    for entry in std::fs::read_dir(fixture(version))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), path.join(entry.file_name()))?;
        }
    }
    Ok((copy, path))
}

/// Clock of the fixture: keys were written at this time with a 1-hour ttl.
const FIXTURE_T0: u64 = 1_800_000_000_000;
const FIXTURE_TTL: Duration = Duration::from_secs(3600);

/// Writes the fixture database of the current format version (run by hand,
/// once per format version):
/// `cargo test --test format -- --ignored write_fixture`.
///
/// Version 1 held keys 0..6 of the default namespace: 0..3 done, 3..5
/// pending, 5 released. Version 2 adds a `billing` namespace with a
/// fingerprinted claim (key 10) and a cached result (key 11).
#[tokio::test]
#[ignore = "writes tests/fixtures; run by hand when adding a format version"]
async fn write_fixture() -> TestResult {
    let path = fixture(FORMAT_VERSION);
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    let store = SledIdempotencyStore::builder(&path)
        .clock(ManualClock::new(FIXTURE_T0))
        .durability(Durability::Sync)
        .cache_capacity(1 << 20)
        .open()
        .await?;
    for n in 0..6 {
        store.try_claim(&id(n), FIXTURE_TTL).await?;
    }
    for n in 0..3 {
        store.mark_done(&id(n)).await?;
    }
    store.release(&id(5)).await?;
    let billing = store.namespace("billing").await?;
    let _ = billing
        .claim_with_fingerprint(&id(10), FIXTURE_TTL, b"sha256:abc")
        .await?;
    if let ClaimResult::Acquired(lease) = billing.claim(&id(11), FIXTURE_TTL).await? {
        billing.complete_with(&lease, b"receipt-11").await?;
    }
    store.close().await?;
    Ok(())
}

/// Checks what every fixture version holds in the default namespace.
async fn assert_default_namespace(store: &SledIdempotencyStore) -> TestResult {
    for n in 0..3 {
        let record = store
            .get_record(&id(n))
            .await?
            .ok_or("fixture record missing")?;
        assert_eq!(record.state, State::Done);
        assert_eq!(record.expires_at, FIXTURE_T0 + 3_600_000);
        assert_eq!(store.try_claim(&id(n), FIXTURE_TTL).await?, AlreadyDone);
    }
    for n in 3..5 {
        assert_eq!(store.try_claim(&id(n), FIXTURE_TTL).await?, AlreadyPending);
    }
    assert!(store.get_record(&id(5)).await?.is_none());
    let mut tokens: Vec<u64> = Vec::new();
    for n in 0..5 {
        tokens.extend(store.get_record(&id(n)).await?.map(|r| r.token));
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens in claim order: {tokens:?}"
    );
    Ok(())
}

async fn open_fixture(path: &Path) -> Result<SledIdempotencyStore, sled_idempotency::Error> {
    SledIdempotencyStore::builder(path)
        .clock(ManualClock::new(FIXTURE_T0 + 60_000))
        .open()
        .await
}

/// The database committed under `tests/fixtures/format-v1` (written by
/// version 0.1 of this crate) must open and read the same forever, and is
/// upgraded to the current format on open.
#[tokio::test]
async fn the_version_1_fixture_database_still_opens() -> TestResult {
    let (_dir, path) = copy_fixture(1)?;
    let store = open_fixture(&path).await?;
    assert_default_namespace(&store).await?;
    assert_eq!(store.namespaces().await?, vec!["default".to_owned()]);
    // New writes use the current record version; old records stay readable.
    assert_eq!(store.try_claim(&id(5), FIXTURE_TTL).await?, Claimed);
    store.close().await?;
    let db = sled::open(&path)?;
    let version = db
        .open_tree("sled-idempotency/meta")?
        .get("format_version")?;
    assert_eq!(
        version.as_deref(),
        Some(&FORMAT_VERSION.to_be_bytes()[..]),
        "upgraded on open"
    );
    Ok(())
}

/// The format-2 fixture: namespaces, fingerprints and cached results.
#[tokio::test]
async fn the_version_2_fixture_database_still_opens() -> TestResult {
    let (_dir, path) = copy_fixture(2)?;
    let store = open_fixture(&path).await?;
    assert_default_namespace(&store).await?;
    assert_eq!(
        store.namespaces().await?,
        vec!["default".to_owned(), "billing".to_owned()]
    );
    let billing = store.namespace("billing").await?;
    assert_eq!(
        billing
            .claim_with_fingerprint(&id(10), FIXTURE_TTL, b"sha256:other")
            .await?,
        ClaimResult::Conflict { done: false }
    );
    assert_eq!(
        billing.claim(&id(11), FIXTURE_TTL).await?,
        ClaimResult::Done {
            result: Some(b"receipt-11".to_vec())
        }
    );
    assert!(
        store.get_record(&id(10)).await?.is_none(),
        "namespaces are separate keyspaces"
    );
    Ok(())
}
