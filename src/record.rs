//! The on-disk record: what one key holds, and its byte encoding.
//!
//! A stored value is one format-version byte followed by the bincode 2
//! (`config::standard()`: little-endian, variable-length integers) encoding of
//! the record. `tests/format.rs` pins these bytes; changing them requires a
//! new [`RECORD_VERSION`] and a decoder that still reads the old ones.
//!
//! - Version 1: state, expires_at, token, attempts, ttl_ms.
//! - Version 2 (written now): version 1 followed by an optional payload
//!   fingerprint and an optional cached result.

use serde::{Deserialize, Serialize};

/// Version byte written in front of every stored record.
pub const RECORD_VERSION: u8 = 2;

/// Largest cached result any configuration may allow: 6 KiB.
///
/// sled 0.34 writes a log entry larger than 128 KiB (a quarter of its 512 KiB
/// segment) to a separate blob file, which its flush does not fsync, and a
/// leaf node holds up to 17 entries. Keeping every record under about 7 KiB
/// keeps even a full leaf under that threshold, so every write lands in the
/// log file that `Durability::Sync` fdatasyncs. Store larger results
/// elsewhere and cache a reference to them.
pub const MAX_RESULT_LIMIT: usize = 6 * 1024;
/// Largest payload fingerprint a claim may carry (64 bytes: room for any
/// common hash).
pub const MAX_FINGERPRINT_LEN: usize = 64;

/// Upper bound on the bytes the decoder will read for one record: the
/// largest result and fingerprint plus the fixed fields. It keeps a
/// corrupted length prefix from asking for a huge allocation.
const DECODE_LIMIT: usize = MAX_RESULT_LIMIT + MAX_FINGERPRINT_LEN + 64;

/// Whether a claim is in flight or the message has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// A worker claimed the key and has not finished yet.
    Pending,
    /// The handler ran to completion; duplicates must be skipped.
    Done,
}

/// What the store keeps for one message id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Pending or done.
    pub state: State,
    /// Unix milliseconds at which the record stops being live.
    pub expires_at: u64,
    /// Fencing token of the claim that created this record (0 when a
    /// `mark_done` arrived with no claim to take a token from).
    pub token: u64,
    /// How many claims this key has had, counting takeovers of an expired
    /// pending claim.
    pub attempts: u32,
    /// The ttl, in milliseconds, the key was claimed with; the default done
    /// retention of the record.
    pub ttl_ms: u64,
    /// Fingerprint of the payload the key was claimed with, if the claim
    /// carried one.
    pub fingerprint: Option<Vec<u8>>,
    /// Result cached by `complete_with`, returned to later claims.
    pub result: Option<Vec<u8>>,
}

/// The version-1 layout, read from databases written before version 2.
#[derive(Deserialize)]
struct RecordV1 {
    state: State,
    expires_at: u64,
    token: u64,
    attempts: u32,
    ttl_ms: u64,
}

impl From<RecordV1> for Record {
    fn from(v1: RecordV1) -> Self {
        Record {
            state: v1.state,
            expires_at: v1.expires_at,
            token: v1.token,
            attempts: v1.attempts,
            ttl_ms: v1.ttl_ms,
            fingerprint: None,
            result: None,
        }
    }
}

impl Record {
    /// True while `now < expires_at`.
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// Encodes the record as stored on disk: version byte, then bincode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        out.push(RECORD_VERSION);
        // Writing into a Vec cannot fail, and every field has a fixed
        // serde shape, so encoding cannot fail either.
        #[allow(clippy::expect_used)]
        bincode::serde::encode_into_std_write(self, &mut out, bincode::config::standard())
            .expect("encoding a record into a Vec is infallible");
        out
    }

    /// Decodes a stored value. Never panics: anything that is not exactly
    /// one version-1 record is an error describing what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        match version {
            1 => decode_exact::<RecordV1>(body).map(Record::from),
            RECORD_VERSION => decode_exact::<Record>(body),
            other => Err(DecodeError::UnknownVersion(other)),
        }
    }
}

/// Decodes one `T` that must span all of `body`.
fn decode_exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
    let (value, read): (T, usize) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - read));
    }
    Ok(value)
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value has no bytes at all.
    #[error("the value is empty")]
    Empty,
    /// The version byte is not one this build can read.
    #[error("unknown record version {0} (this build reads versions 1 to {RECORD_VERSION})")]
    UnknownVersion(u8),
    /// The body is not a valid record.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// A valid record followed by extra bytes.
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(usize),
}
