//! `SledIdempotencyStore`: opening, the three operations, sweeping, closing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{BusError, ClaimOutcome, IdempotencyStore, MessageId};
use sled::IVec;
use tokio::sync::{RwLock, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Builder;
use crate::error::{Error, Result};
use crate::flusher::{Flusher, Syncer};
use crate::machine::{self, Claim, Done, Release};
use crate::record::Record;
use crate::sweeper::{self, SweepReport};

/// Version of the database layout (trees, key and value encoding). Recorded
/// in the metadata tree; a database with a higher number is refused.
pub const FORMAT_VERSION: u32 = 1;

const META_TREE: &str = "sled-idempotency/meta";
const RECORDS_TREE: &str = "sled-idempotency/records";
const FORMAT_KEY: &str = "format_version";

/// A persistent idempotency store on sled.
///
/// Cheap to clone: clones share one database. Dropping the last clone
/// without [`close`](Self::close) stops the sweeper and flushes, but cannot
/// report errors; `close` can.
#[derive(Debug, Clone)]
pub struct SledIdempotencyStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    path: PathBuf,
    state: RwLock<Option<Open>>,
    clock: Arc<dyn Clock>,
    default_ttl_ms: u64,
    done_retention_ms: Option<u64>,
    sweep_batch: usize,
    stop: watch::Sender<bool>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Open {
    db: sled::Db,
    records: sled::Tree,
    flusher: Flusher,
}

impl SledIdempotencyStore {
    /// Opens (or creates) the store at `path` with every default.
    ///
    /// Must be called inside a tokio runtime: it starts the sweeper task.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::builder(path).open().await
    }

    /// A builder for every setting; finish with [`Builder::open`].
    pub fn builder(path: impl AsRef<Path>) -> Builder {
        Builder::new(path)
    }

    pub(crate) async fn open_with(b: Builder) -> Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::InvalidConfig(
                "the store must be opened inside a tokio runtime".into(),
            ));
        }
        let (path, cache) = (b.path.clone(), b.cache_capacity);
        let opened = tokio::task::spawn_blocking(move || open_db(&path, cache)).await;
        let (db, records, log) = match opened {
            Ok(result) => result?,
            Err(join) => {
                return Err(Error::NotADatabase {
                    path: b.path,
                    reason: format!("sled failed while recovering it ({join})"),
                });
            }
        };
        let flusher = Flusher::start(Syncer::new(db.clone(), log), b.durability)?;
        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            path: b.path,
            state: RwLock::new(Some(Open {
                db,
                records,
                flusher,
            })),
            clock: b.clock,
            default_ttl_ms: millis(b.default_ttl),
            done_retention_ms: b.done_retention.map(millis),
            sweep_batch: b.sweep_batch,
            stop,
            sweeper: Mutex::new(None),
        });
        let task = sweeper::spawn(Arc::downgrade(&inner), b.sweep_interval, stop_rx);
        *inner.sweeper.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(Self { inner })
    }

    /// The directory this store was opened at.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Claims `key` for `ttl` if it is absent or expired. See the crate docs
    /// for the full table of outcomes.
    pub async fn try_claim(&self, key: &MessageId, ttl: Duration) -> Result<ClaimOutcome> {
        let inner = &self.inner;
        let ttl_ms = millis(ttl);
        if ttl_ms == 0 {
            return Err(Error::TtlTooShort { ttl });
        }
        let guard = inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let key = key_bytes(key);
        // Optimistic: assume the key is absent, so a new key costs one CAS.
        let mut current: Option<IVec> = None;
        loop {
            let now = inner.clock.now_millis();
            let expires_at = now.checked_add(ttl_ms).ok_or(Error::TtlOverflow { ttl })?;
            let record = decode_at(&key, current.as_deref())?;
            let decision = machine::claim(record.as_ref(), now);
            let Claim::Take { attempts } = decision else {
                return Ok(decision.outcome());
            };
            // sled ids start at 0; tokens start at 1 so that 0 can mean
            // "no claim" in a done record written without one.
            let token = open
                .db
                .generate_id()
                .map_err(Error::storage("generating a fencing token"))?
                .saturating_add(1);
            let new = machine::pending(expires_at, ttl_ms, token, attempts).encode();
            match cas(&open.records, &key, current.as_deref(), Some(new))? {
                Ok(()) => {
                    open.flusher.write_completed().await?;
                    return Ok(ClaimOutcome::Claimed);
                }
                Err(found) => current = found,
            }
        }
    }

    /// Records that the handler for `key` ran to completion.
    pub async fn mark_done(&self, key: &MessageId) -> Result<()> {
        let inner = &self.inner;
        self.update(key, |current, now| {
            match machine::done(current, now, inner.done_retention_ms, inner.default_ttl_ms) {
                Done::AlreadyDone => None,
                Done::Write { record, .. } => Some(Some(record.encode())),
            }
        })
        .await
    }

    /// Gives up a pending claim so the message can be retried. A completed
    /// record is never erased.
    pub async fn release(&self, key: &MessageId) -> Result<()> {
        self.update(key, |current, _| match machine::release(current) {
            Release::Remove => Some(None),
            Release::Keep => None,
        })
        .await
    }

    /// Read, decide, compare-and-swap until the swap lands. `decide` returns
    /// `None` for no write, `Some(None)` to remove, `Some(Some(v))` to store.
    /// Waits for durability even when nothing was written: what the call
    /// acknowledges may be another writer's not-yet-flushed write.
    async fn update<F>(&self, key: &MessageId, decide: F) -> Result<()>
    where
        F: Fn(Option<&Record>, u64) -> Option<Option<Vec<u8>>>,
    {
        let guard = self.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let key = key_bytes(key);
        let mut current = open
            .records
            .get(key)
            .map_err(Error::storage("reading a record"))?;
        loop {
            let record = decode_at(&key, current.as_deref())?;
            let Some(new) = decide(record.as_ref(), self.inner.clock.now_millis()) else {
                break;
            };
            match cas(&open.records, &key, current.as_deref(), new)? {
                Ok(()) => break,
                Err(found) => current = found,
            }
        }
        open.flusher.write_completed().await
    }

    /// The record stored for `key`, live or expired, as it is on disk. An
    /// expired record behaves as absent for every operation; this shows it
    /// until the sweeper removes it. Never waits for a flush.
    pub async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        let guard = self.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let key = key_bytes(key);
        let value = open
            .records
            .get(key)
            .map_err(Error::storage("reading a record"))?;
        decode_at(&key, value.as_deref())
    }

    /// Removes every expired record now, in batches, and reports what it
    /// did. The background sweeper runs the same code periodically.
    pub async fn sweep_expired(&self) -> Result<SweepReport> {
        let mut total = SweepReport::default();
        let mut cursor = Vec::new();
        loop {
            let (report, next) = self.inner.sweep_batch(&cursor).await?;
            total += report;
            match next {
                Some(next) => cursor = next,
                None => return Ok(total),
            }
            tokio::task::yield_now().await;
        }
    }

    /// Stops the sweeper, makes every write durable (flush and fdatasync,
    /// whatever the durability mode) and releases the database lock. Every
    /// later call returns [`Error::Closed`]; closing twice is a no-op.
    pub async fn close(&self) -> Result<()> {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .sweeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The task only ever returns; a join error would mean it was
            // cancelled with its runtime, which leaves nothing to wait for.
            let _ = task.await;
        }
        let Some(mut open) = self.inner.state.write().await.take() else {
            return Ok(());
        };
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            let flushed = open.flusher.shutdown();
            drop(open);
            wait_for_lock_release(&path);
            flushed
        })
        .await
        .map_err(|e| Error::Durability(format!("the final flush did not finish: {e}")))?
    }
}

