//! Durability modes, defaults and the builder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock, millis};
use crate::error::{Error, Result};
use crate::record::MAX_RESULT_LIMIT;

/// Default durability: [`Durability::Sync`].
pub const DEFAULT_DURABILITY: Durability = Durability::Sync;
/// Default retention of a `Done` written by `mark_done` on a key with no
/// claim to read a ttl from: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default time an expired `Pending` stays remembered after its expiry: 24
/// hours. Until then a takeover counts the attempt and the expired lease can
/// still complete; after it the record is forgotten (as if absent) and the
/// sweeper may remove it. Longer than any broker's redelivery schedule, so
/// the attempt counter sees every redelivery of a poison message.
pub const DEFAULT_PENDING_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Default longest wait of a write for its flush, and of `close()` for the
/// final flush: 30 seconds. Past it the call fails with
/// [`Error::DurabilityTimeout`] and the store latches (the write's fate is
/// unknown).
pub const DEFAULT_DURABILITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `durability_timeout` and `sweep_interval` accepted: 100 years
/// (a wait the monotonic clock can always represent; "never" in practice).
pub const MAX_WAIT: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Default period of the expiry sweeper: 60 seconds.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Default number of records the sweeper inspects before it pauses: 64.
/// Small batches keep each burst of sweeping short; the sweeper then pauses
/// as long as the batch took. Measured on 2 cores with `Durability::Sync`,
/// claim p99 during a sweep of 1,000,000 records rose 3.2× with batches of
/// 256 and 1.5× with 64 (`cd compare && cargo run --release -- --only
/// sweep`; 1.98× in the full run of `BENCHMARKS.md`).
pub const DEFAULT_SWEEP_BATCH: usize = 64;
/// Default largest result `complete_with` may cache: 4 KiB.
pub const DEFAULT_MAX_RESULT_SIZE: usize = 4 * 1024;
/// Default sled page-cache size: 64 MiB. sled's own default (1 GiB) is
/// sized for a database server, not for a worker that embeds a dedup store;
/// 64 MiB keeps several million hot keys cached.
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// When a mutating call returns, and what its write then survives.
///
/// Read outcomes (`AlreadyPending`, `AlreadyDone`) never wait for a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Return once sled has flushed the write **and** the log file has been
    /// fdatasync'ed. Survives process crash, OS crash and power loss.
    /// Concurrent writers share one flush and one fdatasync (group commit).
    Sync,
    /// Return once a sled `flush()` covers the write. Survives a process
    /// crash (SIGKILL); an OS crash or power loss may lose it, and pages
    /// torn by a power cut may leave the database unopenable.
    Flush,
    /// Return as soon as the write is in memory; a background flush (with
    /// fdatasync) runs every period. A process crash may lose the writes of
    /// the last period; under power loss it is no safer than `Flush`.
    Periodic(Duration),
}

