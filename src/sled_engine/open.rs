//! Opening a sled database: the directory checks, sled's recovery, the
//! directory fsyncs that make a new or recovered database survive a power
//! cut, the format version, the namespace trees, the fencing-token counter,
//! the registry that makes an `open` wait for a dropped store of this
//! process to let go of the same directory, and the release at the end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::namespace::{DEFAULT_NAMESPACE, validate_namespace};

use super::Open;
use super::expiry::{Counts, Expiries};
use crate::sync::lock;

/// Version of the database layout (trees, key and value encoding). Recorded
/// in the metadata tree; a database with a higher number is refused, one
/// with a lower number is upgraded on open.
///
/// - 1: one records tree, record version 1.
/// - 2: namespaces (one tree each), record version 2 (fingerprint, result).
/// - 3: the expiry index (a build that does not maintain it must not write).
pub const FORMAT_VERSION: u32 = 3;

const META_TREE: &str = "sled-idempotency/meta";
const DEFAULT_TREE: &str = "sled-idempotency/records";
const NAMESPACE_TREE_PREFIX: &str = "sled-idempotency/ns/";
const FORMAT_KEY: &str = "format_version";
/// Added to sled's id counter to make a fencing token (8 bytes, big
/// endian; absent means 0). `import` and `compact` raise it above every
/// token they bring in: a fresh sled database counts its ids from zero.
const TOKEN_FLOOR_KEY: &str = "token_floor";

/// Largest token floor a database may hold (2^63): imports accept tokens
/// up to 2^62, and a compaction's floor is the old database's next token.
pub(crate) const MAX_TOKEN_FLOOR: u64 = 1 << 63;

pub(crate) fn meta_tree(db: &sled::Db) -> Result<sled::Tree> {
    db.open_tree(META_TREE)
        .map_err(Error::storage("opening the metadata tree"))
}

/// The names of sled's trees this crate writes: its metadata tree and one
/// tree per namespace. Any other tree (besides sled's own default tree) in
/// a database is a sign of damage or of another program's data.
pub(crate) fn is_known_tree(name: &[u8]) -> bool {
    name == META_TREE.as_bytes()
        || name == super::expiry::INDEX_TREE.as_bytes()
        || name == DEFAULT_TREE.as_bytes()
        || name == b"__sled__default"
        || name
            .strip_prefix(NAMESPACE_TREE_PREFIX.as_bytes())
            .and_then(|ns| std::str::from_utf8(ns).ok())
            .is_some_and(|ns| validate_namespace(ns).is_ok())
}

/// The token floor recorded in `meta`.
pub(crate) fn token_floor(meta: &sled::Tree) -> Result<u64> {
    match meta
        .get(TOKEN_FLOOR_KEY)
        .map_err(Error::storage("reading the token floor"))?
    {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| Error::Corrupt {
                key: format!("{TOKEN_FLOOR_KEY} (metadata)"),
                reason: format!("the entry is {} bytes, not 8", bytes.len()),
            }),
    }
}

/// Records `floor` as the token floor (not yet durable: the caller syncs).
pub(crate) fn set_token_floor(meta: &sled::Tree, floor: u64) -> Result<()> {
    meta.insert(TOKEN_FLOOR_KEY, &floor.to_be_bytes())
        .map_err(Error::storage("recording the token floor"))?;
    Ok(())
}

pub(crate) fn namespace_tree(name: &str) -> String {
    if name == DEFAULT_NAMESPACE {
        DEFAULT_TREE.to_owned()
    } else {
        format!("{NAMESPACE_TREE_PREFIX}{name}")
    }
}

/// Longest `close` or drop waits for sled's background threads to release
/// the directory lock.
pub(crate) const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Databases of this process whose last handle was dropped and which a
/// background thread is still flushing and releasing (canonical paths).
static RELEASING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static RELEASED: Condvar = Condvar::new();

pub(crate) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Marks `key` (a canonical path) as being released, or released.
pub(crate) fn releasing(key: &Path, started: bool) {
    let mut paths = lock(&RELEASING);
    if started {
        paths.push(key.to_path_buf());
    } else if let Some(i) = paths.iter().position(|p| p == key) {
        paths.swap_remove(i);
        RELEASED.notify_all();
    }
}

