#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod clock;
mod config;
mod error;
mod flusher;
mod machine;
mod record;
mod store;
mod sweeper;

pub use bus_core::{BusError, ClaimOutcome, IdempotencyStore, MessageId};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    Builder, DEFAULT_CACHE_CAPACITY, DEFAULT_DURABILITY, DEFAULT_SWEEP_BATCH,
    DEFAULT_SWEEP_INTERVAL, DEFAULT_TTL, Durability,
};
pub use error::{Error, Result};
pub use record::{DecodeError, RECORD_VERSION, Record, State};
pub use store::{FORMAT_VERSION, SledIdempotencyStore};
pub use sweeper::SweepReport;
