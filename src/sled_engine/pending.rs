//! An in-memory index of the keys of one namespace that may hold a
//! `Pending` record, so that `list(Some(Pending), ..)` reads the few pending
//! records instead of every record of the namespace.
//!
//! It costs the claim path nothing until the first such `list` call: until
//! then writers only read a flag. The first call turns tracking on and
//! builds the index with one scan; from then on claims insert their key and
//! writes that end a claim remove it. The index may hold stale keys (a
//! key's claim ended while the index was being built), never miss one:
//!
//! - A claim inserts its key *after* its compare-and-swap landed.
//! - A write that ended a claim reads the record again, with no lock held,
//!   and removes the key only if it is not pending then and no claim of
//!   that key was indexed since the read began: each indexed claim stamps
//!   its key with a fresh number under the index lock, and the removal
//!   compares the stamp it saw before the read with the one there now.
//! - The builder turns tracking on (with a fence) *before* it scans: a
//!   writer that saw tracking off wrote before the fence, so the scan sees
//!   its write.
//!
//! `list` reads each candidate's record and drops the stale ones the same
//! way, so the index answers exactly what a full scan would.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

use crate::error::{Error, Result};
use crate::record::{Record, State};
use crate::sync::lock;

type Key = [u8; 16];

#[derive(Debug, Default)]
pub(crate) struct PendingIndex {
    /// Writers keep `keys` up to date.
    tracking: AtomicBool,
    /// `keys` holds every pending key (and maybe stale ones).
    ready: AtomicBool,
    /// `None` until tracking starts. Each key with the stamp of the claim
    /// that indexed it last.
    keys: Mutex<Option<BTreeMap<Key, u64>>>,
    /// Stamps for indexed claims.
    stamps: AtomicU64,
    /// Held while building, so that a second `list` waits for the first.
    build: Mutex<()>,
}

/// Whether `key` may hold a `Pending` record: a read error or a corrupt
/// value keeps the key (a stale key costs a read; a missing one would be a
/// wrong answer).
fn may_be_pending(tree: &sled::Tree, key: &Key) -> bool {
    match tree.get(key) {
        Ok(Some(v)) => match Record::decode(&v) {
            Ok(record) => record.state == State::Pending,
            Err(_) => true,
        },
        Ok(None) => false,
        Err(_) => true,
    }
}

impl PendingIndex {
    fn tracking(&self) -> bool {
        fence(Ordering::SeqCst);
        self.tracking.load(Ordering::SeqCst)
    }

    /// A claim wrote a `Pending` record for `key`.
    pub(crate) fn claimed(&self, key: &Key) {
        if self.tracking()
            && let Some(keys) = lock(&self.keys).as_mut()
        {
            keys.insert(*key, self.stamps.fetch_add(1, Ordering::Relaxed));
        }
    }

    /// A write ended the claim on `key` (done, released, abandoned, swept).
    pub(crate) fn ended(&self, tree: &sled::Tree, key: &Key) {
        if !self.tracking() {
            return;
        }
        let Some(stamp) = lock(&self.keys).as_ref().and_then(|m| m.get(key).copied()) else {
            return;
        };
        if may_be_pending(tree, key) {
            return;
        }
        let mut keys = lock(&self.keys);
        if let Some(map) = keys.as_mut()
            && map.get(key) == Some(&stamp)
        {
            map.remove(key);
        }
    }

    /// Calls `keep` on the keys after `after` that hold a `Pending` record,
    /// in key order, with the record, until it has returned `true` `limit`
    /// times. Blocking: builds the index on first use with a scan of `tree`.
    pub(crate) fn page(
        &self,
        tree: &sled::Tree,
        after: Option<Key>,
        limit: usize,
        mut keep: impl FnMut(Key, Record) -> bool,
    ) -> Result<()> {
        self.build(tree)?;
        let mut next = after;
        let mut taken = 0;
        while taken < limit {
            // A batch of candidates, copied out so that no lock is held
            // while records are read.
            let batch: Vec<Key> = {
                let keys = lock(&self.keys);
                let Some(set) = keys.as_ref() else {
                    return Ok(());
                };
                let range = match next {
                    Some(after) => set.range((Bound::Excluded(after), Bound::Unbounded)),
                    None => set.range::<Key, _>(..),
                };
                range.take(256).map(|(key, _)| *key).collect()
            };
            let Some(last) = batch.last() else {
                return Ok(());
            };
            next = Some(*last);
            for key in batch {
                let value = tree
                    .get(key)
                    .map_err(Error::storage("listing pending records"))?;
                match value.map(|v| Record::decode(&v)) {
                    Some(Ok(record)) if record.state == State::Pending => {
                        if keep(key, record) {
                            taken += 1;
                            if taken >= limit {
                                return Ok(());
                            }
                        }
                    }
                    Some(Err(_)) => {} // corrupt: a full scan skips it too
                    _ => self.ended(tree, &key),
                }
            }
        }
        Ok(())
    }

    fn build(&self, tree: &sled::Tree) -> Result<()> {
        if self.ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _building = lock(&self.build);
        if self.ready.load(Ordering::SeqCst) {
            return Ok(()); // built while this call waited
        }
        *lock(&self.keys) = Some(BTreeMap::new());
        self.tracking.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let mut found = BTreeMap::new();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(Error::storage("building the pending index"))?;
            if let (Ok(key), Ok(record)) = (Key::try_from(key.as_ref()), Record::decode(&value))
                && record.state == State::Pending
            {
                found.insert(key, self.stamps.fetch_add(1, Ordering::Relaxed));
            }
        }
        // Claims that landed during the scan inserted their keys already;
        // a key the scan saw pending and whose claim ended since is stale.
        // Those few keys move into the scan's set, not the other way round,
        // so the lock is held for what changed during the scan only.
        if let Some(keys) = lock(&self.keys).as_mut() {
            found.extend(std::mem::take(keys));
            *keys = found;
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }
}
