//! The admin API of the sled store, for the people who run a worker: what
//! a namespace holds (census), filtered listings for poison-message hunts,
//! a check of every record and of the metadata, sweeps with progress,
//! export and import (feature `admin`), and a rewrite into a fresh
//! database (compaction). The `sled-idempotency` command-line tool is built
//! on these; a worker that holds the database (sled allows one owner per
//! directory) can serve them itself.
//!
//! Every walk runs on a blocking thread, never on an async worker thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bus_core::MessageId;

use super::{SledEngine, blocking};
use crate::error::{Error, Result};
use crate::machine;
use crate::record::{MAX_FINGERPRINT_LEN, MAX_RESULT_LIMIT, Record, State};
use crate::sled_engine::expiry::Counts;
use crate::sled_engine::keyspace::{cas, display_key, next_token};
use crate::sled_engine::open::{
    FORMAT_VERSION, is_known_tree, meta_tree, namespace_tree, open_db, set_token_floor,
    token_floor, wait_for_lock_release,
};
use crate::sled_engine::sweeper::SweepReport;

#[cfg(feature = "admin")]
mod compact;
#[cfg(feature = "admin")]
mod transfer;
#[cfg(feature = "admin")]
pub use compact::{CompactStep, Compacted, compact};
#[cfg(feature = "admin")]
pub use transfer::{EXPORT_SCHEMA, Exported, ImportReport, MAX_IMPORTED_TOKEN, OnConflict};

/// Called with the number of records walked so far (every few thousand
/// records, and at the end).
pub type OnProgress = Arc<dyn Fn(u64) + Send + Sync>;

/// How often a walk reports progress, in records.
const PROGRESS_EVERY: u64 = 4096;

/// The admin operations of one store handle; from
/// [`Store::admin`](crate::Store::admin). Those that read records
/// ([`census`](Self::census), [`list`](Self::list),
/// `export`) act on the handle's namespace; those that check or
/// rewrite the database ([`verify`](Self::verify), [`sweep`](Self::sweep),
/// `import`, [`compact_into`](Self::compact_into)) act on all
/// of it.
#[derive(Clone)]
pub struct Admin<'a> {
    store: &'a SledEngine,
    progress: Option<OnProgress>,
}

impl std::fmt::Debug for Admin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("namespace", &self.store.namespace_name())
            .finish_non_exhaustive()
    }
}

/// Which records [`Admin::list`] returns: a page of records in key order
/// (UUIDv7 ids sort by time).
#[derive(Debug, Clone)]
pub struct ListFilter {
    state: Option<State>,
    min_attempts: u32,
    after: Option<MessageId>,
    limit: usize,
    expired: bool,
}

impl ListFilter {
    /// Up to `limit` live records of any state.
    pub fn new(limit: usize) -> Self {
        Self {
            state: None,
            min_attempts: 0,
            after: None,
            limit,
            expired: false,
        }
    }

    /// Only records in `state`.
    pub fn state(mut self, state: State) -> Self {
        self.state = Some(state);
        self
    }

    /// Only records claimed at least `attempts` times (poison messages).
    pub fn min_attempts(mut self, attempts: u32) -> Self {
        self.min_attempts = attempts;
        self
    }

    /// Only keys after `key`: the last key of the previous page.
    pub fn after(mut self, key: MessageId) -> Self {
        self.after = Some(key);
        self
    }

    /// Also expired records not swept yet.
    pub fn include_expired(mut self, yes: bool) -> Self {
        self.expired = yes;
        self
    }

    fn wants(&self, record: &Record, now: u64) -> bool {
        (self.expired || record.is_live(now))
            && self.state.is_none_or(|s| s == record.state)
            && record.attempts >= self.min_attempts
    }
}

/// Lower bounds of the buckets of [`Census::attempts`]: 0 (a `mark_done`
/// with no claim), 1, 2, 3, 4–7, 8–15, 16 and more.
pub const ATTEMPTS_BUCKETS: [u32; 7] = [0, 1, 2, 3, 4, 8, 16];

