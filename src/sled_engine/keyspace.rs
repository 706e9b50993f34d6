//! Record bytes in sled: key encoding, decoding with the key named on
//! corruption, compare-and-swap, removal under the fencing watermark, and
//! fresh fencing tokens. The only code that writes a record.

use std::sync::atomic::{AtomicU64, Ordering};

use bus_core::MessageId;
use sled::IVec;

use crate::error::{Error, Result};
use crate::record::Record;

use super::Open;

/// A fresh fencing token: sled's id plus one (ids start at 0; token 0 means
/// "no claim") plus the database's token floor. Ids only grow and the floor
/// is never lowered, so tokens only grow.
pub(crate) fn next_token(open: &Open) -> Result<u64> {
    let id = open
        .db
        .generate_id()
        .map_err(Error::storage("generating a fencing token"))?;
    // Saturating would hand out one token again and again: fencing broken.
    id.checked_add(1)
        .and_then(|t| t.checked_add(open.token_floor.load(Ordering::SeqCst)))
        .ok_or_else(|| Error::Corrupt {
            key: "token_floor (metadata)".into(),
            reason: "fencing tokens would overflow 64 bits".into(),
        })
}

pub(crate) fn key_bytes(key: &MessageId) -> [u8; 16] {
    *key.as_uuid().as_bytes()
}

pub(crate) fn display_key(key: &[u8]) -> String {
    match uuid::Uuid::from_slice(key) {
        Ok(uuid) => uuid.to_string(),
        Err(_) => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

pub(crate) fn decode_at(key: &[u8], value: Option<&[u8]>) -> Result<Option<Record>> {
    value
        .map(|bytes| {
            Record::decode(bytes).map_err(|e| Error::Corrupt {
                key: display_key(key),
                reason: e.to_string(),
            })
        })
        .transpose()
}

/// Removes `key` if it still holds exactly `old`, a record with fencing
/// token `token`. Every removal goes through here: it raises
/// `removed_tokens` before the removal lands (see `SledIdempotencyStore::acquire`).
pub(crate) fn remove(
    tree: &sled::Tree,
    key: &[u8],
    old: &[u8],
    token: u64,
    removed_tokens: &AtomicU64,
) -> Result<Result<(), Option<IVec>>> {
    removed_tokens.fetch_max(token, Ordering::SeqCst);
    cas(tree, key, Some(old), None)
}

/// `Ok(Ok(()))` when swapped, `Ok(Err(current))` when someone got there first.
pub(crate) fn cas(
    tree: &sled::Tree,
    key: &[u8],
    old: Option<&[u8]>,
    new: Option<Vec<u8>>,
) -> Result<Result<(), Option<IVec>>> {
    let swapped = tree
        .compare_and_swap(key, old, new)
        .map_err(Error::storage("writing a record"))?;
    Ok(swapped.map_err(|e| e.current))
}
