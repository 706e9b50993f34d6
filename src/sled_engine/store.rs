//! The sled engine behind `Store<SledEngine>`: handles and namespaces,
//! its atomic operations, inspection, sweeping and closing, and the public
//! methods only this engine has. It decides with `machine` and stores
//! through the rest of this folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::MessageId;
use sled::IVec;
use tokio::sync::{OwnedRwLockReadGuard, RwLock, RwLockReadGuard, watch};
use tokio::task::JoinHandle;

use crate::clock::{Clock, millis};
use crate::config::Durability;
use crate::count::Count;
use crate::engine::{Acquired, Engine, Finished, Ops};
use crate::error::{Error, Result};
use crate::lease::ClaimResult;
use crate::machine::{self, Claim, Complete, Done, Holder, Release, Retention};
use crate::namespace::{Space, validate_namespace};
use crate::record::{Record, State};
use crate::sled_engine::Open;
use crate::sled_engine::builder::Builder;
use crate::sled_engine::expiry::{Completeness, Counts, Expiries};
use crate::sled_engine::flusher::{Flusher, Syncer};
use crate::sled_engine::keyspace::{cas, decode_at, key_bytes, next_token, remove};
use crate::sled_engine::open::{
    LOCK_RELEASE_WAIT, canonical, namespace_tree, open_db, release, releasing, wait_until_released,
};
use crate::sled_engine::pressure::Pressure;
use crate::sled_engine::sweeper::{self, SweepReport};
use crate::stats::{Counters, Recount, Stats};
use crate::store::Store;
use crate::sync::lock;

pub(crate) mod admin;

/// The sled engine: what a [`SledIdempotencyStore`] keeps its records in.
/// Used only as [`Store`]'s type parameter; it has no methods of its own.
#[derive(Debug)]
pub struct SledEngine {
    inner: Arc<Inner>,
    space: Arc<Space>,
}

impl Clone for SledEngine {
    fn clone(&self) -> Self {
        self.with_space(self.space.clone())
    }
}

