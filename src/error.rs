//! The one error type of the crate.

use std::path::PathBuf;
use std::time::Duration;

use bus_core::BusError;

use crate::machine::Holder;

/// Everything that can go wrong, each with a message a person can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A ttl shorter than one millisecond (the store's resolution).
    #[error("ttl must be at least 1 ms, got {ttl:?}")]
    TtlTooShort {
        /// The ttl that was passed.
        ttl: Duration,
    },

    /// `now + ttl` does not fit the expiry timestamp (u64 unix milliseconds).
    #[error("ttl {ttl:?} is too large: the expiry time now + ttl overflows u64 milliseconds")]
    TtlOverflow {
        /// The ttl that was passed.
        ttl: Duration,
    },

    /// A builder setting that cannot work (or, for the Redis engine's
    /// `Durability::Sync`, a server setting that does not match it).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The store was opened outside a tokio runtime; it runs its sweeper
    /// and its flusher's waits on one.
    #[error("the store must be opened inside a tokio runtime (it starts its sweeper there)")]
    NoRuntime,

    /// The directory a new database was to be written to (by
    /// `compact_into`, or a compaction's work directory) already holds
    /// something else.
    #[error(
        "{path} exists and is not empty (nor a database an earlier compaction left); \
         the new database needs a fresh directory: move it away first"
    )]
    DestinationNotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// A path the operation cannot use.
    #[error("{path} cannot be used: {reason}")]
    InvalidPath {
        /// The path given.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },

    /// The store's clock reads a time its engine cannot compute with (the
    /// Redis engine computes exactly below 2^52 ms).
    #[error(
        "the store's clock reads {now_ms} ms, past the {max_ms} ms this engine computes exactly"
    )]
    ClockOutOfRange {
        /// What the clock read.
        now_ms: u64,
        /// The largest time the engine takes.
        max_ms: u64,
    },

    /// Another process (or another open store in this process) holds the
    /// database's lock.
    #[error(
        "the database at {path} is in use by another process or another open store; \
         close that one first (sled allows one owner per directory)"
    )]
    Locked {
        /// The database directory.
        path: PathBuf,
    },

    /// The path exists and is not a directory.
    #[error("{path} is not a directory; give the store a directory to hold its database")]
    NotADirectory {
        /// The path that was passed.
        path: PathBuf,
    },

    /// The directory does not hold a database this crate can open.
    #[error("{path} does not hold a readable sled-idempotency database: {reason}")]
    NotADatabase {
        /// The database directory.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The database was written by a newer version of this crate.
    #[error(
        "the database at {path} uses format version {found}, but this build reads \
         format versions up to {supported}; upgrade sled-idempotency to open it"
    )]
    NewerFormat {
        /// The database directory.
        path: PathBuf,
        /// Format version recorded in the database.
        found: u32,
        /// Highest format version this build reads.
        supported: u32,
    },

    /// A stored value that does not decode. Other keys keep working.
    #[error("the record stored for key {key} is corrupted ({reason}); other keys are unaffected")]
    Corrupt {
        /// The key, as a UUID when it is 16 bytes, as hex otherwise.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },

    /// A lease operation on a record that no longer holds the lease: it
    /// expired and another claim took over, or it was completed, abandoned
    /// or swept.
    #[error(
        "the lease with token {token} on key {key} in namespace {namespace:?} is no longer held; \
         the record now holds {holds}"
    )]
    LeaseLost {
        /// The key.
        key: String,
        /// The namespace of the lease.
        namespace: String,
        /// The lease's token.
        token: u64,
        /// What the record holds instead.
        holds: Holder,
    },

    /// `complete_with` on a lease that already completed the key with a
    /// different result. The first result is kept.
    #[error(
        "the lease with token {token} already completed key {key} with a different result; \
         the first result is kept"
    )]
    DifferentResult {
        /// The key.
        key: String,
        /// The lease's token.
        token: u64,
    },

    /// A lease used on a handle of another namespace.
    #[error(
        "the lease belongs to namespace {lease:?}, but was used on namespace {handle:?}; \
         use the handle it was claimed on"
    )]
    WrongNamespace {
        /// The lease's namespace.
        lease: String,
        /// The handle's namespace.
        handle: String,
    },

    /// A namespace name that cannot be used.
    #[error("invalid namespace name {name:?}: {reason}")]
    InvalidNamespace {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A result larger than the configured `max_result_size`.
    #[error(
        "the result is {size} bytes, over the limit of {limit} bytes set by max_result_size; \
         the record was left unchanged"
    )]
    ResultTooLarge {
        /// Size of the result given.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A done record replayed by [`Store::once`](crate::Store::once) holds
    /// no cached result: it was completed without one (`mark_done`,
    /// `complete`, or a result that could not be serialized or was over
    /// `max_result_size`).
    #[error(
        "the record for key {key} is done but holds no cached result to replay; \
         it was completed without one (mark_done, complete, or a result over max_result_size)"
    )]
    NoCachedResult {
        /// The key.
        key: String,
    },

    /// A done record replayed by [`Store::once`](crate::Store::once) holds a
    /// cached result that does not deserialize into the caller's type.
    #[error(
        "the result cached for key {key} does not deserialize into the handler's type: {reason}"
    )]
    UndecodableResult {
        /// The key.
        key: String,
        /// What the deserializer said.
        reason: String,
    },

    /// A payload fingerprint longer than the store keeps.
    #[error("the fingerprint is {len} bytes; at most {max} are allowed (hash the payload first)")]
    FingerprintTooLong {
        /// Length of the fingerprint given.
        len: usize,
        /// The longest allowed.
        max: usize,
    },

    /// A line of an import that is not a valid record. Nothing was
    /// imported.
    #[error("line {line} of the import: {reason}; nothing was imported")]
    ImportLine {
        /// The line number, from 1.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// An imported record whose key already holds a different record, in
    /// an import told to fail on conflicts. Nothing was imported.
    #[error(
        "line {line} of the import: key {key} in namespace {namespace:?} already holds a \
         different record ({conflicts} such conflicts in all); nothing was imported: say \
         whether to keep the stored records or replace them"
    )]
    ImportConflict {
        /// The line number of the first conflict, from 1.
        line: u64,
        /// Its namespace.
        namespace: String,
        /// Its key.
        key: String,
        /// How many lines conflict.
        conflicts: u64,
    },

    /// The store was closed; open it again to go on.
    #[error("the store is closed; open it again to use it")]
    Closed,

    /// An I/O failure (a failed flush or fdatasync, a dead flusher thread,
    /// or a durability wait that ran out) left the durability of recent
    /// writes unknown. The store latched: the write that met the failure
    /// and every later call that may write fail with this error, and
    /// `close()` returns it, until the database is reopened. Reads keep
    /// working but may show writes that were never acknowledged.
    #[error(
        "an I/O failure ({cause}) may have lost writes that were not acknowledged; \
         the store accepts no more writes: close it and open the database again"
    )]
    PreviousIo {
        /// The failure that latched the store.
        cause: String,
    },

    /// A write waited longer than the durability timeout for its flush (a
    /// hung disk, say). Whether it became durable is unknown; the store
    /// latched as for [`Error::PreviousIo`].
    #[error(
        "the write was not made durable within {waited:?} (the durability timeout) and may be \
         lost; the store accepts no more writes: close it and open the database again"
    )]
    DurabilityTimeout {
        /// How long the write waited.
        waited: Duration,
    },

    /// An operating-system I/O error.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An error from the Redis engine's server or connection. When the
    /// connection failed during a write, the server may or may not have
    /// applied it: the error says so, and never guesses an answer.
    #[cfg(feature = "redis")]
    #[error("Redis error while {context}{}: {source}", if *.outcome_unknown {
        " (the connection failed mid-call: the server may or may not have applied it)"
    } else {
        ""
    })]
    Redis {
        /// What the store was doing.
        context: &'static str,
        /// True when a write may have been applied although it failed.
        outcome_unknown: bool,
        /// The underlying error; its `source()` is the client's.
        #[source]
        source: RedisError,
    },

    /// An error reported by sled.
    #[error("storage error while {context}: {source}")]
    Storage {
        /// What the store was doing.
        context: &'static str,
        /// The underlying error; its `source()` is sled's.
        #[source]
        source: StorageError,
    },
}

/// An error sled reported, behind a type of this crate so that sled's
/// version is not part of this crate's API. Its message is sled's, and
/// [`source`](std::error::Error::source) returns sled's error itself.
#[derive(Debug)]
pub struct StorageError(pub(crate) sled::Error);

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// An error of the Redis client or server, behind a type of this crate so
/// that the client's version is not part of this crate's API. Its message
/// is the client's, and [`source`](std::error::Error::source) returns the
/// client's error itself.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub struct RedisError(pub(crate) redis::RedisError);

#[cfg(feature = "redis")]
impl std::fmt::Display for RedisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(feature = "redis")]
impl std::error::Error for RedisError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl Error {
    pub(crate) fn storage(context: &'static str) -> impl FnOnce(sled::Error) -> Error {
        move |source| Error::Storage {
            context,
            source: StorageError(source),
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

impl From<Error> for BusError {
    fn from(err: Error) -> Self {
        BusError::Idempotency(err.to_string())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
