//! Compaction in place (feature `admin`): sled never gives disk space back
//! by itself, so the live records are rewritten into a fresh database
//! beside the old one, which is then swapped in with one atomic exchange of
//! the two directories (`renameat2(RENAME_EXCHANGE)`, Linux).
//!
//! At every moment the database's path holds a whole database: the old
//! one until the exchange, the new one (complete and durable before the
//! exchange) after it. A kill at any step leaves at most a directory named
//! `<name>.compact` beside it, which the next compaction removes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{CompactReport, OnProgress, dir_size};
use crate::error::{Error, Result};
use crate::sled_engine::builder::Builder;
use crate::sled_engine::open::{sync_parent, wait_for_lock_release};

/// The steps of [`compact`], reported in this order as each is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompactStep {
    /// The database is open (no worker can open it now) and measured.
    Opened,
    /// The new database is complete and durable beside the old one.
    Copied,
    /// The new database is at the path (the exchange is durable); the
    /// old one is beside it, still open.
    Swapped,
    /// The old database is closed and removed.
    Removed,
}

/// What [`compact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compacted {
    /// What was copied.
    pub report: CompactReport,
    /// The database's size on disk before.
    pub bytes_before: u64,
    /// Its size on disk after.
    pub bytes_after: u64,
}

/// Where the new database is built, beside the one at `path`.
pub(crate) fn compaction_dir(path: &Path) -> Result<PathBuf> {
    let path = std::fs::canonicalize(path).map_err(Error::io("finding the database"))?;
    let name = path.file_name().ok_or_else(|| Error::InvalidPath {
        path: path.clone(),
        reason: "a database at the root of the file system cannot be compacted beside itself",
    })?;
    let mut aside = name.to_os_string();
    aside.push(".compact");
    Ok(path.with_file_name(aside))
}

/// Fails unless `path` is a directory that holds a sled database (without
/// opening it).
pub(crate) fn require_database(path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(Error::NotADatabase {
            path: path.to_path_buf(),
            reason: "nothing is there".into(),
        });
    }
    if !path.is_dir() {
        return Err(Error::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    if !path.join("conf").exists() && !path.join("db").exists() {
        return Err(Error::NotADatabase {
            path: path.to_path_buf(),
            reason: "the directory holds no sled database".into(),
        });
    }
    Ok(())
}

/// Rewrites every record a sweep would keep into a fresh database and
/// swaps it in for the database `builder` names, which no other process
/// may hold ([`Error::Locked`] otherwise). The builder's retention
/// settings decide what a sweep would keep: give it the worker's. The new
/// database's token floor is set above every token the old one handed out
/// (see [`Admin::compact_into`](super::Admin::compact_into)). `progress`
/// counts records read; `on_step` is called as each [`CompactStep`] is
/// reached.
///
/// Crash-safe: a kill at any step leaves the old or the new database whole
/// at the path (`tests/cli.rs` kills the command-line tool at each step).
/// A symbolic link is followed: the directory it points to is compacted.
/// Needs a file system that can exchange two directories atomically
/// (ext4, XFS, Btrfs, tmpfs do), and a database directory that is not a
/// mount point itself (put the database in a directory of the volume).
pub async fn compact(
    builder: Builder,
    progress: Option<OnProgress>,
    mut on_step: impl FnMut(CompactStep),
) -> Result<Compacted> {
    let given = builder.path.clone();
    let (path, aside) = super::blocking(move || {
        require_database(&given)?;
        let path = std::fs::canonicalize(&given).map_err(Error::io("finding the database"))?;
        let aside = compaction_dir(&path)?;
        remove_leftover(&aside)?;
        Ok((path, aside))
    })
    .await?;
    let mut builder = builder
        // Nothing else writes while the copy runs.
        .sweep_interval(Duration::from_secs(365 * 24 * 3600));
    builder.path = path.clone();
    let store = builder.open().await?;
    let bytes_before = store.admin().size_on_disk().await?;
    on_step(CompactStep::Opened);
    let mut admin = store.admin();
    admin.progress = progress;
    let report = match admin.compact_into(&aside).await {
        Ok(report) => report,
        Err(e) => {
            let _ = store.close().await;
            return Err(e);
        }
    };
    on_step(CompactStep::Copied);
    let swapped = {
        let (path, aside) = (path.clone(), aside.clone());
        super::blocking(move || match exchange(&path, &aside) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The new database is not in use: leave nothing beside.
                let _ = std::fs::remove_dir_all(&aside);
                Err(e)
            }
        })
        .await
    };
    if let Err(e) = swapped {
        let _ = store.close().await;
        return Err(e);
    }
    on_step(CompactStep::Swapped);
    // The old database (now beside) gets its final flush, then goes.
    let closed = store.close().await;
    let removed = {
        let aside = aside.clone();
        super::blocking(move || {
            wait_for_lock_release(&aside);
            std::fs::remove_dir_all(&aside).map_err(Error::io("removing the old database"))?;
            sync_parent(&aside)
        })
        .await
    };
    if let Err(e) = closed {
        tracing::warn!(error = %e, "closing the old database after the swap failed; the new one is in place");
    }
    removed?;
    on_step(CompactStep::Removed);
    let bytes_after = super::blocking(move || dir_size(&path)).await?;
    Ok(Compacted {
        report,
        bytes_before,
        bytes_after,
    })
}

/// Removes what an earlier compaction left beside the database: an empty
/// directory or a sled database. Anything else is refused.
fn remove_leftover(aside: &Path) -> Result<()> {
    if !aside.exists() {
        return Ok(());
    }
    let empty = aside.is_dir()
        && std::fs::read_dir(aside)
            .map_err(Error::io("reading a leftover compaction directory"))?
            .next()
            .is_none();
    if !empty && require_database(aside).is_err() {
        return Err(Error::DestinationNotEmpty {
            path: aside.to_path_buf(),
        });
    }
    std::fs::remove_dir_all(aside).map_err(Error::io("removing a leftover compaction directory"))
}

/// Exchanges the two directories atomically and makes the exchange durable.
fn exchange(path: &Path, aside: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, aside, CWD, path, RenameFlags::EXCHANGE).map_err(|e| {
        Error::io("exchanging the new database with the old one (renameat2 RENAME_EXCHANGE)")(
            e.into(),
        )
    })?;
    sync_parent(path)
}
