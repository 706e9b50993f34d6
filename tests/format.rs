//! The on-disk format is pinned on purpose: a dependency bump (bincode,
//! serde) must not silently change the bytes of existing databases, and a
//! database written by version 1 must keep opening.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestResult, id};
use sled_idempotency::{
    ClaimOutcome::*, DecodeError, Durability, FORMAT_VERSION, ManualClock, RECORD_VERSION, Record,
    SledIdempotencyStore, State,
};

#[test]
fn record_encoding_is_pinned() {
    let record = Record {
        state: State::Pending,
        expires_at: 1_800_000_030_000,
        token: 42,
        attempts: 3,
        ttl_ms: 30_000,
    };
    #[rustfmt::skip]
    let golden: &[u8] = &[
        1,                                              // record version
        0,                                              // State::Pending (varint variant index)
        0xFD, 0x30, 0xC5, 0x5C, 0x18, 0xA3, 0x01, 0, 0, // expires_at: u64 marker + 8 bytes LE
        42,                                             // token (single-byte varint)
        3,                                              // attempts
        0xFB, 0x30, 0x75,                               // ttl_ms 30000: u16 marker + 2 bytes LE
    ];
    assert_eq!(record.encode(), golden);
    assert_eq!(Record::decode(golden), Ok(record));

    let done = Record {
        state: State::Done,
        expires_at: 250,
        token: 0,
        attempts: 0,
        ttl_ms: 251,
    };
    assert_eq!(done.encode(), [1, 1, 250, 0, 0, 0xFB, 251, 0]);
}

#[test]
fn decoder_rejects_what_is_not_one_record() {
    let good = Record {
        state: State::Done,
        expires_at: 9,
        token: 1,
        attempts: 1,
        ttl_ms: 9,
    }
    .encode();
    assert_eq!(Record::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(
        Record::decode(&[RECORD_VERSION + 1, 0]),
        Err(DecodeError::UnknownVersion(2))
    );
    assert!(matches!(
        Record::decode(&good[..good.len() - 1]),
        Err(DecodeError::Malformed(_))
    ));
    assert!(
        matches!(
            Record::decode(&[1, 9, 0, 0, 0, 0]),
            Err(DecodeError::Malformed(_))
        ),
        "state 9"
    );
    let mut long = good.clone();
    long.push(0);
    assert_eq!(Record::decode(&long), Err(DecodeError::TrailingBytes(1)));
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1")
}

/// Clock of the fixture: keys were written at this time with a 1-hour ttl.
const FIXTURE_T0: u64 = 1_800_000_000_000;
const FIXTURE_TTL: Duration = Duration::from_secs(3600);

/// Regenerates the committed fixture database (run by hand, once per
/// format version): `cargo test --test format -- --ignored write_fixture`.
#[tokio::test]
#[ignore = "writes tests/fixtures; run by hand when adding a format version"]
async fn write_fixture() -> TestResult {
    let path = fixture();
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
    store.close().await?;
    Ok(())
}

/// The database committed under `tests/fixtures/format-v1` (format version
/// 1, written by `write_fixture`) must open and read the same forever.
#[tokio::test]
async fn the_version_1_fixture_database_still_opens() -> TestResult {
    assert_eq!(
        FORMAT_VERSION, 1,
        "a new format version needs its own fixture"
    );
    let copy = tempfile::tempdir()?;
    let path = copy.path().join("db");
    std::fs::create_dir(&path)?;
    for entry in std::fs::read_dir(fixture())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), path.join(entry.file_name()))?;
        }
    }
    let store = SledIdempotencyStore::builder(&path)
        .clock(ManualClock::new(FIXTURE_T0 + 60_000))
        .open()
        .await?;
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
