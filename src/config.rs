//! Durability modes, defaults, and the settings both engines' builders
//! share (`Common`).

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

/// The settings both engines' builders have, with their defaults, checked
/// alike: the core each builder holds.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub(crate) durability: Durability,
    pub(crate) default_ttl: Duration,
    pub(crate) done_retention: Option<Duration>,
    pub(crate) pending_retention: Duration,
    pub(crate) max_result_size: usize,
    /// `None`: the engine's own clock (the system's on sled, the server's
    /// on Redis).
    pub(crate) clock: Option<Arc<dyn Clock>>,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            durability: DEFAULT_DURABILITY,
            default_ttl: DEFAULT_TTL,
            done_retention: None,
            pending_retention: DEFAULT_PENDING_RETENTION,
            max_result_size: DEFAULT_MAX_RESULT_SIZE,
            clock: None,
        }
    }
}

impl Common {
    /// Checks the settings every engine checks alike.
    pub(crate) fn validate(&self) -> Result<()> {
        if millis(self.default_ttl) == 0 {
            return Err(Error::InvalidConfig(
                "default_ttl must be at least 1 ms".into(),
            ));
        }
        if self.done_retention.is_some_and(|d| millis(d) == 0) {
            return Err(Error::InvalidConfig(
                "done_retention must be at least 1 ms".into(),
            ));
        }
        if self.max_result_size > MAX_RESULT_LIMIT {
            return Err(Error::InvalidConfig(format!(
                "max_result_size {} is over the largest supported, {MAX_RESULT_LIMIT} bytes",
                self.max_result_size
            )));
        }
        if let Durability::Periodic(period) = self.durability
            && period.is_zero()
        {
            return Err(Error::InvalidConfig(
                "Durability::Periodic needs a period greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The clock given, or the system's.
    pub(crate) fn clock_or_system(&self) -> Arc<dyn Clock> {
        self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock))
    }
}