impl Drop for SledEngine {
    /// The last handle going marks the database as being released at once,
    /// on the dropping thread, so that an `open` of it in this process that
    /// follows waits for the release, even while a background task (the
    /// sweeper between two batches) still holds the store for a moment.
    fn drop(&mut self) {
        if self.inner.handles.fetch_sub(1, Ordering::SeqCst) == 1
            && !self.inner.closing.load(Ordering::SeqCst)
        {
            releasing(&self.inner.canonical, true);
            self.inner.released_by_drop.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    path: PathBuf,
    /// `path`, canonical: the key under which a drop releases the database.
    canonical: PathBuf,
    /// Shared with operations running on blocking threads (scans, sweeps,
    /// the release after a drop), which hold an owned guard.
    state: Arc<RwLock<Option<Open>>>,
    /// Parallel to `Open::trees`; grows only, under the state write lock.
    /// (An `Arc`: a sweep batch reads it once it holds the state lock.)
    spaces: Arc<Mutex<Vec<Arc<Space>>>>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    max_result_size: usize,
    sweep_batch: usize,
    sweep_interval: Duration,
    /// Highest token of any record removed (released, abandoned, swept)
    /// since open; see `acquire` for why.
    removed_tokens: Arc<AtomicU64>,
    durability_timeout: Duration,
    stop: watch::Sender<bool>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    /// Set by the first `close`; later calls wait for its outcome.
    closing: AtomicBool,
    /// Public handles alive; the last one dropped marks the release.
    handles: AtomicU64,
    /// The last handle was dropped without `close`: `Drop` releases.
    released_by_drop: AtomicBool,
    closed: watch::Sender<Option<Closed>>,
    durability: Durability,
    /// The format version the database had before this open.
    pub(crate) format_found: Option<u32>,
    /// Does the expiry index cover every record? (`Expiries::complete`;
    /// marked by a full scan.)
    indexed: Arc<Completeness>,
    /// Back-pressure from a sweeper that has fallen behind (`pressure`).
    pressure: Arc<Pressure>,
}

/// How a `close` ended, kept for every other `close` call.
#[derive(Debug, Clone)]
enum Closed {
    Ok,
    Failed(String),
    TimedOut(Duration),
}

impl Closed {
    fn of(result: &Result<()>) -> Closed {
        match result {
            Ok(()) => Closed::Ok,
            Err(Error::DurabilityTimeout { waited }) => Closed::TimedOut(*waited),
            Err(Error::PreviousIo { cause }) => Closed::Failed(cause.clone()),
            Err(other) => Closed::Failed(other.to_string()),
        }
    }

    fn result(&self) -> Result<()> {
        match self {
            Closed::Ok => Ok(()),
            Closed::Failed(cause) => Err(Error::PreviousIo {
                cause: cause.clone(),
            }),
            Closed::TimedOut(waited) => Err(Error::DurabilityTimeout { waited: *waited }),
        }
    }
}

/// What one step of a read-decide-swap loop does.
enum Step<T> {
    Keep(T),
    Put(Record, T),
    Remove(T),
}

impl SledEngine {
    pub(crate) async fn open_with(b: Builder) -> Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        // sled recovers on the calling thread: open is a one-off startup
        // step, and recovering on a fresh pool thread measured ~1.3x slower
        // (its allocations start from an empty malloc arena; `cd compare &&
        // cargo run --release -- --only space`). On a
        // multi-thread runtime `block_in_place` lets the worker's other
        // tasks move elsewhere meanwhile. A panic inside sled on a damaged
        // database becomes an error, not a crash of the caller.
        let recover = || {
            // A database whose last handle was just dropped in this process
            // is still being flushed and released on a background thread.
            wait_until_released(&b.path, b.durability_timeout + LOCK_RELEASE_WAIT);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                open_db(
                    &b.path,
                    b.cache_capacity,
                    millis(b.common.pending_retention),
                )
            }))
        };
        let opened = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(recover),
            _ => recover(),
        };
        let opened = match opened {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::NotADatabase {
                    path: b.path,
                    reason: "sled panicked while recovering it".into(),
                });
            }
        };
        let crate::sled_engine::open::Opened {
            db,
            names,
            trees,
            log,
            format_found,
            token_floor,
            expiries,
        } = opened;
        let mut expiries = expiries;
        for name in &names {
            expiries.add_space(name);
        }
        let counts = expiries.counts.take();
        let expiries = Arc::new(expiries);
        let indexed = expiries.completeness();
        let flusher = Flusher::start(
            Syncer::new(db.clone(), log, expiries.clone()),
            b.common.durability,
            b.durability_timeout,
        )?;
        // Counts stored by a clean close are exact; a namespace they do not
        // list held nothing then. Estimates (stored by an older version)
        // or none at all (a crash): count again.
        let exact = counts.filter(|c| c.exact);
        let stored_in = |name: &str| {
            let counts = exact.as_ref()?;
            let listed = counts.spaces.iter().find(|(n, ..)| n == name);
            Some(listed.map_or((0, 0), |(_, pending, done)| (*pending, *done)))
        };
        let spaces: Vec<Arc<Space>> = names
            .iter()
            .enumerate()
            .map(|(index, name)| Space::new(index, name, b.common.durability, stored_in(name)))
            .collect();
        let default = spaces[0].clone();
        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            canonical: canonical(&b.path),
            path: b.path,
            state: Arc::new(RwLock::new(Some(Open {
                db,
                trees,
                flusher,
                token_floor: AtomicU64::new(token_floor),
                expiries,
            }))),
            spaces: Arc::new(Mutex::new(spaces)),
            clock: b.common.clock_or_system(),
            retention: Retention {
                done_ms: b.common.done_retention.map(millis),
                default_ttl_ms: millis(b.common.default_ttl),
                pending_ms: millis(b.common.pending_retention),
            },
            max_result_size: b.common.max_result_size,
            sweep_batch: b.sweep_batch,
            sweep_interval: b.sweep_interval,
            removed_tokens: Arc::new(AtomicU64::new(0)),
            durability_timeout: b.durability_timeout,
            stop,
            sweeper: Mutex::new(None),
            closing: AtomicBool::new(false),
            handles: AtomicU64::new(1),
            released_by_drop: AtomicBool::new(false),
            closed: watch::channel(None).0,
            format_found,
            durability: b.common.durability,
            indexed,
            pressure: Arc::default(),
        });
        let task = sweeper::spawn(Arc::downgrade(&inner), b.sweep_interval, stop_rx);
        *lock(&inner.sweeper) = Some(task);
        Ok(Self {
            inner,
            space: default,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn namespace_name(&self) -> &str {
        &self.space.name
    }

    pub(crate) async fn namespace(&self, name: &str) -> Result<SledEngine> {
        validate_namespace(name)?;
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if let Some(space) = self.inner.find_space(name) {
            return Ok(self.with_space(space));
        }
        // Never queue for the write lock: a queued writer would hold up
        // every claim behind a long admin walk (which holds a read lock).
        let mut guard = loop {
            if let Ok(guard) = self.inner.state.try_write() {
                break guard;
            }
            if self.inner.closing.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let open = guard.as_mut().ok_or(Error::Closed)?;
        // Someone may have created it while we waited for the lock.
        if let Some(space) = self.inner.find_space(name) {
            return Ok(self.with_space(space));
        }
        let tree = open
            .db
            .open_tree(namespace_tree(name))
            .map_err(Error::storage("creating a namespace"))?;
        let mut spaces = lock(&self.inner.spaces);
        let space = Space::new(spaces.len(), name, self.inner.durability, Some((0, 0)));
        open.expiries.add_space(name);
        open.trees.push(tree);
        spaces.push(space.clone());
        tracing::debug!(namespace = name, "namespace created");
        Ok(self.with_space(space))
    }

    pub(crate) fn namespaces(&self) -> Vec<String> {
        lock(&self.inner.spaces)
            .iter()
            .map(|s| s.name.to_string())
            .collect()
    }

    fn with_space(&self, space: Arc<Space>) -> SledEngine {
        self.inner.handles.fetch_add(1, Ordering::SeqCst);
        SledEngine {
            inner: self.inner.clone(),
            space,
        }
    }

    /// What a claim that found `record` reports.
    fn duplicate(found: &Claim, record: Option<Record>) -> ClaimResult {
        // Only `Claim::Take` comes from an absent key; the default is never used.
        let record = record.unwrap_or_else(empty_record);
        match found {
            Claim::AlreadyDone => ClaimResult::Done {
                result: record.result,
            },
            Claim::Conflict => ClaimResult::Conflict {
                done: record.state == State::Done,
            },
            Claim::AlreadyPending | Claim::Take { .. } => ClaimResult::InProgress {
                expires_at: record.expires_at,
                attempts: record.attempts,
            },
        }
    }

    /// After a claim landed: gives `record` a token above every removed
    /// token if it replaced an absent key. Returns the final token, or
    /// `None` if the record was replaced meanwhile.
    fn restamp(
        &self,
        open: &Open,
        tree: &sled::Tree,
        key: &[u8],
        was_absent: bool,
        mut record: Record,
    ) -> Result<Option<u64>> {
        if !was_absent {
            return Ok(Some(record.token));
        }
        while self.inner.removed_tokens.load(Ordering::SeqCst) >= record.token {
            let old = record.encode();
            record.token = open.latch_on(next_token(open))?;
            if open
                .latch_on(cas(tree, key, Some(&old), Some(record.encode())))?
                .is_err()
            {
                return Ok(None);
            }
        }
        Ok(Some(record.token))
    }

    /// Read, decide, compare-and-swap until the swap lands. Waits for
    /// durability even when nothing was written: what the call acknowledges
    /// may be another writer's not-yet-flushed write.
    async fn update<T, F>(&self, key: &MessageId, decide: F) -> Result<T>
    where
        F: Fn(Option<&Record>, u64) -> Result<Step<T>>,
    {
        let guard = self.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        open.flusher.check()?;
        let tree = self.tree(open)?;
        let key = key_bytes(key);
        let stored = &self.space.stored;
        let pass = match stored.pass() {
            Some(span) => Some(span.await),
            None => None,
        };
        let mut current = tree.get(key).map_err(Error::storage("reading a record"))?;
        let out = loop {
            let record = decode_at(&key, current.as_deref())?;
            let now = self.inner.clock.now_millis();
            let (swapped, out, still_pending) = match decide(record.as_ref(), now)? {
                Step::Keep(out) => break out,
                Step::Put(new, out) => {
                    let pending = new.state == State::Pending;
                    let bytes = Some(new.encode());
                    let swapped = open.latch_on(cas(tree, &key, current.as_deref(), bytes))?;
                    if swapped.is_ok() {
                        let from = record.as_ref().map(|r| r.state);
                        stored.moved(&pass, &key, from, Some(new.state));
                        let due = self.inner.retention.due_at(&new, now);
                        if open.expiries.note(self.space.index, key, due) {
                            open.flusher.flush_soon();
                        }
                    }
                    (swapped, out, pending)
                }
                Step::Remove(out) => match (current.as_deref(), &record) {
                    (Some(old), Some(r)) => {
                        let removed_tokens = &self.inner.removed_tokens;
                        let removed =
                            open.latch_on(remove(tree, &key, old, r.token, removed_tokens))?;
                        if removed.is_ok() {
                            stored.moved(&pass, &key, Some(r.state), None);
                        }
                        (removed, out, false)
                    }
                    _ => break out, // nothing stored: nothing to remove
                },
            };
            match swapped {
                Ok(()) => {
                    if !still_pending {
                        self.space.pending.ended(tree, &key);
                    }
                    break out;
                }
                Err(found) => current = found,
            }
        };
        drop(pass);
        open.flusher.write_completed().await?;
        Ok(out)
    }

    fn tree<'a>(&self, open: &'a Open) -> Result<&'a sled::Tree> {
        // Trees and spaces grow together under the state lock, so the index
        // is always there while the store is open.
        open.trees.get(self.space.index).ok_or(Error::Closed)
    }

    pub(crate) async fn get(&self, key: &MessageId) -> Result<Option<Record>> {
        let now = self.inner.clock.now_millis();
        Ok(self.get_record(key).await?.filter(|r| r.is_live(now)))
    }

    pub(crate) async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        let guard = self.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let key = key_bytes(key);
        let value = self
            .tree(open)?
            .get(key)
            .map_err(Error::storage("reading a record"))?;
        decode_at(&key, value.as_deref())
    }

    /// Runs `job` on a blocking thread with this namespace's tree, so that
    /// a scan never holds up an async worker thread.
    async fn scan<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Open, &sled::Tree) -> Result<T> + Send + 'static,
    {
        let guard = self.inner.state.clone().read_owned().await;
        let index = self.space.index;
        blocking(move || {
            let open = guard.as_ref().ok_or(Error::Closed)?;
            job(open, open.trees.get(index).ok_or(Error::Closed)?)
        })
        .await
    }

    pub(crate) async fn list(
        &self,
        state: Option<State>,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<(MessageId, Record)>> {
        let mut filter = admin::ListFilter::new(limit);
        if let Some(state) = state {
            filter = filter.state(state);
        }
        if let Some(after) = after {
            filter = filter.after(after.clone());
        }
        self.admin().list(&filter).await
    }

    pub(crate) async fn stats(&self) -> Result<Stats> {
        let flushes = {
            let guard = self.inner.state.read().await;
            guard.as_ref().ok_or(Error::Closed)?.flusher.flushes()
        };
        let (records_pending, records_done) = self.space.stored.get();
        Ok(Stats {
            records_pending,
            records_done,
            records_exact: !self.space.stored.recounting(),
            flushes,
            ..self.space.counters.snapshot()
        })
    }

    /// See [`Store::sweep_expired`].
    pub(crate) async fn sweep_expired(&self) -> Result<SweepReport> {
        // However this sweep ends (dropped included), it no longer holds
        // claims back.
        let _ended = Ended(&self.inner);
        let mut total = SweepReport::default();
        if self.inner.needs_scan() {
            total += self.sweep_all(None, true).await?;
        }
        let mut cursor = sweeper::Cursor::default();
        loop {
            let batch = self.run_batch(self.inner.due_batch(cursor)).await?;
            // Only while this future lives: once it is dropped, `_ended`
            // has let claims go and no batch of it holds them back again.
            self.inner.pressure.after_batch(&batch);
            total += batch.report;
            let Some(next) = batch.next else {
                return Ok(total);
            };
            cursor = next;
            sweeper::pace(batch.took, batch.pause).await;
        }
    }

    /// Runs one sweep batch on a blocking thread, with the state lock taken
    /// here first: dropping this future before the batch has its lock runs
    /// no batch, and once it has it, the batch holds it until it is over,
    /// so a later writer of the state (creating a namespace, closing) waits
    /// for the batch.
    async fn run_batch<F>(&self, job: F) -> Result<sweeper::Batch>
    where
        F: FnOnce(Option<Taken>) -> Result<sweeper::Batch> + Send + 'static,
    {
        let taken = self.inner.state.clone().read_owned().await;
        blocking(move || job(Some(taken))).await
    }

    /// Reads every record of every namespace, batch by batch, removing the
    /// forgotten ones and, while the expiry index is incomplete, noting the
    /// rest in it; reports records examined to `progress`; `paced` pauses
    /// between batches as the sweeper does.
    async fn sweep_all(
        &self,
        progress: Option<&admin::OnProgress>,
        paced: bool,
    ) -> Result<SweepReport> {
        let mut total = SweepReport::default();
        let mut index = 0;
        let epoch = self.inner.indexed.epoch();
        while let Some(space) = self.inner.space_at(index) {
            let mut cursor = sweeper::Cursor::default();
            loop {
                let batch = self
                    .run_batch(self.inner.sweep_batch(space.clone(), cursor))
                    .await?;
                total += batch.report;
                if let Some(progress) = progress {
                    progress(total.examined);
                }
                let Some(next) = batch.next else { break };
                cursor = next;
                if paced {
                    sweeper::pace(batch.took, batch.pause).await;
                }
            }
            index += 1;
        }
        self.inner.indexed.mark_complete(epoch);
        Ok(total)
    }

    pub(crate) async fn close(&self) -> Result<()> {
        let mut closed = self.inner.closed.subscribe();
        if !self.inner.closing.swap(true, Ordering::SeqCst) {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let result = inner.shut_down().await;
                inner.closed.send_replace(Some(Closed::of(&result)));
            });
        }
        // The sender lives in `inner`, which this handle keeps alive.
        let outcome = closed
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Closed)?
            .clone();
        outcome.map_or(Ok(()), |closed| closed.result())
    }
}