/// What one namespace holds now, from one walk of its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Census {
    /// The namespace.
    pub namespace: String,
    /// Live pending records (claims in flight).
    pub live_pending: u64,
    /// Live done records.
    pub live_done: u64,
    /// Expired records not swept yet (still on disk).
    pub expired: u64,
    /// Of those, the ones a sweep would remove now (an expired pending
    /// claim is remembered for `pending_retention` first).
    pub sweepable: u64,
    /// Values that do not decode.
    pub corrupt: u64,
    /// Live records by attempts: `attempts[i]` counts records whose
    /// attempts are at least [`ATTEMPTS_BUCKETS`]`[i]` and below the next
    /// bound.
    pub attempts: [u64; ATTEMPTS_BUCKETS.len()],
    /// Bytes of keys and values (sled's pages and log add to this; the
    /// database's size on disk is [`Admin::size_on_disk`]).
    pub record_bytes: u64,
}

/// One problem [`Admin::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The namespace, when the problem is in one.
    pub namespace: Option<String>,
    /// The key, when the problem is one record (as a UUID when it is 16
    /// bytes, as hex otherwise).
    pub key: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.namespace, &self.key) {
            (Some(ns), Some(key)) => write!(f, "namespace {ns}, key {key}: {}", self.reason),
            (Some(ns), None) => write!(f, "namespace {ns}: {}", self.reason),
            _ => write!(f, "metadata: {}", self.reason),
        }
    }
}

/// What [`Admin::verify`] read and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Records read, in every namespace.
    pub examined: u64,
    /// Namespaces read.
    pub namespaces: u64,
    /// Every problem found; empty for a sound database.
    pub problems: Vec<Problem>,
}

/// The expiry index's size ([`Admin::expiry_index`]): what the sweeper
/// keeps to find forgotten records without reading every record. At steady
/// traffic it follows the records that are live or remembered, not the
/// messages seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexSize {
    /// Index entries (one per namespace and second, at most 64 notes each).
    pub entries: u64,
    /// Notes in them: keys to look at when their second comes.
    pub notes: u64,
    /// Bytes of the entries' keys and values (sled's pages add to this).
    pub bytes: u64,
}

/// What [`Admin::compact_into`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactReport {
    /// Records copied (every record a sweep would keep).
    pub records: u64,
    /// Records left behind because a sweep would remove them.
    pub dropped: u64,
    /// Values that do not decode, copied unchanged (`verify` names them).
    pub corrupt: u64,
    /// Namespaces created in the new database.
    pub namespaces: u64,
    /// The new database's token floor: every token it hands out is larger.
    pub token_floor: u64,
}

impl SledEngine {
    pub(crate) fn admin(&self) -> Admin<'_> {
        Admin {
            store: self,
            progress: None,
        }
    }
}

impl crate::store::Store<SledEngine> {
    /// The admin operations, for tools and for workers that expose them
    /// (see `examples/admin_http.rs`).
    pub fn admin(&self) -> Admin<'_> {
        self.engine.admin()
    }
}

/// Ticks `progress` every [`PROGRESS_EVERY`] records.
struct Ticker {
    progress: Option<OnProgress>,
    seen: u64,
}

impl Ticker {
    fn new(progress: Option<OnProgress>) -> Self {
        Self { progress, seen: 0 }
    }

    fn tick(&mut self) {
        self.seen += 1;
        if self.seen.is_multiple_of(PROGRESS_EVERY) {
            self.report();
        }
    }

    fn report(&self) {
        if let Some(progress) = &self.progress {
            progress(self.seen);
        }
    }
}