impl Drop for Inner {
    /// Dropping the last handle without `close`: stop the flusher after a
    /// final flush, drop sled, and wait (bounded) until sled's background
    /// threads let go of the directory lock, so the database can be opened
    /// again right away.
    fn drop(&mut self) {
        if let Some(open) = self.state.get_mut().take() {
            drop(open); // the flusher's Drop does the final flush
            wait_for_lock_release(&self.path);
        }
    }
}

/// Longest `close` or drop waits for sled's background threads to release
/// the directory lock.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// sled hands log writes to its own thread pool, whose jobs hold the
/// database (and its lock file) for a moment after the last `Db` is dropped.
/// Wait until the lock can be taken, so "closed" means "openable again".
fn wait_for_lock_release(path: &Path) {
    let Ok(file) = File::open(path.join("db")) else {
        return;
    };
    let deadline = std::time::Instant::now() + LOCK_RELEASE_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                return;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "the database lock is still held after closing");
                return;
            }
        }
    }
}

impl Inner {
    /// Sweeps up to `sweep_batch` records from `cursor` on. Returns the
    /// cursor to continue from, or `None` at the end of the keyspace.
    pub(crate) async fn sweep_batch(
        &self,
        cursor: &[u8],
    ) -> Result<(SweepReport, Option<Vec<u8>>)> {
        let guard = self.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let scan = sweeper::scan(
            &open.records,
            cursor,
            self.sweep_batch,
            self.clock.now_millis(),
        )?;
        let mut report = scan.report;
        report.removed = sweeper::remove_unchanged(&open.records, &scan.expired)?;
        Ok((report, scan.next))
    }
}

