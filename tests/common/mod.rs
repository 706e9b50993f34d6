//! Shared test fixture: a temporary directory, a manual clock, and stores
//! opened on them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sled_idempotency::{Durability, ManualClock, MessageId, SledIdempotencyStore};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Start of the manual clock: an arbitrary, realistic unix time in ms.
pub const T0: u64 = 1_800_000_000_000;
pub const TTL: Duration = Duration::from_secs(30);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("create a temporary directory"),
            clock: ManualClock::new(T0),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    pub async fn open(&self) -> sled_idempotency::Result<SledIdempotencyStore> {
        self.open_with(Durability::Flush).await
    }

    pub async fn open_with(
        &self,
        durability: Durability,
    ) -> sled_idempotency::Result<SledIdempotencyStore> {
        open_at(&self.path(), &self.clock, durability).await
    }

    /// A builder on this fixture's path and clock.
    pub fn builder(&self) -> sled_idempotency::Builder {
        SledIdempotencyStore::builder(self.path()).clock(self.clock.clone())
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

pub async fn open_at(
    path: &Path,
    clock: &ManualClock,
    durability: Durability,
) -> sled_idempotency::Result<SledIdempotencyStore> {
    SledIdempotencyStore::builder(path)
        .durability(durability)
        .clock(clock.clone())
        .open()
        .await
}

/// A deterministic message id.
pub fn id(n: u128) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u128(n))
}

/// Does to a closed database what a crash can do to its expiry index: the
/// notes of the last writes never reach the index, and no clean close
/// leaves the marker that says the index is complete, nor the record
/// counts. The next open must fall back on its one full scan.
pub fn forget_expiry_index(path: &Path) -> sled::Result<()> {
    // No background flusher thread: sled lets go of the directory as soon
    // as the handle is dropped.
    let db = sled::Config::new().path(path).flush_every_ms(None).open()?;
    db.drop_tree("sled-idempotency/expiry")?;
    let meta = db.open_tree("sled-idempotency/meta")?;
    meta.remove("expiry_index_complete")?;
    meta.remove("record_counts")?;
    db.flush()?;
    drop(db);
    wait_for_sled_to_let_go(path);
    Ok(())
}

/// sled's threads hold a dropped database's lock for a moment: waits (up
/// to ten seconds) until it can be taken, so that the next open succeeds.
pub fn wait_for_sled_to_let_go(path: &Path) {
    let Ok(file) = std::fs::File::open(path.join("db")) else {
        return;
    };
    for _ in 0..10_000 {
        if file.try_lock().is_ok() {
            let _ = file.unlock();
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies a directory tree (a closed database, say).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
