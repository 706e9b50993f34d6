//! Every bad input listed in the "Errors" of docs/semantics.md is a clear error, never a panic, and leaves
//! stored data intact.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, forget_expiry_index, id, open_at, wait_for_sled_to_let_go};
use sled_idempotency::{
    ClaimOutcome::*, DEFAULT_PENDING_RETENTION, Durability, Error, FORMAT_VERSION, MAX_WAIT,
    SledIdempotencyStore,
};

const RECORDS_TREE: &str = "sled-idempotency/records";
const META_TREE: &str = "sled-idempotency/meta";

/// A store holding: key 1 done, key 2 pending.
async fn seeded(fx: &Fixture) -> Result<SledIdempotencyStore, Error> {
    let store = fx.open().await?;
    store.try_claim(&id(1), TTL).await?;
    store.mark_done(&id(1)).await?;
    store.try_claim(&id(2), TTL).await?;
    Ok(store)
}

async fn assert_seed_intact(store: &SledIdempotencyStore) -> TestResult {
    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyDone);
    assert_eq!(store.try_claim(&id(2), TTL).await?, AlreadyPending);
    Ok(())
}

#[tokio::test]
async fn zero_and_sub_millisecond_ttls_are_refused() -> TestResult {
    let fx = Fixture::new();
    let store = seeded(&fx).await?;
    for ttl in [Duration::ZERO, Duration::from_micros(999)] {
        for key in [id(1), id(2), id(3)] {
            let err = store
                .try_claim(&key, ttl)
                .await
                .expect_err("ttl below 1 ms");
            assert!(matches!(err, Error::TtlTooShort { .. }), "{err}");
            assert!(err.to_string().contains("at least 1 ms"), "{err}");
        }
    }
    assert!(store.get_record(&id(3)).await?.is_none());
    assert_seed_intact(&store).await
}

#[tokio::test]
async fn a_ttl_whose_expiry_overflows_is_refused() -> TestResult {
    let fx = Fixture::new();
    let store = seeded(&fx).await?;
    let huge = Duration::from_millis(u64::MAX - common::T0 + 1);
    for ttl in [Duration::MAX, huge] {
        let err = store
            .try_claim(&id(3), ttl)
            .await
            .expect_err("overflowing ttl");
        assert!(matches!(err, Error::TtlOverflow { .. }), "{err}");
    }
    // The largest ttl that fits is accepted.
    let fits = Duration::from_millis(u64::MAX - common::T0 - 1);
    assert_eq!(store.try_claim(&id(4), fits).await?, Claimed);
    assert!(store.get_record(&id(3)).await?.is_none());
    assert_seed_intact(&store).await
}

#[tokio::test]
async fn a_directory_in_use_is_refused_with_locked() -> TestResult {
    let fx = Fixture::new();
    let store = seeded(&fx).await?;
    let err = fx
        .open()
        .await
        .expect_err("second open of a locked directory");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert_seed_intact(&store).await?;
    store.close().await?;
    assert_seed_intact(&fx.open().await?).await
}

#[tokio::test]
async fn a_path_that_is_a_file_is_refused() -> TestResult {
    let fx = Fixture::new();
    let file = fx.dir.path().join("a-file");
    std::fs::write(&file, b"precious")?;
    let err = open_at(&file, &fx.clock, Durability::Flush)
        .await
        .expect_err("file path");
    assert!(matches!(err, Error::NotADirectory { .. }), "{err}");
    assert_eq!(std::fs::read(&file)?, b"precious", "the file is untouched");
    Ok(())
}

#[tokio::test]
async fn a_path_below_a_file_is_an_io_error() -> TestResult {
    let fx = Fixture::new();
    let file = fx.dir.path().join("a-file");
    std::fs::write(&file, b"precious")?;
    let err = open_at(&file.join("db"), &fx.clock, Durability::Flush)
        .await
        .expect_err("path below a file");
    assert!(
        matches!(err, Error::Io { .. } | Error::NotADirectory { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&file)?, b"precious");
    Ok(())
}

#[tokio::test]
async fn a_non_empty_directory_without_a_database_is_refused() -> TestResult {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("photos");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("cat.jpg"), b"meow")?;
    let err = open_at(&dir, &fx.clock, Durability::Flush)
        .await
        .expect_err("foreign directory");
    assert!(matches!(err, Error::NotADatabase { .. }), "{err}");
    let names: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("cat.jpg")],
        "nothing was written into it"
    );
    Ok(())
}

#[tokio::test]
async fn garbage_database_files_are_refused() -> TestResult {
    let fx = Fixture::new();
    let dir = fx.path();
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("conf"), vec![0xAB; 64])?;
    std::fs::write(dir.join("db"), vec![0xCD; 4096])?;
    let err = open_at(&dir, &fx.clock, Durability::Flush)
        .await
        .expect_err("garbage files");
    assert!(matches!(err, Error::NotADatabase { .. }), "{err}");
    Ok(())
}

/// Set in the child that re-runs the unreadable-directory test without the
/// capabilities that let root read any directory.
const NO_DAC_CHILD: &str = "SLED_IDEMPOTENCY_NO_DAC_CHILD";

