#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
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
#[cfg_attr(docsrs, doc(cfg(feature = "handlers")))]
pub mod handler;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
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
    #[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
    pub use crate::sled_engine::store::admin::{
        CompactStep, Compacted, EXPORT_SCHEMA, Exported, ImportReport, MAX_IMPORTED_TOKEN,
        OnConflict, compact,
    };
}

/// The Redis engine (feature `redis`): the same [`Store`] on a Redis
/// server or cluster.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis {
    pub use crate::error::RedisError;
    pub use crate::redis_engine::{
        DEFAULT_RESPONSE_TIMEOUT, REDIS_MAX_MILLIS, RedisBuilder, RedisEngine,
        RedisIdempotencyStore,
    };
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
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

// The chapters of docs/ are not part of the API docs; these items exist only
// so that `cargo test --doc` compiles and runs their examples, as it does the
// README's.
#[cfg(doctest)]
#[doc = include_str!("../docs/semantics.md")]
pub struct SemanticsDoc;
#[cfg(doctest)]
#[doc = include_str!("../docs/durability.md")]
pub struct DurabilityDoc;
#[cfg(doctest)]
#[doc = include_str!("../docs/redis.md")]
pub struct RedisDoc;
#[cfg(doctest)]
#[doc = include_str!("../docs/operating.md")]
pub struct OperatingDoc;
#[cfg(doctest)]
#[doc = include_str!("../docs/performance.md")]
pub struct PerformanceDoc;
#[cfg(all(doctest, feature = "http"))]
#[doc = include_str!("../docs/http.md")]
pub struct HttpDoc;
