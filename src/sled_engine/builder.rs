//! The sled store's builder: the settings both engines share (`Common`)
//! and the sled engine's own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::config::{
    Common, DEFAULT_CACHE_CAPACITY, DEFAULT_DURABILITY_TIMEOUT, DEFAULT_SWEEP_BATCH,
    DEFAULT_SWEEP_INTERVAL, Durability, MAX_WAIT,
};
use crate::error::{Error, Result};
use crate::sled_engine::store::{SledEngine, SledIdempotencyStore};
use crate::store::Store;

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
    pub(crate) common: Common,
    pub(crate) durability_timeout: Duration,
    pub(crate) sweep_interval: Duration,
    pub(crate) sweep_batch: usize,
    pub(crate) cache_capacity: u64,
}

impl Builder {
    pub(crate) fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            common: Common::default(),
            durability_timeout: DEFAULT_DURABILITY_TIMEOUT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            sweep_batch: DEFAULT_SWEEP_BATCH,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }

    /// When mutating calls return. Default [`DEFAULT_DURABILITY`](crate::DEFAULT_DURABILITY).
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.common.durability = durability;
        self
    }

    /// Retention of a `Done` recorded for a key that had no claim. Default
    /// [`DEFAULT_TTL`](crate::DEFAULT_TTL).
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.common.default_ttl = ttl;
        self
    }

    /// How long a `Done` record is kept, for every key. Unset by default: a
    /// done record is kept for the ttl it was claimed with.
    #[must_use]
    pub fn done_retention(mut self, retention: Duration) -> Self {
        self.common.done_retention = Some(retention);
        self
    }

    /// How long an expired `Pending` stays remembered after its expiry
    /// (attempt counting, expired leases, fingerprints). Default
    /// [`DEFAULT_PENDING_RETENTION`](crate::DEFAULT_PENDING_RETENTION); zero forgets an expired claim at once.
    #[must_use]
    pub fn pending_retention(mut self, retention: Duration) -> Self {
        self.common.pending_retention = retention;
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
    /// [`DEFAULT_MAX_RESULT_SIZE`](crate::DEFAULT_MAX_RESULT_SIZE); at most [`MAX_RESULT_LIMIT`](crate::MAX_RESULT_LIMIT).
    #[must_use]
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.common.max_result_size = bytes;
        self
    }

    /// The clock that decides expiry. Default [`SystemClock`](crate::SystemClock); tests inject a
    /// [`ManualClock`](crate::ManualClock).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.common.clock = Some(Arc::new(clock));
        self
    }

    /// Validates the settings and opens the store.
    pub async fn open(self) -> Result<SledIdempotencyStore> {
        self.validate()?;
        SledEngine::open_with(self).await.map(Store::new)
    }

    /// Checks every setting; [`Builder::open`] calls it first.
    pub(crate) fn validate(&self) -> Result<()> {
        self.common.validate()?;
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
