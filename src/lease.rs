//! Leases: claims that carry their fencing token, and what a claim found.

use std::sync::Arc;

use bus_core::MessageId;

use crate::error::Error;
use crate::machine::Holder;

/// Proof of a claim: the key, the namespace and the fencing token written
/// into the record by the claim.
///
/// `complete`, `abandon` and `extend` succeed only while the record still
/// holds this lease's token (an expired lease that nobody re-claimed is still
/// held). Tokens are unique in the database, restarts and crashes included,
/// and strictly increase along each key's history, so a handler can pass the
/// token to downstream systems as a fencing token: a write about the same
/// message carrying a smaller token than one already seen comes from a worker
/// whose lease was taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) key: MessageId,
    pub(crate) namespace: Arc<str>,
    pub(crate) token: u64,
    pub(crate) expires_at: u64,
    pub(crate) attempt: u32,
}

impl Lease {
    /// The claimed message id.
    pub fn key(&self) -> &MessageId {
        &self.key
    }

    /// The namespace the claim was made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The fencing token of this claim.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the claim expires, in unix milliseconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// The error for an operation on this lease once the record `holds`
    /// something else.
    pub(crate) fn lost(&self, holds: Holder) -> Error {
        Error::LeaseLost {
            key: self.key.to_string(),
            namespace: self.namespace.to_string(),
            token: self.token,
            holds,
        }
    }

    /// Attempt number: 1 for a first claim, more when this claim took over
    /// expired claims of the same key (a poison message shows here).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// What [`claim`](crate::SledIdempotencyStore::claim) found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a claim that acquired a lease must be completed or abandoned"]
pub enum ClaimResult {
    /// The key was free: run the handler, then `complete` or `abandon`.
    Acquired(Lease),
    /// Another claim is live: the message is being handled elsewhere.
    InProgress {
        /// When that claim expires (unix ms); it can be taken over then.
        expires_at: u64,
        /// Attempt number of that claim.
        attempts: u32,
    },
    /// The message was handled; skip it.
    Done {
        /// The result cached by `complete_with`, if any.
        result: Option<Vec<u8>>,
    },
    /// The live record was claimed with a different payload fingerprint: the
    /// producer reused this message id for different content.
    Conflict {
        /// Whether the record with the other fingerprint is done (else pending).
        done: bool,
    },
}

impl ClaimResult {
    /// The lease, if the claim acquired one.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            ClaimResult::Acquired(lease) => Some(lease),
            _ => None,
        }
    }
}