#[async_trait]
impl IdempotencyStore for SledIdempotencyStore {
    async fn try_claim(&self, key: &MessageId, ttl: Duration) -> Result<ClaimOutcome, BusError> {
        Ok(SledIdempotencyStore::try_claim(self, key, ttl).await?)
    }

    async fn mark_done(&self, key: &MessageId) -> Result<(), BusError> {
        Ok(SledIdempotencyStore::mark_done(self, key).await?)
    }

    async fn release(&self, key: &MessageId) -> Result<(), BusError> {
        Ok(SledIdempotencyStore::release(self, key).await?)
    }
}

/// Durations in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn key_bytes(key: &MessageId) -> [u8; 16] {
    *key.as_uuid().as_bytes()
}

pub(crate) fn display_key(key: &[u8]) -> String {
    match uuid::Uuid::from_slice(key) {
        Ok(uuid) => uuid.to_string(),
        Err(_) => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn decode_at(key: &[u8], value: Option<&[u8]>) -> Result<Option<Record>> {
    value
        .map(|bytes| {
            Record::decode(bytes).map_err(|e| Error::Corrupt {
                key: display_key(key),
                reason: e.to_string(),
            })
        })
        .transpose()
}

/// `Ok(Ok(()))` when swapped, `Ok(Err(current))` when someone got there first.
pub(crate) fn cas(
    tree: &sled::Tree,
    key: &[u8],
    old: Option<&[u8]>,
    new: Option<Vec<u8>>,
) -> Result<Result<(), Option<IVec>>> {
    let swapped = tree
        .compare_and_swap(key, old, new)
        .map_err(Error::storage("writing a record"))?;
    Ok(swapped.map_err(|e| e.current))
}

fn open_db(path: &Path, cache_capacity: u64) -> Result<(sled::Db, sled::Tree, File)> {
    let not_a_db = |reason: String| Error::NotADatabase {
        path: path.to_path_buf(),
        reason,
    };
    if path.exists() {
        if !path.is_dir() {
            return Err(Error::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let mut entries =
            std::fs::read_dir(path).map_err(Error::io("reading the database directory"))?;
        let is_sled = path.join("conf").exists() || path.join("db").exists();
        if !is_sled && entries.next().is_some() {
            return Err(not_a_db(
                "the directory is not empty and holds no sled database; refusing to write into it"
                    .into(),
            ));
        }
    }
    let fresh = !path.join("db").exists();
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        // The flusher thread of this crate flushes; sled's own would only
        // add syncs nobody waits for.
        .flush_every_ms(None)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                Error::Locked {
                    path: path.to_path_buf(),
                }
            }
            sled::Error::Io(io) => Error::Io {
                context: "opening the database",
                source: io,
            },
            sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => not_a_db(e.to_string()),
            other => Error::Storage {
                context: "opening the database",
                source: other,
            },
        })?;
    let meta = db
        .open_tree(META_TREE)
        .map_err(Error::storage("opening the metadata tree"))?;
    match meta
        .get(FORMAT_KEY)
        .map_err(Error::storage("reading the format version"))?
    {
        None => {
            meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                .map_err(Error::storage("recording the format version"))?;
        }
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| {
                    not_a_db(format!(
                        "the format version entry is {} bytes, not 4",
                        bytes.len()
                    ))
                })?;
            if found > FORMAT_VERSION {
                return Err(Error::NewerFormat {
                    path: path.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
        }
    }
    let records = db
        .open_tree(RECORDS_TREE)
        .map_err(Error::storage("opening the records tree"))?;
    let log = File::open(path.join("db")).map_err(Error::io("opening the log for fdatasync"))?;
    db.flush().map_err(Error::storage("flushing after open"))?;
    log.sync_data().map_err(Error::io("fdatasync after open"))?;
    if fresh {
        // Make the new files' directory entries durable too.
        File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(Error::io("syncing the new database directory"))?;
    }
    Ok((db, records, log))
}