/// Waits (at most `limit`) until no dropped store of this process is still
/// releasing the database at `path`. Blocking.
pub(crate) fn wait_until_released(path: &Path, limit: Duration) {
    let key = canonical(path);
    let deadline = Instant::now() + limit;
    let mut paths = lock(&RELEASING);
    while paths.contains(&key) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        paths = RELEASED
            .wait_timeout(paths, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// sled hands log writes to its own thread pool, whose jobs hold the
/// database (and its lock file) for a moment after the last `Db` is dropped.
/// Wait until the lock can be taken, so "closed" means "openable again".
pub(crate) fn wait_for_lock_release(path: &Path) {
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

/// What `open_db` found and opened.
pub(crate) struct Opened {
    pub(crate) db: sled::Db,
    pub(crate) names: Vec<String>,
    pub(crate) trees: Vec<sled::Tree>,
    /// The log file, for fdatasync.
    pub(crate) log: File,
    /// The format version the database had before this open (`None` for a
    /// new database).
    pub(crate) format_found: Option<u32>,
    pub(crate) token_floor: u64,
    pub(crate) expiries: Expiries,
}

/// Opens (or creates) the database at `path`. `pending_ms`: the pending
/// retention this open forgets pending records by (see `Expiries::open`).
pub(crate) fn open_db(path: &Path, cache_capacity: u64, pending_ms: u64) -> Result<Opened> {
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
    // The directories sled is about to create (the database's and any
    // missing ancestors): each one's entry in its parent must be synced.
    let created: Vec<&Path> = path
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
        .collect();
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
                source: crate::error::StorageError(other),
            },
        })?;
    // sled creates its files and directory (on the first open) and, while
    // recovering, renames a new snapshot into place and deletes the old one,
    // without syncing a directory. Until the directory entries are durable a
    // power cut can undo them: a database created moments ago vanishes, or a
    // database reopens from no snapshot at all after its log segments were
    // reused, empty and without an error. Make them durable before the first
    // write of this open.
    sync_directories(path, &created)?;
    let meta = meta_tree(&db)?;
    let found = match meta
        .get(FORMAT_KEY)
        .map_err(Error::storage("reading the format version"))?
    {
        None => None,
        Some(bytes) => Some(
            <[u8; 4]>::try_from(bytes.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| {
                    not_a_db(format!(
                        "the format version entry is {} bytes, not 4",
                        bytes.len()
                    ))
                })?,
        ),
    };
    match found {
        Some(found) if found > FORMAT_VERSION => {
            return Err(Error::NewerFormat {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        Some(FORMAT_VERSION) => {}
        // New database, or an older format this build reads: from now on
        // it may hold version-2 records, so an older build must refuse it.
        _ => {
            meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                .map_err(Error::storage("recording the format version"))?;
        }
    }
    let token_floor = token_floor(&meta).map_err(|e| not_a_db(e.to_string()))?;
    if token_floor > MAX_TOKEN_FLOOR {
        return Err(not_a_db(format!(
            "the token floor {token_floor} leaves fencing tokens no room to grow"
        )));
    }
    let mut names = vec![DEFAULT_NAMESPACE.to_owned()];
    for name in db.tree_names() {
        if let Some(ns) = name.strip_prefix(NAMESPACE_TREE_PREFIX.as_bytes())
            && let Ok(ns) = std::str::from_utf8(ns)
            && validate_namespace(ns).is_ok()
        {
            names.push(ns.to_owned());
        }
    }
    names[1..].sort();
    let trees = names
        .iter()
        .map(|name| db.open_tree(namespace_tree(name)))
        .collect::<sled::Result<Vec<_>>>()
        .map_err(Error::storage("opening the namespace trees"))?;
    // sled restarts its id counter at "last persisted value + 2 intervals"
    // and persists that new starting point lazily, in a log write nothing
    // flushes. Killed before a flush, the process would restart at the same
    // point and reuse fencing tokens it already handed out. Drawing one id
    // now writes the new starting point, and the flush below makes it
    // durable before any token leaves the store.
    db.generate_id()
        .map_err(Error::storage("persisting the fencing-token counter"))?;
    // Takes the expiry index's complete marker out; the flush below makes
    // that durable before any write of this open.
    let expiries = Expiries::open(&db, &meta, pending_ms, found.is_none())?;
    let log = File::open(path.join("db")).map_err(Error::io("opening the log for fdatasync"))?;
    db.flush().map_err(Error::storage("flushing after open"))?;
    log.sync_data().map_err(Error::io("fdatasync after open"))?;
    Ok(Opened {
        db,
        names,
        trees,
        log,
        format_found: found,
        token_floor,
        expiries,
    })
}

/// fsyncs sled's configuration file, the database directory, its `blobs`
/// directory, the directory that holds it, and the parent of every
/// directory in `created`.
fn sync_directories(path: &Path, created: &[&Path]) -> Result<()> {
    let sync = |p: &Path| File::open(p).and_then(|f| f.sync_all());
    sync(&path.join("conf")).map_err(Error::io("syncing the database configuration file"))?;
    sync(&path.join("blobs")).map_err(Error::io("syncing the database's blobs directory"))?;
    sync(path).map_err(Error::io("syncing the database directory"))?;
    sync(&parent(path)).map_err(Error::io("syncing the directory that holds the database"))?;
    for dir in created.iter().skip(1) {
        sync(&parent(dir)).map_err(Error::io("syncing the parent of a new directory"))?;
    }
    Ok(())
}

/// The directory that holds `path` (`.` for a bare name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsyncs the directory that holds `path`, so that a rename or removal of
/// `path` survives a power cut.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    File::open(parent(path))
        .and_then(|f| f.sync_all())
        .map_err(Error::io("syncing the directory that holds the database"))
}

/// Stops the flusher after a final flush (unless latched; `counts` go with
/// the expiry index's marker), drops sled and
/// waits (bounded) for its threads to let go of the directory lock.
/// Blocking. sled 0.34 unwraps an fsync in its own `Drop`, which panics on a
/// failing disk: that panic is caught here, and the failure that latched the
/// store is what the caller sees.
pub(crate) fn release(mut open: Open, path: &Path, counts: Option<&Counts>) -> Result<()> {
    // No writer is left: the last notes, then the marker, then the flush.
    // A failure latches the store, and the shutdown below reports it.
    if open.flusher.check().is_ok() {
        let sealed = open.expiries.seal(counts, || open.flusher.sync_blocking());
        let _ = open.latch_on(sealed);
    }
    let flushed = open.flusher.shutdown();
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(open)));
    wait_for_lock_release(path);
    match (flushed, dropped) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(_)) => Err(Error::PreviousIo {
            cause: "sled panicked while closing the database".into(),
        }),
    }
}