/// Configures and opens a [`SledIdempotencyStore`](crate::SledIdempotencyStore).
///
/// ```no_run
/// # async fn demo() -> Result<(), sled_idempotency::Error> {
/// use sled_idempotency::{Durability, SledIdempotencyStore};
/// use std::time::Duration;
///
/// let store = SledIdempotencyStore::builder("./dedup-db")
///     .durability(Durability::Sync)
///     .sweep_interval(Duration::from_secs(60))
///     .open()
///     .await?;
/// store.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) path: PathBuf,
    pub(crate) durability: Durability,
    pub(crate) default_ttl: Duration,
    pub(crate) done_retention: Option<Duration>,
    pub(crate) pending_retention: Duration,
    pub(crate) durability_timeout: Duration,
    pub(crate) sweep_interval: Duration,
    pub(crate) sweep_batch: usize,
    pub(crate) cache_capacity: u64,
    pub(crate) max_result_size: usize,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Builder {
    pub(crate) fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            durability: DEFAULT_DURABILITY,
            default_ttl: DEFAULT_TTL,
            done_retention: None,
            pending_retention: DEFAULT_PENDING_RETENTION,
            durability_timeout: DEFAULT_DURABILITY_TIMEOUT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            sweep_batch: DEFAULT_SWEEP_BATCH,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_result_size: DEFAULT_MAX_RESULT_SIZE,
            clock: Arc::new(SystemClock),
        }
    }

    /// When mutating calls return. Default [`DEFAULT_DURABILITY`].
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Retention of a `Done` recorded for a key that had no claim. Default
    /// [`DEFAULT_TTL`].
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// How long a `Done` record is kept, for every key. Unset by default: a
    /// done record is kept for the ttl it was claimed with.
    #[must_use]
    pub fn done_retention(mut self, retention: Duration) -> Self {
        self.done_retention = Some(retention);
        self
    }

    /// How long an expired `Pending` stays remembered after its expiry
    /// (attempt counting, expired leases, fingerprints). Default
    /// [`DEFAULT_PENDING_RETENTION`]; zero forgets an expired claim at once.
    #[must_use]
    pub fn pending_retention(mut self, retention: Duration) -> Self {
        self.pending_retention = retention;
        self
    }

    /// Longest wait of a write for its flush (and of `close` for the final
    /// flush). Default [`DEFAULT_DURABILITY_TIMEOUT`]; at most [`MAX_WAIT`].
    #[must_use]
    pub fn durability_timeout(mut self, timeout: Duration) -> Self {
        self.durability_timeout = timeout;
        self
    }

    /// Period of the background expiry sweeper. Default
    /// [`DEFAULT_SWEEP_INTERVAL`]; at most [`MAX_WAIT`].
    #[must_use]
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Records the sweeper inspects before pausing for other tasks. Default
    /// [`DEFAULT_SWEEP_BATCH`].
    #[must_use]
    pub fn sweep_batch(mut self, batch: usize) -> Self {
        self.sweep_batch = batch;
        self
    }

    /// Size of sled's page cache in bytes. Default [`DEFAULT_CACHE_CAPACITY`].
    #[must_use]
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }

    /// Largest result, in bytes, that `complete_with` may cache. Default
    /// [`DEFAULT_MAX_RESULT_SIZE`]; at most [`MAX_RESULT_LIMIT`].
    #[must_use]
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.max_result_size = bytes;
        self
    }

    /// The clock that decides expiry. Default [`SystemClock`]; tests inject a
    /// [`ManualClock`](crate::ManualClock).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Checks every setting; [`Builder::open`] calls it first.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_common(
            self.durability,
            self.default_ttl,
            self.done_retention,
            self.max_result_size,
        )?;
        if self.durability_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "durability_timeout must be greater than zero".into(),
            ));
        }
        // Durations the store adds to the monotonic clock must fit it.
        let now = std::time::Instant::now();
        for (name, d) in [
            (
                "durability_timeout",
                self.durability_timeout.saturating_mul(2),
            ),
            ("sweep_interval", self.sweep_interval),
        ] {
            if d > MAX_WAIT || now.checked_add(d).is_none() {
                return Err(Error::InvalidConfig(format!(
                    "{name} {d:?} is too long; at most {MAX_WAIT:?} is supported"
                )));
            }
        }
        if self.sweep_interval.is_zero() {
            return Err(Error::InvalidConfig(
                "sweep_interval must be greater than zero".into(),
            ));
        }
        if self.sweep_batch == 0 {
            return Err(Error::InvalidConfig(
                "sweep_batch must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// The settings every engine's builder checks alike.
pub(crate) fn validate_common(
    durability: Durability,
    default_ttl: Duration,
    done_retention: Option<Duration>,
    max_result_size: usize,
) -> Result<()> {
    if millis(default_ttl) == 0 {
        return Err(Error::InvalidConfig(
            "default_ttl must be at least 1 ms".into(),
        ));
    }
    if done_retention.is_some_and(|d| millis(d) == 0) {
        return Err(Error::InvalidConfig(
            "done_retention must be at least 1 ms".into(),
        ));
    }
    if max_result_size > MAX_RESULT_LIMIT {
        return Err(Error::InvalidConfig(format!(
            "max_result_size {max_result_size} is over the largest supported, {MAX_RESULT_LIMIT} bytes"
        )));
    }
    if let Durability::Periodic(period) = durability
        && period.is_zero()
    {
        return Err(Error::InvalidConfig(
            "Durability::Periodic needs a period greater than zero".into(),
        ));
    }
    Ok(())
}
