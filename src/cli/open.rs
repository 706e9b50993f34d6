//! Opening a database for one command: a copy for the read-only commands
//! (so that they change nothing, not even sled's recovery files), the
//! database itself for the others; and the messages when that fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sled_idempotency::{Builder, Error, SledIdempotencyStore};
use tempfile::TempDir;

use crate::show::Bar;

/// Environment variable that makes `compact` stop at a step (`opened`,
/// `copying`, `copied`, `swapped`, `removed`) and wait to be killed: the
/// crash tests use it. Not for production use.
pub(crate) const PAUSE_VARIABLE: &str = "SLED_IDEMPOTENCY_TEST_PAUSE_AT";

/// Fails unless a database is at `path`: no command but `import` creates
/// one.
fn require_database(path: &Path) -> Result<(), String> {
    let why = if !path.exists() {
        "nothing is there"
    } else if !path.is_dir() {
        "it is not a directory"
    } else if !path.join("conf").exists() && !path.join("db").exists() {
        "the directory holds no sled database"
    } else {
        return Ok(());
    };
    Err(format!("no database at {}: {why}", path.display()))
}

/// The bytes a file takes on disk (its allocated blocks: sled's log is
/// sparse, so its length says little).
#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(meta) * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

/// Announces the step on standard error and waits to be killed.
pub(crate) fn pause(step: &str) {
    eprintln!("paused at {step}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Retention settings that decide what counts as forgotten.
#[derive(Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) pending_retention: Option<Duration>,
}

/// The store a command works on.
pub(crate) struct Opened {
    /// The database the user named.
    pub(crate) path: PathBuf,
    /// Its size on disk when opened.
    pub(crate) size_on_disk: u64,
    store: SledIdempotencyStore,
    /// This open created the database (an import into a fresh path).
    pub(crate) created: bool,
    /// The copy a read-only command works on, removed at the end.
    _copy: Option<TempDir>,
}

/// The error for a store that cannot be opened, with what to do.
pub(crate) fn explain(path: &Path, e: Error) -> String {
    match e {
        Error::Locked { .. } => format!(
            "{} is held by another process (a running worker?). sled allows one owner per \
             directory: stop that process, or have it serve this through the library's admin \
             API (SledIdempotencyStore::admin; see examples/admin_http.rs)",
            path.display()
        ),
        e => e.to_string(),
    }
}

/// A builder for the database at `path` with the retention the user gave.
pub(crate) fn builder(path: &Path, settings: Settings) -> Builder {
    let builder = SledIdempotencyStore::builder(path)
        // Sweeps happen only when asked for (`sweep`).
        .sweep_interval(Duration::from_secs(365 * 24 * 3600));
    match settings.pending_retention {
        Some(retention) => builder.pending_retention(retention),
        None => builder,
    }
}

async fn open(path: &Path, settings: Settings) -> Result<SledIdempotencyStore, Error> {
    builder(path, settings).open().await
}

/// Every file under `path`, relative, with its length and the bytes it
/// takes on disk.
fn walk(path: &Path) -> Result<Vec<(PathBuf, u64, u64)>, String> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(path.join(&dir))
            .map_err(|e| format!("cannot read {}: {e}", path.join(&dir).display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let meta = entry
                .metadata()
                .map_err(|e| format!("cannot read {}: {e}", entry.path().display()))?;
            let relative = dir.join(entry.file_name());
            if meta.is_dir() {
                dirs.push(relative);
            } else {
                files.push((relative, meta.len(), allocated(&meta)));
            }
        }
    }
    Ok(files)
}

impl Opened {
    /// A copy of the database at `path`, taken under its lock, opened.
    pub(crate) async fn read_only(path: &Path, settings: Settings) -> Result<Opened, String> {
        require_database(path)?;
        let source = path.to_path_buf();
        let copy = TempDir::with_prefix("sled-idempotency-")
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let target = copy.path().join("db");
        let size = tokio::task::spawn_blocking(move || copy_locked(&source, &target))
            .await
            .map_err(|e| format!("copying the database failed: {e}"))??;
        let store = open(&copy.path().join("db"), settings)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Opened {
            path: path.to_path_buf(),
            size_on_disk: size,
            store,
            created: false,
            _copy: Some(copy),
        })
    }

    /// The database at `path` itself, which must exist.
    pub(crate) async fn in_place(path: &Path, settings: Settings) -> Result<Opened, String> {
        require_database(path)?;
        Self::open_in_place(path, settings).await
    }

    /// The database at `path`, created if nothing (or an empty directory)
    /// is there.
    pub(crate) async fn for_import(path: &Path, settings: Settings) -> Result<Opened, String> {
        let fresh = !path.exists()
            || std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none());
        if !fresh {
            require_database(path)?;
        }
        let mut opened = Self::open_in_place(path, settings).await?;
        opened.created = fresh;
        Ok(opened)
    }

    async fn open_in_place(path: &Path, settings: Settings) -> Result<Opened, String> {
        let store = open(path, settings).await.map_err(|e| explain(path, e))?;
        let size_on_disk = store
            .admin()
            .size_on_disk()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Opened {
            path: path.to_path_buf(),
            size_on_disk,
            store,
            created: false,
            _copy: None,
        })
    }

    pub(crate) fn store(&self) -> &SledIdempotencyStore {
        &self.store
    }

    /// The namespaces a command covers: `only`, which must exist, or all
    /// of them (the default first, the others by name).
    pub(crate) async fn namespaces(&self, only: Option<&str>) -> Result<Vec<String>, String> {
        let mut all = self.store.namespaces().await.map_err(|e| e.to_string())?;
        all[1..].sort();
        match only {
            None => Ok(all),
            Some(name) if all.iter().any(|n| n == name) => Ok(vec![name.to_owned()]),
            Some(name) => Err(format!(
                "{} has no namespace {name:?} (it has: {})",
                self.path.display(),
                all.join(", ")
            )),
        }
    }

    /// A handle on namespace `name`, which must exist (a typo never
    /// creates one).
    pub(crate) async fn handle(&self, name: &str) -> Result<SledIdempotencyStore, String> {
        self.namespaces(Some(name)).await?;
        self.store.namespace(name).await.map_err(|e| e.to_string())
    }

    /// Unix milliseconds now.
    pub(crate) fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub(crate) async fn close(self) -> Result<(), String> {
        self.store.close().await.map_err(|e| e.to_string())
    }
}

/// Copies the database at `source` to `target` while holding its lock, so
/// that no process writes meanwhile, and returns the bytes the source takes
/// on disk. Fails
/// at once if a process holds the lock.
fn copy_locked(source: &Path, target: &Path) -> Result<u64, String> {
    let lock = std::fs::File::open(source.join("db"))
        .map_err(|e| format!("cannot open {}: {e}", source.join("db").display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(explain(
                source,
                Error::Locked {
                    path: source.to_path_buf(),
                },
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", source.display()));
        }
    }
    let files = walk(source)?;
    let total: u64 = files.iter().map(|f| f.1).sum();
    let on_disk: u64 = files.iter().map(|f| f.2).sum();
    let bar = Bar::bytes("reading a copy", total);
    for (relative, size, _) in files {
        let to = target.join(&relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::copy(source.join(&relative), &to)
            .map_err(|e| format!("cannot copy {}: {e}", relative.display()))?;
        bar.add(size);
    }
    // An empty `blobs` directory holds no file: create it as sled would.
    std::fs::create_dir_all(target.join("blobs"))
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    bar.finish();
    drop(lock);
    Ok(on_disk)
}