/// Lets claims run free when dropped: a sweep ended.
struct Ended<'a>(&'a Inner);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.pressure.relax();
    }
}

/// Runs `job` on tokio's blocking pool.
async fn blocking<T, F>(job: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Storage {
            context: "running a scan on a blocking thread",
            source: crate::error::StorageError(sled::Error::ReportableBug(e.to_string())),
        })?
}

fn empty_record() -> Record {
    Record {
        state: State::Pending,
        expires_at: 0,
        token: 0,
        attempts: 0,
        ttl_ms: 0,
        fingerprint: None,
        result: None,
    }
}

impl Drop for Inner {
    /// Dropping the last handle without `close`: stop the sweeper, and on a
    /// background thread (never the dropping thread, often a tokio worker)
    /// stop the flusher after a final flush, drop sled and wait (bounded)
    /// until sled's threads let go of the directory lock. An `open` of the
    /// same directory in this process waits for that release.
    fn drop(&mut self) {
        if !self.released_by_drop.load(Ordering::SeqCst) {
            return; // `close` released it
        }
        let _ = self.stop.send(true);
        let state = self.state.clone();
        let path = self.path.clone();
        let released = Released(self.canonical.clone());
        let spaces = lock(&self.spaces).clone();
        let release = move || {
            let _released = released; // deregisters even if sled panics
            if let Some(open) = state.blocking_write().take()
                && let Err(e) = release(open, &path, counts_of(&spaces).as_ref())
            {
                tracing::error!(error = %e, "final flush after the last handle was dropped failed");
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("sled-idempotency-release".into())
            .spawn(release)
        {
            // The closure (and its `Released`) is dropped with the error.
            tracing::error!(error = %e, "could not start the thread that releases a dropped store");
        }
    }
}

/// The records each namespace stores, for a close to keep: `None` while a
/// recount has not finished (the next open counts again).
fn counts_of(spaces: &[Arc<Space>]) -> Option<Counts> {
    let mut counts = Counts {
        exact: true,
        spaces: Vec::with_capacity(spaces.len()),
    };
    for space in spaces {
        if space.stored.recounting() {
            return None;
        }
        let (pending, done) = space.stored.get();
        counts.spaces.push((space.name.to_string(), pending, done));
    }
    Some(counts)
}

/// Deregisters a database from `RELEASING` when dropped.
struct Released(PathBuf);

impl Drop for Released {
    fn drop(&mut self) {
        releasing(&self.0, false);
    }
}

impl Inner {
    /// Must a full scan run: is the expiry index incomplete, or a
    /// namespace's record count unfinished?
    fn needs_scan(&self) -> bool {
        !self.indexed.get() || lock(&self.spaces).iter().any(|s| s.stored.recounting())
    }

    /// The records each namespace stores, for the marker of a close.
    /// Called once no writer is left.
    fn counts(&self) -> Option<Counts> {
        counts_of(&lock(&self.spaces))
    }

    fn find_space(&self, name: &str) -> Option<Arc<Space>> {
        lock(&self.spaces)
            .iter()
            .find(|s| *s.name == *name)
            .cloned()
    }

    pub(crate) fn space_at(&self, index: usize) -> Option<Arc<Space>> {
        lock(&self.spaces).get(index).cloned()
    }

    /// Stops the sweeper, waits for the operations in flight, flushes and
    /// releases the lock: the body of `close`.
    async fn shut_down(&self) -> Result<()> {
        let _ = self.stop.send(true);
        let task = lock(&self.sweeper).take();
        if let Some(task) = task {
            // The task only ever returns; a join error would mean it was
            // cancelled with its runtime, which leaves nothing to wait for.
            let _ = task.await;
        }
        let Some(open) = self.state.write().await.take() else {
            return Ok(());
        };
        let (path, counts) = (self.path.clone(), self.counts());
        let release = tokio::task::spawn_blocking(move || release(open, &path, counts.as_ref()));
        match tokio::time::timeout(self.durability_timeout + LOCK_RELEASE_WAIT, release).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(Error::PreviousIo {
                cause: format!("the final flush panicked: {e}"),
            }),
            Err(_) => Err(Error::DurabilityTimeout {
                waited: self.durability_timeout,
            }),
        }
    }

    /// One batch of a sweep of `space` from `cursor` on, as a job for a
    /// blocking thread that holds no reference to the store (the background
    /// sweeper runs it after letting go of its `Arc`). It waits for the
    /// store's state lock itself. A latched store sweeps nothing.
    pub(crate) fn sweep_batch(
        &self,
        space: Arc<Space>,
        mut cursor: sweeper::Cursor,
    ) -> impl FnOnce(Option<Taken>) -> Result<sweeper::Batch> + Send + 'static {
        let SweepTools {
            state,
            clock,
            rules,
            size,
            removed_tokens,
        } = self.sweep_tools();
        move |taken| {
            let guard = hold(&state, taken);
            let started = Instant::now();
            let open = guard.as_ref().ok_or(Error::Closed)?;
            open.flusher.check()?;
            let tree = open.trees.get(space.index).ok_or(Error::Closed)?;
            let done = |report| sweeper::Batch {
                report,
                next: None,
                took: started.elapsed(),
                pause: 1.0,
            };
            // A batch of a count after a crash holds the count's span
            // while it reads and counts (see `Stored`).
            let mut counting = space.stored.counting();
            if let Some(span) = counting.as_deref_mut()
                && *span == Recount::NotBegun
            {
                // The first counting batch: the count ends at the last key.
                *span = match last_key(tree)? {
                    Some(end) => Recount::Counting {
                        passed: Vec::new(),
                        end,
                    },
                    None => Recount::Finished,
                };
            }
            if let Some(Recount::Counting { end, .. }) = counting.as_deref() {
                // Every key after the count's end was written since it
                // began, and noted by its writer.
                cursor.end = Some(end.clone());
            } else if cursor.end.is_none() {
                // First batch: fix the end of this sweep at the current last key.
                match last_key(tree)? {
                    Some(last) => cursor.end = Some(last),
                    None => {
                        if let Some(span) = counting.as_deref_mut() {
                            space.stored.passed(span, None);
                        }
                        return Ok(done(SweepReport::default()));
                    }
                }
            }
            let now = clock.now_millis();
            // The backstop: while the index is incomplete, note every
            // record the scan keeps.
            let renote = !open.expiries.complete();
            let mut noted = Ok(());
            let mut kept = |key: &[u8], record: &Record| {
                if let Some(span) = counting.as_deref() {
                    space.stored.counted(span, key, Some(record.state), None);
                }
                if renote
                    && noted.is_ok()
                    && let Ok(key) = <[u8; 16]>::try_from(key)
                {
                    let due = rules.due_at(record, now);
                    if open.expiries.note(space.index, key, due) {
                        noted = open.expiries.write();
                    }
                }
            };
            let (from, end) = (&cursor.from, cursor.end.as_deref());
            let scan = sweeper::scan(tree, from, end, size, now, rules, &mut kept)?;
            if renote {
                open.latch_on(noted.and_then(|()| open.expiries.write()))?;
            }
            let mut report = scan.report;
            let removed = sweeper::remove_unchanged(tree, scan.expired, &removed_tokens);
            let removed = open.latch_on(removed)?;
            report.removed = removed.len() as u64;
            for (key, state) in &removed {
                match counting.as_deref() {
                    Some(span) => space.stored.counted(span, key, None, Some(*state)),
                    // Writers wait while a counting batch holds the span.
                    None => space.stored.moved(&None, key, Some(*state), None),
                }
                if let Ok(key) = <[u8; 16]>::try_from(key.as_ref()) {
                    space.pending.ended(tree, &key);
                }
            }
            if let Some(span) = counting.as_deref_mut() {
                let last = scan.next.as_ref().and(scan.last.as_deref());
                space.stored.passed(span, last);
            }
            drop(counting);
            space.counters.add(Count::Swept, report.removed);
            let mut batch = done(report);
            batch.next = scan.next.map(|from| sweeper::Cursor {
                from,
                end: cursor.end,
                scale: 1,
            });
            Ok(batch)
        }
    }
}

