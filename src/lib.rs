#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod clock;
mod config;
mod count;
mod engine;
mod error;
mod front;
#[cfg(feature = "handlers")]
pub mod handler;
#[cfg(feature = "http")]
pub mod http;
mod lease;
mod machine;
#[cfg(feature = "metrics")]
mod metrics;
mod namespace;
mod record;
#[cfg(feature = "redis")]
mod redis_engine;
mod sled_engine;
mod stats;
mod store;
mod sync;

/// The admin API of a sled store ([`Store::admin`]): census, listings,
/// verification, compaction and (feature `admin`) export and import, and
/// what they report.
pub mod admin {
    pub use crate::sled_engine::store::admin::{
        ATTEMPTS_BUCKETS, Admin, Census, CompactReport, IndexSize, ListFilter, OnProgress, Problem,
        VerifyReport,
    };
    #[cfg(feature = "admin")]
    pub use crate::sled_engine::store::admin::{
        CompactStep, Compacted, EXPORT_SCHEMA, Exported, ImportReport, MAX_IMPORTED_TOKEN,
        OnConflict, compact,
    };
}

/// The Redis engine (feature `redis`): the same [`Store`] on a Redis
/// server or cluster.
#[cfg(feature = "redis")]
pub mod redis {
    pub use crate::error::RedisError;
    pub use crate::redis_engine::{
        DEFAULT_RESPONSE_TIMEOUT, REDIS_MAX_MILLIS, RedisBuilder, RedisEngine,
        RedisIdempotencyStore,
    };
}

#[cfg(feature = "redis")]
pub use crate::redis_engine::RedisIdempotencyStore;
pub use crate::sled_engine::open::FORMAT_VERSION;
pub use crate::sled_engine::sweeper::SweepReport;
pub use bus_core::{BusError, ClaimOutcome, IdempotencyStore, MessageId};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_DURABILITY, DEFAULT_DURABILITY_TIMEOUT,
    DEFAULT_MAX_RESULT_SIZE, DEFAULT_PENDING_RETENTION, DEFAULT_SWEEP_BATCH,
    DEFAULT_SWEEP_INTERVAL, DEFAULT_TTL, Durability, MAX_WAIT,
};
pub use engine::Engine;
pub use error::{Error, Result, StorageError};
pub use lease::{ClaimResult, Lease};
pub use machine::Holder;
pub use namespace::DEFAULT_NAMESPACE;
pub use record::{
    DecodeError, MAX_FINGERPRINT_LEN, MAX_RESULT_LIMIT, RECORD_VERSION, Record, State,
};
pub use sled_engine::builder::Builder;
pub use sled_engine::store::{SledEngine, SledIdempotencyStore};
pub use stats::Stats;
pub use store::Store;