impl Admin<'_> {
    /// Calls `progress` with the number of records walked so far while a
    /// walk runs.
    pub fn progress(mut self, progress: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// The format version the database had when this store opened it
    /// (`None` for a database this open created). An older format is
    /// upgraded to [`FORMAT_VERSION`] on open.
    pub fn format_found(&self) -> Option<u32> {
        self.store.inner.format_found
    }

    /// The expiry index's size, database-wide: one walk of the index (not
    /// of the records), on a blocking thread.
    pub async fn expiry_index(&self) -> Result<IndexSize> {
        self.store
            .scan(|open, _| {
                let (entries, notes, bytes) = open.expiries.size()?;
                Ok(IndexSize {
                    entries,
                    notes,
                    bytes,
                })
            })
            .await
    }

    /// Bytes the database's files take on disk now.
    pub async fn size_on_disk(&self) -> Result<u64> {
        let path = self.store.path().to_path_buf();
        blocking(move || dir_size(&path)).await
    }

    /// What the namespace holds now: one walk of its records.
    pub async fn census(&self) -> Result<Census> {
        let now = self.store.inner.clock.now_millis();
        let rules = self.store.inner.retention;
        let mut ticker = Ticker::new(self.progress.clone());
        let namespace = self.store.namespace_name().to_owned();
        self.store
            .scan(move |_, tree| {
                let mut census = Census {
                    namespace,
                    ..Census::default()
                };
                for entry in tree.iter() {
                    let (key, value) = entry.map_err(Error::storage("counting records"))?;
                    ticker.tick();
                    census.record_bytes += (key.len() + value.len()) as u64;
                    let Ok(record) = Record::decode(&value) else {
                        census.corrupt += 1;
                        continue;
                    };
                    if !record.is_live(now) {
                        census.expired += 1;
                        census.sweepable += u64::from(machine::sweepable(&record, now, rules));
                        continue;
                    }
                    match record.state {
                        State::Pending => census.live_pending += 1,
                        State::Done => census.live_done += 1,
                    }
                    let bucket = ATTEMPTS_BUCKETS
                        .iter()
                        .rposition(|&min| record.attempts >= min)
                        .unwrap_or(0);
                    census.attempts[bucket] += 1;
                }
                ticker.report();
                Ok(census)
            })
            .await
    }

    /// A page of the namespace's records in key order that pass `filter`.
    /// Corrupted values are skipped (and logged). A listing of pending
    /// records only reads the store's index of pending keys (see
    /// [`Store::list`](crate::Store::list)).
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<(MessageId, Record)>> {
        let now = self.store.inner.clock.now_millis();
        let filter = filter.clone();
        let space = self.store.space.clone();
        let after = filter.after.as_ref().map(super::key_bytes);
        self.store
            .scan(move |_, tree| {
                let mut out = Vec::new();
                let id = |key: [u8; 16]| MessageId::from_uuid(uuid::Uuid::from_bytes(key));
                if filter.state == Some(State::Pending) {
                    space.pending.page(tree, after, filter.limit, |key, r| {
                        let wanted = filter.wants(&r, now);
                        if wanted {
                            out.push((id(key), r));
                        }
                        wanted
                    })?;
                    return Ok(out);
                }
                let start = after.map(|k| [&k[..], &[0]].concat()).unwrap_or_default();
                for entry in tree.range(start..) {
                    if out.len() >= filter.limit {
                        break;
                    }
                    let (key, value) = entry.map_err(Error::storage("listing records"))?;
                    let Ok(key) = <[u8; 16]>::try_from(key.as_ref()) else {
                        continue;
                    };
                    match Record::decode(&value) {
                        Ok(r) if filter.wants(&r, now) => out.push((id(key), r)),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(key = %display_key(&key), error = %e, "listing skipped a corrupted record");
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    /// Reads the metadata and every record of every namespace, and reports
    /// each problem: a value that does not decode, a key that is not 16
    /// bytes, a record that breaks an invariant (a pending claim without a
    /// token or an attempt, an oversized fingerprint or result, a token
    /// the database could still hand out), an unknown tree, a bad
    /// metadata entry. Changes nothing but sled's id counter (one id).
    pub async fn verify(&self) -> Result<VerifyReport> {
        let guard = self.store.inner.state.clone().read_owned().await;
        let names = self.store.namespaces();
        let progress = self.progress.clone();
        blocking(move || {
            let open = guard.as_ref().ok_or(Error::Closed)?;
            let mut report = VerifyReport::default();
            let meta_problem = |reason: String| Problem {
                namespace: None,
                key: None,
                reason,
            };
            let meta = meta_tree(&open.db)?;
            match meta.get("format_version") {
                Ok(Some(v)) if v.len() == 4 => {
                    let found = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                    if found != FORMAT_VERSION {
                        report.problems.push(meta_problem(format!(
                            "format version {found}, expected {FORMAT_VERSION} after open"
                        )));
                    }
                }
                Ok(Some(v)) => report.problems.push(meta_problem(format!(
                    "the format version entry is {} bytes, not 4",
                    v.len()
                ))),
                Ok(None) => report
                    .problems
                    .push(meta_problem("no format version entry".into())),
                Err(e) => report
                    .problems
                    .push(meta_problem(format!("reading the format version: {e}"))),
            }
            let floor = token_floor(&meta);
            if let Err(e) = &floor {
                report.problems.push(meta_problem(e.to_string()));
            }
            for name in open.db.tree_names() {
                if !is_known_tree(&name) {
                    report.problems.push(meta_problem(format!(
                        "unknown tree {:?}",
                        String::from_utf8_lossy(&name)
                    )));
                }
            }
            // Every token handed out so far is below this one.
            let next = next_token(open)?;
            let mut ticker = Ticker::new(progress);
            for (index, name) in names.iter().enumerate() {
                let tree = open.trees.get(index).ok_or(Error::Closed)?;
                report.namespaces += 1;
                for entry in tree.iter() {
                    let (key, value) = entry.map_err(Error::storage("verifying records"))?;
                    ticker.tick();
                    report.examined += 1;
                    let problem = |reason: String| Problem {
                        namespace: Some(name.clone()),
                        key: Some(display_key(&key)),
                        reason,
                    };
                    if key.len() != 16 {
                        report
                            .problems
                            .push(problem(format!("the key is {} bytes, not 16", key.len())));
                    }
                    match Record::decode(&value) {
                        Err(e) => report.problems.push(problem(e.to_string())),
                        Ok(record) => {
                            if let Some(reason) = broken_invariant(&record, next) {
                                report.problems.push(problem(reason));
                            }
                        }
                    }
                }
            }
            ticker.report();
            Ok(report)
        })
        .await
    }

    /// Removes every forgotten record of every namespace now, in batches
    /// (the background sweeper's code), reporting progress in records
    /// examined. Unlike [`Store::sweep_expired`](crate::Store::sweep_expired) it does
    /// not pause between batches: an operator asked for it.
    pub async fn sweep(&self) -> Result<SweepReport> {
        self.store.sweep_all(self.progress.as_ref(), false).await
    }

    /// Writes every record a sweep would keep, of every namespace, into a
    /// new database at `dest` (which must not exist, or be an empty
    /// directory), durably, and closes it. Its token floor is set above
    /// every token this database has handed out, so the fencing guarantee
    /// carries over: every token the new database hands out is larger than
    /// every token of this one (released and swept records included).
    ///
    /// This store keeps running meanwhile; writes that land during the
    /// copy may or may not be in the new database, and the floor is raised
    /// once more after the copy, above their tokens too. Values that do
    /// not decode are copied unchanged. The command-line tool's
    /// `compact` runs it on a database no worker holds, then swaps the new
    /// database in.
    pub async fn compact_into(&self, dest: &Path) -> Result<CompactReport> {
        let inner = &self.store.inner;
        let guard = inner.state.clone().read_owned().await;
        let names = self.store.namespaces();
        let (now, rules) = (inner.clock.now_millis(), inner.retention);
        let dest = dest.to_path_buf();
        let progress = self.progress.clone();
        blocking(move || {
            let open = guard.as_ref().ok_or(Error::Closed)?;
            refuse_unless_empty(&dest)?;
            let floor = next_token(open)?;
            let new = open_db(&dest, crate::DEFAULT_CACHE_CAPACITY, rules.pending_ms)?;
            let sync = |what: &'static str| -> Result<()> {
                new.db.flush().map_err(Error::storage(what))?;
                new.log.sync_data().map_err(Error::io(what))
            };
            // The floor is durable before any record: sled recovers a
            // prefix of its log, so a record never outlives it.
            set_token_floor(&meta_tree(&new.db)?, floor)?;
            sync("making the new database's token floor durable")?;
            let mut report = CompactReport {
                token_floor: floor,
                ..CompactReport::default()
            };
            let mut ticker = Ticker::new(progress);
            // What the copy holds, counted as it is written: exact.
            let mut counts = Counts {
                exact: true,
                spaces: Vec::new(),
            };
            for (index, name) in names.iter().enumerate() {
                let from = open.trees.get(index).ok_or(Error::Closed)?;
                let to = new
                    .db
                    .open_tree(namespace_tree(name))
                    .map_err(Error::storage("creating a namespace in the new database"))?;
                report.namespaces += 1;
                new.expiries.add_space(name);
                let (mut pending, mut done) = (0, 0);
                for entry in from.iter() {
                    let (key, value) = entry.map_err(Error::storage("reading records"))?;
                    ticker.tick();
                    // A value that does not decode is copied as it is:
                    // nothing stored is lost, and `verify` still names it.
                    let keep = match Record::decode(&value) {
                        Ok(r) => {
                            let keep = !machine::sweepable(&r, now, rules);
                            if keep && let Ok(key) = <[u8; 16]>::try_from(key.as_ref()) {
                                if new.expiries.note(index, key, rules.due_at(&r, now)) {
                                    new.expiries.write()?;
                                }
                                match r.state {
                                    State::Pending => pending += 1,
                                    State::Done => done += 1,
                                }
                            }
                            keep
                        }
                        Err(_) => {
                            report.corrupt += 1;
                            true
                        }
                    };
                    if !keep {
                        report.dropped += 1;
                        continue;
                    }
                    // Keys are unique in a tree, so each one is new to the
                    // fresh tree and the swap always lands.
                    if cas(&to, &key, None, Some(value.to_vec()))?.is_err() {
                        return Err(Error::Corrupt {
                            key: display_key(&key),
                            reason: "the key was copied twice".into(),
                        });
                    }
                    report.records += 1;
                }
                counts.spaces.push((name.clone(), pending, done));
            }
            ticker.report();
            // Records claimed while the copy ran carry tokens above the
            // first floor: raise it above every token handed out so far.
            let floor = next_token(open)?;
            set_token_floor(&meta_tree(&new.db)?, floor)?;
            report.token_floor = floor;
            // Every copied record is noted: the new database opens with a
            // complete expiry index.
            new.expiries.seal(Some(&counts), || {
                sync("making the new database's expiry index durable")
            })?;
            sync("making the new database durable")?;
            drop(new);
            wait_for_lock_release(&dest);
            sync_tree(&dest)?;
            Ok(report)
        })
        .await
    }

    /// Raises the token floor to at least `floor`, durably, before records
    /// carrying tokens up to `floor` are written.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    fn raise_token_floor(open: &crate::sled_engine::Open, floor: u64) -> Result<()> {
        if open.token_floor.load(Ordering::SeqCst) >= floor {
            return Ok(());
        }
        open.flusher.check()?;
        open.latch_on(set_token_floor(&meta_tree(&open.db)?, floor))?;
        open.flusher.sync_blocking()?;
        open.token_floor.fetch_max(floor, Ordering::SeqCst);
        Ok(())
    }
}

/// What is wrong with a record that decodes, if anything.
fn broken_invariant(record: &Record, next_token: u64) -> Option<String> {
    if record.state == State::Pending && record.token == 0 {
        return Some("a pending claim without a fencing token".into());
    }
    if record.state == State::Pending && record.attempts == 0 {
        return Some("a pending claim with no attempts".into());
    }
    if record.ttl_ms == 0 {
        return Some("a ttl of 0 ms (a claim's ttl is at least 1 ms)".into());
    }
    if record.token >= next_token {
        return Some(format!(
            "token {} is not below the next token the database hands out ({next_token}): \
             fencing would break",
            record.token
        ));
    }
    if let Some(fp) = &record.fingerprint
        && fp.len() > MAX_FINGERPRINT_LEN
    {
        return Some(format!(
            "a fingerprint of {} bytes (at most {MAX_FINGERPRINT_LEN})",
            fp.len()
        ));
    }
    if let Some(result) = &record.result
        && result.len() > MAX_RESULT_LIMIT
    {
        return Some(format!(
            "a cached result of {} bytes (at most {MAX_RESULT_LIMIT})",
            result.len()
        ));
    }
    None
}

fn refuse_unless_empty(dest: &Path) -> Result<()> {
    if !dest.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(dest)
        .map_err(Error::io("reading the destination directory"))?
        .next()
        .is_none();
    if empty {
        Ok(())
    } else {
        Err(Error::DestinationNotEmpty {
            path: dest.to_path_buf(),
        })
    }
}

/// The bytes a file takes on disk (its allocated blocks: sled's log is
/// sparse, so its length says little).
#[cfg(unix)]
pub(crate) fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

/// Where blocks are not known, the length.
#[cfg(not(unix))]
pub(crate) fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

/// Total bytes the files under `path` take on disk.
pub(crate) fn dir_size(path: &Path) -> Result<u64> {
    let mut total = 0;
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(Error::io("reading the database directory"))? {
            let entry = entry.map_err(Error::io("reading the database directory"))?;
            let meta = entry
                .metadata()
                .map_err(Error::io("reading a database file's size"))?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                total += allocated(&meta);
            }
        }
    }
    Ok(total)
}

/// fsyncs every file and directory under `path`, and `path` itself.
pub(crate) fn sync_tree(path: &Path) -> Result<()> {
    let mut dirs: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(Error::io("reading a directory to sync"))? {
            let entry = entry.map_err(Error::io("reading a directory to sync"))?;
            let kind = entry
                .file_type()
                .map_err(Error::io("reading a directory to sync"))?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else {
                std::fs::File::open(entry.path())
                    .and_then(|f| f.sync_all())
                    .map_err(Error::io("syncing a database file"))?;
            }
        }
        std::fs::File::open(&dir)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("syncing a database directory"))?;
    }
    Ok(())
}
