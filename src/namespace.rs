//! Namespaces: their names, and what the store keeps for each open one
//! (its position among the engine's keyspaces, its counters, its index of
//! pending keys).

use std::sync::Arc;

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::sled_engine::pending::PendingIndex;
use crate::stats::{Counters, Stored};

/// Name of the namespace that [`SledIdempotencyStore::open`] returns.
///
/// [`SledIdempotencyStore::open`]: crate::SledIdempotencyStore::open
pub const DEFAULT_NAMESPACE: &str = "default";

/// Longest namespace name, in bytes.
pub(crate) const MAX_NAMESPACE_LEN: usize = 64;

/// One namespace: its position among the open trees, its name, its counters.
#[derive(Debug)]
pub(crate) struct Space {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    pub(crate) counters: Counters,
    pub(crate) pending: PendingIndex,
    /// Records stored, by state.
    pub(crate) stored: Stored,
}

impl Space {
    /// `stored`: the records it holds (pending, done), or `None` when
    /// they are unknown and must be counted.
    pub(crate) fn new(
        index: usize,
        name: &str,
        durability: Durability,
        stored: Option<(u64, u64)>,
    ) -> Arc<Space> {
        Arc::new(Space {
            index,
            name: name.into(),
            counters: Counters::new(name, durability),
            pending: PendingIndex::default(),
            stored: Stored::new(stored),
        })
    }
}

/// Names are 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
pub(crate) fn validate_namespace(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidNamespace {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_NAMESPACE_LEN {
        return invalid("it is longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return invalid("use only ASCII letters, digits, '-', '_' and '.'");
    }
    Ok(())
}