/// The last key of `tree`, if any.
fn last_key(tree: &sled::Tree) -> Result<Option<Vec<u8>>> {
    let last = tree
        .last()
        .map_err(Error::storage("finding the last record"))?;
    Ok(last.map(|(key, _)| key.to_vec()))
}

/// The store's state, read-locked by an async caller before a sweep batch
/// moves to its blocking thread.
type Taken = OwnedRwLockReadGuard<Option<Open>>;

/// The store's state read-locked for one sweep batch.
enum Held<'a> {
    /// Locked by the caller (`Taken`).
    Taken(Taken),
    /// Locked by the batch on its blocking thread (the background sweeper).
    Waited(RwLockReadGuard<'a, Option<Open>>),
}

impl std::ops::Deref for Held<'_> {
    type Target = Option<Open>;

    fn deref(&self) -> &Option<Open> {
        match self {
            Held::Taken(guard) => guard,
            Held::Waited(guard) => guard,
        }
    }
}

/// The lock `taken` by the caller, or else this blocking thread's own.
fn hold(state: &RwLock<Option<Open>>, taken: Option<Taken>) -> Held<'_> {
    match taken {
        Some(taken) => Held::Taken(taken),
        None => Held::Waited(state.blocking_read()),
    }
}

/// What a sweep batch takes along to its blocking thread instead of the
/// store.
struct SweepTools {
    state: Arc<RwLock<Option<Open>>>,
    clock: Arc<dyn Clock>,
    rules: Retention,
    size: usize,
    removed_tokens: Arc<AtomicU64>,
}