/// An unreadable directory is an `Io` error. Root reads a mode-000
/// directory (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), and CI runs as root,
/// so there the test re-runs itself with those capabilities dropped from
/// the bounding set (`setpriv`, util-linux) instead of skipping.
#[tokio::test]
async fn an_unreadable_directory_is_an_error() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let dir = fx.dir.path().join("locked-away");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("conf"), b"x")?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o000))?;
    if std::fs::read_dir(&dir).is_ok() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        if std::env::var_os(NO_DAC_CHILD).is_some() {
            return Err("the child can still read a mode-000 directory".into());
        }
        let output = std::process::Command::new("setpriv")
            .args(["--bounding-set", "-dac_override,-dac_read_search"])
            .arg(std::env::current_exe()?)
            .args([
                "an_unreadable_directory_is_an_error",
                "--exact",
                "--test-threads=1",
            ])
            .env(NO_DAC_CHILD, "1")
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the test without DAC capabilities failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return Ok(());
    }
    let result = open_at(&dir, &fx.clock, Durability::Flush).await;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let err = result.expect_err("unreadable directory");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_newer_format_is_refused_and_left_untouched() -> TestResult {
    let fx = Fixture::new();
    seeded(&fx).await?.close().await?;
    {
        let db = sled::open(fx.path())?;
        db.open_tree(META_TREE)?
            .insert("format_version", &(FORMAT_VERSION + 1).to_be_bytes())?;
        db.flush()?;
    }
    wait_for_sled_to_let_go(&fx.path());
    let err = fx.open().await.expect_err("newer format");
    match &err {
        Error::NewerFormat {
            found, supported, ..
        } => {
            assert_eq!((*found, *supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
        }
        other => return Err(format!("expected NewerFormat, got {other}").into()),
    }
    assert!(err.to_string().contains("upgrade"), "{err}");
    let db = sled::open(fx.path())?;
    assert_eq!(db.open_tree(RECORDS_TREE)?.len(), 2, "records untouched");
    Ok(())
}

#[tokio::test]
async fn a_corrupted_value_is_reported_by_key_and_other_keys_keep_working() -> TestResult {
    let fx = Fixture::new();
    seeded(&fx).await?.close().await?;
    let bad = id(0xBAD);
    let garbage: &[u8] = &[1, 7, 0xFF, 0xFF];
    {
        let db = sled::open(fx.path())?;
        db.open_tree(RECORDS_TREE)?
            .insert(bad.as_uuid().as_bytes(), garbage)?;
        db.flush()?;
    }
    wait_for_sled_to_let_go(&fx.path());
    // As after a crash: the first sweep reads every record.
    forget_expiry_index(&fx.path())?;
    let store = fx.open().await?;
    let errors = [
        store.try_claim(&bad, TTL).await.map(|_| ()),
        store.mark_done(&bad).await,
        store.release(&bad).await,
        store.get_record(&bad).await.map(|_| ()),
    ];
    for result in errors {
        match result {
            Err(err @ Error::Corrupt { .. }) => {
                assert!(err.to_string().contains(&bad.to_string()), "{err}")
            }
            other => return Err(format!("expected Corrupt, got {other:?}").into()),
        }
    }
    assert_seed_intact(&store).await?;
    // Past every expiry and the pending claim's retention: both records
    // are forgotten and swept, the corrupted one is skipped.
    fx.advance(DEFAULT_PENDING_RETENTION + Duration::from_secs(3600));
    let report = store.sweep_expired().await?;
    assert_eq!((report.examined, report.removed, report.corrupt), (3, 2, 1));
    store.close().await?;
    let db = sled::open(fx.path())?;
    let kept = db.open_tree(RECORDS_TREE)?.get(bad.as_uuid().as_bytes())?;
    assert_eq!(
        kept.as_deref(),
        Some(garbage),
        "the corrupted value is left for inspection"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_builder_settings_are_refused() -> TestResult {
    let fx = Fixture::new();
    let cases = [
        SledIdempotencyStore::builder(fx.path()).sweep_interval(Duration::ZERO),
        SledIdempotencyStore::builder(fx.path()).default_ttl(Duration::ZERO),
        SledIdempotencyStore::builder(fx.path()).done_retention(Duration::from_micros(10)),
        SledIdempotencyStore::builder(fx.path()).sweep_batch(0),
        SledIdempotencyStore::builder(fx.path()).durability(Durability::Periodic(Duration::ZERO)),
        SledIdempotencyStore::builder(fx.path()).durability_timeout(Duration::ZERO),
        // Regression: these overflowed the monotonic clock and panicked.
        SledIdempotencyStore::builder(fx.path()).durability_timeout(Duration::MAX),
        SledIdempotencyStore::builder(fx.path()).sweep_interval(Duration::MAX),
        SledIdempotencyStore::builder(fx.path()).sweep_interval(MAX_WAIT + Duration::from_secs(1)),
    ];
    for builder in cases {
        let err = builder.open().await.expect_err("invalid setting");
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }
    assert!(!fx.path().exists(), "nothing was created");
    Ok(())
}

#[test]
fn opening_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let fx = Fixture::new();
    let result = futures_lite_block_on(SledIdempotencyStore::open(fx.path()));
    assert!(matches!(result, Err(Error::NoRuntime)), "{result:?}");
}

/// Polls a future to completion without any runtime.
fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

#[tokio::test]
async fn errors_convert_into_bus_error_with_their_message() -> TestResult {
    let err = Error::TtlTooShort {
        ttl: Duration::ZERO,
    };
    let text = err.to_string();
    match sled_idempotency::BusError::from(err) {
        sled_idempotency::BusError::Idempotency(msg) => assert_eq!(msg, text),
        other => return Err(format!("wrong variant {other}").into()),
    }
    Ok(())
}
