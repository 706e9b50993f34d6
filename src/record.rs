//! The on-disk record: what one key holds, and its byte encoding.
//!
//! A stored value is one format-version byte followed by the bincode 2
//! (`config::standard()`: little-endian, variable-length integers) encoding of
//! [`Record`]. `tests/format.rs` pins these bytes; changing them requires a new
//! [`RECORD_VERSION`] and a decoder that still reads the old one.

use serde::{Deserialize, Serialize};

/// Version byte written in front of every stored record.
pub const RECORD_VERSION: u8 = 1;

/// Upper bound on the bytes the decoder will look at for one record. Real
/// records are under 40 bytes; the limit keeps a corrupted value from asking
/// the decoder for large allocations.
const DECODE_LIMIT: usize = 256;

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
        if version != RECORD_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
        let (record, read): (Record, usize) = bincode::serde::decode_from_slice(body, config)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if read != body.len() {
            return Err(DecodeError::TrailingBytes(body.len() - read));
        }
        Ok(record)
    }
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value has no bytes at all.
    #[error("the value is empty")]
    Empty,
    /// The version byte is not one this build can read.
    #[error("unknown record version {0} (this build reads version {RECORD_VERSION})")]
    UnknownVersion(u8),
    /// The body is not a valid record.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// A valid record followed by extra bytes.
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(usize),
}