impl Inner {
    fn sweep_tools(&self) -> SweepTools {
        SweepTools {
            state: self.state.clone(),
            clock: self.clock.clone(),
            rules: self.retention,
            size: self.sweep_batch,
            removed_tokens: self.removed_tokens.clone(),
        }
    }

    /// One batch of a sweep of the due expiry index entries, as a job for
    /// a blocking thread that holds no reference to the store. Its `next`
    /// is `Some` while more entries are due.
    pub(crate) fn due_batch(
        &self,
        cursor: sweeper::Cursor,
    ) -> impl FnOnce(Option<Taken>) -> Result<sweeper::Batch> + Send + 'static {
        let SweepTools {
            state,
            clock,
            rules,
            size,
            removed_tokens,
        } = self.sweep_tools();
        let spaces = self.spaces.clone();
        let interval = self.sweep_interval;
        move |taken| {
            let guard = hold(&state, taken);
            let started = Instant::now();
            let open = guard.as_ref().ok_or(Error::Closed)?;
            open.flusher.check()?;
            // Read under the state lock: a namespace created before
            // this batch began is in it (namespaces grow under the
            // write lock), and so are the entries its writes noted.
            let spaces = lock(&spaces).clone();
            let find = |name: &str| spaces.iter().find(|s| *s.name == *name);
            let tree = |space: &Space| open.trees.get(space.index);
            let by_name = |name: &str| find(name).and_then(|s| tree(s)).cloned();
            let now = clock.now_millis();
            // The first batch fixes where this sweep ends.
            let end = cursor.end.unwrap_or_else(|| Expiries::due_end(now));
            let size = size.saturating_mul(cursor.scale.max(1));
            let batch = (&cursor.from[..], &end[..], size);
            // Held from before the removals until the counts moved (a
            // namespace being counted after a crash: see `Stored`).
            let passes: Vec<_> = spaces.iter().map(|s| s.stored.pass_blocking()).collect();
            let due = open
                .expiries
                .sweep_due(&by_name, now, rules, batch, &removed_tokens);
            let due = open.latch_on(due)?;
            for (name, key, state) in &due.removed {
                if let Some(space) = find(name)
                    && let Some(tree) = tree(space)
                {
                    space.pending.ended(tree, key);
                    let pass = passes.get(space.index).unwrap_or(&None);
                    space.stored.moved(pass, key, Some(*state), None);
                    space.counters.add(Count::Swept, 1);
                }
            }
            let behind = Duration::from_millis(now.saturating_sub(due.oldest_due));
            let pause = sweeper::pause_share(behind, interval);
            Ok(sweeper::Batch {
                report: due.report,
                pause,
                next: due.next.map(|from| sweeper::Cursor {
                    from,
                    end: Some(end),
                    scale: sweeper::batch_scale(pause),
                }),
                took: started.elapsed(),
            })
        }
    }
}

impl sweeper::Sweep for Inner {
    fn batch(
        &self,
        index: usize,
        cursor: sweeper::Cursor,
    ) -> Option<impl FnOnce() -> Result<sweeper::Batch> + Send + 'static> {
        let job = self.sweep_batch(self.space_at(index)?, cursor);
        Some(move || job(None))
    }

    fn due(
        &self,
        cursor: sweeper::Cursor,
    ) -> impl FnOnce() -> Result<sweeper::Batch> + Send + 'static {
        let job = self.due_batch(cursor);
        move || job(None)
    }

    fn needs_scan(&self) -> bool {
        Inner::needs_scan(self)
    }

    fn scan_epoch(&self) -> u64 {
        self.indexed.epoch()
    }

    fn scanned(&self, epoch: u64) {
        self.indexed.mark_complete(epoch);
    }

    fn swept(&self, batch: &sweeper::Batch) {
        self.pressure.after_batch(batch);
    }

    fn ended(&self) {
        self.pressure.relax();
    }
}

/// An idempotency store in a sled database: [`Store`] over the sled
/// engine, one namespace of the database per handle.
///
/// [`open`](Store::open) returns the handle of the default namespace;
/// [`namespace`](Store::namespace) returns handles on others. All handles
/// of a database share one sled database, one sweeper and one group-commit
/// flusher. Handles are cheap to clone. [`close`](Store::close) on any
/// handle closes the database for all of them; dropping the last handle
/// without `close` stops the sweeper and flushes, but cannot report errors.
pub type SledIdempotencyStore = Store<SledEngine>;

/// The methods only a sled store has: opening a database, inspecting it,
/// sweeping it.
impl Store<SledEngine> {
    /// Opens (or creates) the store at `path` with every default and returns
    /// the handle of the default namespace.
    ///
    /// Must be called inside a tokio runtime: it starts the sweeper task.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::builder(path).open().await
    }

    /// A builder for every setting; finish with [`Builder::open`].
    pub fn builder(path: impl AsRef<Path>) -> Builder {
        Builder::new(path)
    }

    /// The directory this store was opened at.
    pub fn path(&self) -> &Path {
        self.engine.path()
    }

    /// Up to `limit` live records of this namespace in key order (UUIDv7 ids
    /// sort by time), starting after `after`, optionally only those in
    /// `state`. Page through with the last key returned. Corrupted values
    /// are skipped (and logged). The scan runs on a blocking thread. A
    /// listing of pending records reads only the keys of an in-memory index
    /// of pending keys, built by the first such call with one scan of the
    /// namespace and kept up to date by writers from then on; other
    /// listings read records in key order until the page is full.
    pub async fn list(
        &self,
        state: Option<State>,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<(MessageId, Record)>> {
        self.engine.list(state, after, limit).await
    }

    /// Counters of this namespace since open, and the records it stores
    /// now, by state. Reads no record: the counts are kept by the writers
    /// (see [`Stats::records_exact`]); [`Admin::census`](admin::Admin::census)
    /// counts live and expired records with a scan.
    pub async fn stats(&self) -> Result<Stats> {
        self.engine.stats().await
    }

    /// Removes every forgotten record (an expired `Done`, or a `Pending`
    /// past its expiry plus `pending_retention`) of every namespace now, in
    /// batches, and reports what it did. The background sweeper runs the
    /// same code periodically. Removing a forgotten record never changes
    /// the outcome of any operation.
    ///
    /// Cost: it reads the expiry index entries that are due and the
    /// records they name, so it grows with what it removes, not with the
    /// size of the database (`examined` counts the index notes read).
    /// After an open that did not follow a clean close (a crash, an older
    /// format, a compaction), the first sweep also reads every record once
    /// (the backstop that re-indexes what a crash left unindexed).
    pub async fn sweep_expired(&self) -> Result<SweepReport> {
        self.engine.sweep_expired().await
    }
}

/// The sled engine's atomic operations: read, decide with `machine`,
/// compare-and-swap, wait for durability.
impl Ops for SledEngine {
    fn namespace(&self) -> &str {
        &self.space.name
    }

    async fn open_namespace(&self, name: &str) -> Result<Self> {
        SledEngine::namespace(self, name).await
    }

    async fn namespaces(&self) -> Result<Vec<String>> {
        Ok(SledEngine::namespaces(self))
    }

    async fn get(&self, key: &MessageId) -> Result<Option<Record>> {
        SledEngine::get(self, key).await
    }

    async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        SledEngine::get_record(self, key).await
    }

    async fn close(&self) -> Result<()> {
        SledEngine::close(self).await
    }

    fn counters(&self) -> Option<&Counters> {
        Some(&self.space.counters)
    }

    fn max_result_size(&self) -> usize {
        self.inner.max_result_size
    }

    async fn acquire(
        &self,
        key: &MessageId,
        ttl: Duration,
        ttl_ms: u64,
        fingerprint: Option<&[u8]>,
    ) -> Result<Acquired> {
        if let Some(wait) = self.inner.pressure.admit() {
            // The sweeper has fallen behind: this claim goes on no sooner
            // than the sweeper can remove a record. It waits holding no
            // lock, before it writes anything.
            self.space.counters.add(Count::Slowed, 1);
            tokio::time::sleep(wait).await;
        }
        let guard = self.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        open.flusher.check()?;
        let tree = self.tree(open)?;
        let bytes = key_bytes(key);
        let stored = &self.space.stored;
        let pass = match stored.pass() {
            Some(span) => Some(span.await),
            None => None,
        };
        // Optimistic: assume the key is absent, so a new key costs one CAS.
        let mut current: Option<IVec> = None;
        loop {
            let now = self.inner.clock.now_millis();
            let expires_at = now.checked_add(ttl_ms).ok_or(Error::TtlOverflow { ttl })?;
            let record = decode_at(&bytes, current.as_deref())?;
            let rules = self.inner.retention;
            let replaced = record.as_ref().map(|r| r.state);
            let attempts = match machine::claim(record.as_ref(), now, rules, fingerprint) {
                Claim::Take { attempts } => attempts,
                found => return Ok(Acquired::Not(Self::duplicate(&found, record))),
            };
            let token = open.latch_on(next_token(open))?;
            let record = machine::pending(expires_at, ttl_ms, token, attempts, fingerprint);
            match open.latch_on(cas(tree, &bytes, current.as_deref(), Some(record.encode())))? {
                // Counted as it lands: a restamp that loses the record to
                // another writer leaves that writer to count its own move.
                Ok(()) => stored.moved(&pass, &bytes, replaced, Some(State::Pending)),
                Err(found) => {
                    current = found;
                    continue;
                }
            }
            // Fencing tokens must increase along each key's history. A
            // token drawn after reading the record it replaces is larger
            // than that record's, but a claim of an absent key may have
            // drawn its token before a slower claim with a larger one came
            // and went (released, abandoned or swept) ahead of it. Every
            // removal first raises `removed_tokens`, so a claim that landed
            // on an absent key and sees a larger removed token re-stamps its
            // record with a fresh token while it holds it.
            // A restamp changes the token, not the time it is due.
            let due = rules.due_at(&record, now);
            let Some(token) = self.restamp(open, tree, &bytes, current.is_none(), record)? else {
                current = tree
                    .get(bytes)
                    .map_err(Error::storage("reading a record"))?;
                continue; // expired and taken over while re-stamping: start again
            };
            self.space.pending.claimed(&bytes);
            if open.expiries.note(self.space.index, bytes, due) {
                open.flusher.flush_soon();
            }
            drop(pass);
            open.flusher.write_completed().await?;
            return Ok(Acquired::Lease {
                token,
                expires_at,
                attempts,
            });
        }
    }

    async fn done(&self, key: &MessageId) -> Result<Option<bool>> {
        let retention = self.inner.retention;
        self.update(key, |current, now| {
            Ok(match machine::done(current, now, retention) {
                Done::AlreadyDone => Step::Keep(None),
                Done::Write { record, late } => Step::Put(record, Some(late)),
            })
        })
        .await
    }

    async fn release(&self, key: &MessageId) -> Result<bool> {
        self.update(key, |current, now| {
            Ok(match machine::release(current, now, self.inner.retention) {
                Release::Remove => Step::Remove(true),
                Release::Keep => Step::Keep(false),
            })
        })
        .await
    }

    async fn complete(
        &self,
        key: &MessageId,
        token: u64,
        result: Option<&[u8]>,
    ) -> Result<Result<Finished, Holder>> {
        let retention = self.inner.retention;
        self.update(key, |current, now| {
            Ok(
                match machine::complete(current, token, now, retention, result) {
                    Ok(Complete::Write(record)) => Step::Put(record, Ok(Finished::Wrote)),
                    Ok(Complete::AlreadyCompleted) => Step::Keep(Ok(Finished::Already)),
                    Ok(Complete::DifferentResult) => Step::Keep(Ok(Finished::DifferentResult)),
                    Err(holds) => Step::Keep(Err(holds)),
                },
            )
        })
        .await
    }

    async fn abandon(&self, key: &MessageId, token: u64) -> Result<Result<(), Holder>> {
        self.update(key, |current, now| {
            Ok(
                match machine::abandon(current, token, now, self.inner.retention) {
                    Ok(()) => Step::Remove(Ok(())),
                    Err(holds) => Step::Keep(Err(holds)),
                },
            )
        })
        .await
    }

    async fn extend(
        &self,
        key: &MessageId,
        token: u64,
        ttl: Duration,
        ttl_ms: u64,
    ) -> Result<Result<u64, Holder>> {
        self.update(key, |current, now| {
            let expires_at = now.checked_add(ttl_ms).ok_or(Error::TtlOverflow { ttl })?;
            let rules = self.inner.retention;
            Ok(
                match machine::extend(current, token, now, rules, expires_at) {
                    Ok(record) => Step::Put(record, Ok(expires_at)),
                    Err(holds) => Step::Keep(Err(holds)),
                },
            )
        })
        .await
    }
}

impl Engine for SledEngine {}

#[cfg(any(test, feature = "fault-injection"))]
impl Store<SledEngine> {
    /// Fault injection for the model fuzz target (feature
    /// `fault-injection`; not part of the supported API): the next flush
    /// fails as a failed fdatasync would. With `now`, that flush runs at
    /// once, whatever the durability mode, and the call returns once the
    /// store has latched ([`Error::PreviousIo`] from then on); without it,
    /// the flush a later write, `close` or drop runs fails.
    #[doc(hidden)]
    pub async fn inject_sync_failure(&self, now: bool) -> Result<()> {
        self.engine.inject_sync_failure(now).await
    }

    /// Fault injection (feature `fault-injection`): how many injected sync
    /// failures still wait for a flush to meet them.
    #[doc(hidden)]
    pub async fn sync_failures_waiting(&self) -> Result<usize> {
        self.engine.sync_failures_waiting().await
    }
}

#[cfg(any(test, feature = "fault-injection"))]
impl SledEngine {
    /// Test seam: the next flush meets `fault`.
    pub(crate) async fn flusher_inject(
        &self,
        fault: crate::sled_engine::flusher::Fault,
    ) -> Result<()> {
        let guard = self.inner.state.read().await;
        guard.as_ref().ok_or(Error::Closed)?.flusher.inject(fault);
        Ok(())
    }

    /// The next flush fails; with `now`, it runs at once.
    pub(crate) async fn inject_sync_failure(&self, now: bool) -> Result<()> {
        self.flusher_inject(crate::sled_engine::flusher::Fault::Fail)
            .await?;
        if !now {
            return Ok(());
        }
        let guard = self.inner.state.read().await;
        let flushed = guard
            .as_ref()
            .ok_or(Error::Closed)?
            .flusher
            .flush_now()
            .await;
        match flushed {
            Err(Error::PreviousIo { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => Err(Error::io("injecting a sync failure")(
                std::io::Error::other("a flush succeeded: the injected failure was not met"),
            )),
        }
    }

    /// Injected sync failures not met yet.
    pub(crate) async fn sync_failures_waiting(&self) -> Result<usize> {
        let guard = self.inner.state.read().await;
        Ok(guard.as_ref().ok_or(Error::Closed)?.flusher.injected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u128) -> MessageId {
        MessageId::from_uuid(uuid::Uuid::from_u128(n))
    }

    /// Regression guard for fencing: a claim can draw its token, stall, and
    /// land on an absent key after a claim with a larger token has come and
    /// gone. It must then take a token above every removed one, so tokens
    /// keep increasing along the key's history.
    #[tokio::test]
    async fn a_claim_landing_after_a_larger_removed_token_is_restamped() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let handle = SledIdempotencyStore::builder(dir.path().join("db"))
            .durability(crate::Durability::Periodic(Duration::from_secs(3600)))
            .open()
            .await?;
        let store = &handle.engine;
        // The slow claim: landed on an absent key with token `stale`.
        let ClaimResult::Acquired(slow) = handle.claim(&key(1), Duration::from_secs(60)).await?
        else {
            return Err(Error::Closed);
        };
        let stale = store.get_record(&key(1)).await?.ok_or(Error::Closed)?;
        // Meanwhile a faster claim drew a larger token and was removed.
        let fast = handle.claim(&key(2), Duration::from_secs(60)).await?;
        let fast = fast.lease().cloned().ok_or(Error::Closed)?;
        handle.abandon(&fast).await?;
        assert!(store.inner.removed_tokens.load(Ordering::SeqCst) >= fast.token());
        assert!(slow.token() < fast.token());

        let guard = store.inner.state.read().await;
        let open = guard.as_ref().ok_or(Error::Closed)?;
        let tree = store.tree(open)?;
        let bytes = key_bytes(&key(1));
        let kept = store.restamp(open, tree, &bytes, false, stale.clone())?;
        assert_eq!(
            kept,
            Some(slow.token()),
            "a takeover of a present record keeps its token"
        );
        let token = store
            .restamp(open, tree, &bytes, true, stale)?
            .ok_or(Error::Closed)?;
        assert!(
            token > fast.token(),
            "restamped {token} must exceed {}",
            fast.token()
        );
        let record = Record::decode(
            &tree
                .get(bytes)
                .map_err(Error::storage("get"))?
                .ok_or(Error::Closed)?,
        );
        assert_eq!(record.map(|r| r.token), Ok(token));
        drop(guard);
        handle.close().await
    }
}
